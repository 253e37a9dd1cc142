"""Widening truncated heads to the full vocabulary: shadow and zero rows, and the top-1 agreement measure."""

from __future__ import annotations

import pytest
import torch

from medusaforge.interop.full_vocab import SHADOW, ZERO, full_vocab_rows, shadow_sources, top1_agreement, trained_top1


def test_shadow_sources_point_at_the_nearest_lower_in_map_token():
    # token_map [5, 2, 7]: ids 2-4 copy id 2 (index 1), 5-6 copy id 5 (index 0), 7-8 copy id 7 (index 2);
    # ids 0-1 have no lower in-map token.
    assert shadow_sources(torch.tensor([5, 2, 7]), 9).tolist() == [-1, -1, 1, 1, 1, 0, 0, 2, 2]


def test_hand_worked_rows_and_logits():
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # trained rows of tokens 3 and 0
    token_map = torch.tensor([3, 0])
    shadow = full_vocab_rows(rows, token_map, 5, SHADOW)
    assert shadow.tolist() == [[0, 1], [0, 1], [0, 1], [1, 0], [1, 0]]
    zero = full_vocab_rows(rows, token_map, 5, ZERO)
    assert zero.tolist() == [[0, 1], [0, 0], [0, 0], [1, 0], [0, 0]]
    # h = (-1, -2): trained logits -1 (token 3) and -2 (token 0): top-1 is token 3. The shadow row of
    # id 4 ties with token 3 and loses the tie (argmax takes the first); the zero rows score 0 and win.
    h = torch.tensor([[-1.0, -2.0]])
    assert top1_agreement(h, rows, token_map, shadow) == 1.0
    assert top1_agreement(h, rows, token_map, zero) == 0.0
    # Without token 0 in the map, id 0 has no lower twin: it gets 15/16 of the first in-map row
    # (token 1's). It scores below token 1 whenever token 1's logit is positive, and wins only when
    # every trained logit is negative and token 1's is within 1/16 of the best.
    token_map = torch.tensor([3, 1])
    no_zero = full_vocab_rows(rows, token_map, 5, SHADOW)
    assert no_zero.tolist() == [[0, 0.9375], [0, 1], [0, 1], [1, 0], [1, 0]]
    assert top1_agreement(torch.tensor([[-1.0, -2.0], [2.0, 3.0]]), rows, token_map, no_zero) == 1.0
    assert top1_agreement(torch.tensor([[-5.0, -1.0]]), rows, token_map, no_zero) == 0.0  # -0.9375 > -1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shadow_rows_keep_every_top1_on_random_hidden_states(dtype):
    """With token 0 in the map every out-of-map row has a lower in-map twin, and argmax keeps the
    trained token wherever the matmul gives identical rows identical logits (it does here)."""
    generator = torch.Generator().manual_seed(0)
    vocab, hidden, head_vocab = 300, 32, 40
    token_map = torch.cat([torch.tensor([0]), 1 + torch.randperm(vocab - 1, generator=generator)[: head_vocab - 1]])
    # Rows share a direction (ones) so that shifting the states against it makes logits negative below.
    rows = (torch.randn(head_vocab, hidden, generator=generator) * 0.5 + 1).to(dtype)
    states = torch.randn(4096, hidden, generator=generator).to(dtype)
    full = full_vocab_rows(rows, token_map, vocab, SHADOW)
    assert torch.equal(full[token_map], rows)
    # Ties between two trained tokens (bf16 logits tie often) go to the lower id, as in head_logits.
    assert torch.equal((states @ full.T).argmax(-1), trained_top1(states, rows, token_map, vocab))
    # Zero rows lose exactly where every trained logit is negative; shift the states so that happens.
    shifted = states - 0.7
    zero = full_vocab_rows(rows, token_map, vocab, ZERO)
    negative = (shifted @ rows.T).max(-1).values < 0
    assert negative.any()
    kept = (shifted @ zero.T).argmax(-1) == trained_top1(shifted, rows, token_map, vocab)
    assert torch.equal(kept, ~negative)
    assert top1_agreement(shifted, rows, token_map, zero) == pytest.approx(1 - negative.float().mean().item())


def test_unknown_fill_is_refused():
    with pytest.raises(ValueError, match="fill must be one of"):
        full_vocab_rows(torch.zeros(2, 2), torch.tensor([0, 1]), 4, "base")
