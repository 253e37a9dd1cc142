"""Distillation's batched generation gives generate()'s tokens, with finished rows leaving the batch."""

import torch

from medusaforge.data.batch_generation import generate_batch

from helpers import tiny_llama


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def cut_at_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[: i + 1]
    return tokens


def test_greedy_rows_match_generate_and_end_at_their_own_stop_token():
    model = tiny_llama(vocab_size=64, seed=1)
    prompts = [[5, 9, 11, 30, 3], [7, 8], [40, 41, 42, 43, 44, 45, 46], [12, 13, 14, 15]]
    ids, mask = left_padded(prompts)
    model.generation_config.eos_token_id = None  # run every row to max_new_tokens
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    # A stop token that one row writes early, so rows end at different steps and leave the batch.
    stop = {int(free[0, 2])}
    expected = [cut_at_stop(row, stop) for row in free.tolist()]
    assert len({len(row) for row in expected}) > 1, "the rows must end at different steps for this test to bite"
    for drop_share in (0.01, 2.0):  # finished rows leave at once / never
        assert generate_batch(model, ids, mask, 12, stop, drop_share=drop_share) == expected


def test_sampling_follows_the_generator_and_stops_at_max_new_tokens():
    model = tiny_llama(vocab_size=64, seed=2)
    ids, mask = left_padded([[5, 6, 7], [8, 9]])
    first = generate_batch(model, ids, mask, 6, {63}, temperature=1.0, generator=torch.Generator().manual_seed(3))
    again = generate_batch(model, ids, mask, 6, {63}, temperature=1.0, generator=torch.Generator().manual_seed(3))
    greedy = generate_batch(model, ids, mask, 6, {63})
    assert first == again and all(len(row) <= 6 for row in first)
    assert first != greedy  # a random model's distribution is flat: sampling parts from the argmax
