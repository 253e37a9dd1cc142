"""drafters/chain.py without vLLM: which chain each request gets (lookup or the trained drafter's),
the chains themselves on hand-made contexts, and the per-request state across added and finished
requests (what serving/vllm/proposer.py feeds it from vLLM's batch)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

from medusaforge.drafters.chain import EAGLE3, HEADS, LOOKUP, ChainDrafter, ChainRequest, heads_chain, lookup_chain
from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base
from medusaforge.drafters.lookup import NgramIndex
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.serving.vllm import options_from_env, supported

HIDDEN = 4


def identity_heads() -> MedusaHeads:
    """2 heads over a truncated vocabulary [2, 5, 7] of 10 tokens whose ResBlocks are the identity
    (W = 0, bias -100: SiLU(-100) is -4e-42) and whose rows pick a hidden coordinate:
    head 0's rows e0, e1, e2 -> argmax = the largest of h0..h2; head 1's rows e2, e1, e0 reversed."""
    heads = MedusaHeads(HIDDEN, 10, num_heads=2, head_vocab_size=3)
    heads.token_map.copy_(torch.tensor([2, 5, 7]))
    eye = torch.eye(HIDDEN)[:3]
    with torch.no_grad():
        for k, head in enumerate(heads.heads):
            head.blocks[0].linear.bias.fill_(-100.0)
            head.lm_head.weight.copy_(eye if k == 0 else eye.flip(0))
    return heads.eval()


def step_of(req_id, tokens, start, hidden_rows=None):
    n = len(tokens) - 1 - start
    hidden = torch.tensor(hidden_rows, dtype=torch.float32) if hidden_rows is not None else torch.zeros(n, HIDDEN)
    return ChainRequest(req_id, tokens, start, hidden=hidden)


def test_lookup_chain_hand_worked():
    # [5, 6] also ended at position 2, followed by 7 8 9 5 6, then the guess repeats itself.
    index = NgramIndex(min_ngram=1, max_ngram=4, tokens=[5, 6, 7, 8, 9, 5, 6])
    assert lookup_chain(index, 3, min_ngram=2) == [7, 8, 9]
    assert lookup_chain(index, 7, min_ngram=2) == [7, 8, 9, 5, 6, 7, 8]
    assert lookup_chain(index, 3, min_ngram=3) == []  # the match is shorter than asked
    # Only a 1-token match ([9] at 0): drafts only when 1 token is enough.
    index = NgramIndex(min_ngram=1, max_ngram=4, tokens=[9, 3, 4, 9])
    assert lookup_chain(index, 2, min_ngram=1) == [3, 4]
    assert lookup_chain(index, 2, min_ngram=2) == []


def test_heads_chain_is_each_heads_argmax_mapped_through_the_token_map():
    heads = identity_heads()
    hidden = torch.tensor([[0.0, 0.0, 1.0, 0.0], [3.0, 1.0, 0.0, 0.0]])
    # row 0: head 0 picks index 2 -> token 7, head 1 (rows reversed) index 0 -> token 2
    # row 1: head 0 picks index 0 -> token 2, head 1 index 2 -> token 7
    assert heads_chain(heads, hidden, 2).tolist() == [[7, 2], [2, 7]]
    assert heads_chain(heads, hidden, 1).tolist() == [[7], [2]]
    with pytest.raises(ValueError, match="needs 3 heads"):
        heads_chain(heads, hidden, 3)


def test_lookup_when_the_context_repeats_heads_otherwise():
    drafter = ChainDrafter(2, heads=identity_heads())
    repeats = step_of("a", [5, 6, 7, 8, 5, 6], start=0, hidden_rows=[[0, 0, 1, 0]] * 5)
    fresh = step_of("b", [1, 2, 3, 4], start=0, hidden_rows=[[1, 0, 0, 0]] * 2 + [[0, 0, 1, 0]])
    # "a": [5, 6] matched 2 tokens -> lookup's [7, 8]; "b": no repeat -> heads on its LAST row: [7, 2].
    assert drafter.step([repeats, fresh]) == [[7, 8], [7, 2]]
    assert drafter.states["a"].chosen == [LOOKUP] and drafter.states["b"].chosen == [HEADS]
    # A 1-token match is not enough beside a model drafter (the hybrid's lookup_first_ngram).
    assert drafter.step([step_of("c", [9, 3, 4, 9], start=0, hidden_rows=[[3, 1, 0, 0]] * 3)]) == [[2, 7]]
    # Lookup off: always the heads.
    assert ChainDrafter(2, heads=identity_heads(), lookup=False).step([repeats]) == [[7, 2]]
    # No model drafter: lookup on any match, nothing otherwise.
    lookup_only = ChainDrafter(4)
    assert lookup_only.step([step_of("c", [9, 3, 4, 9], 0), step_of("d", [1, 2, 3], 0)]) == [[3, 4, 9, 3], []]


def test_requests_are_followed_across_steps_added_and_finished():
    drafter = ChainDrafter(4)
    # Step 1: "a" prefills [1 2 3 4] and samples 1; "b" prefills [7 8 9].
    assert drafter.step([step_of("a", [1, 2, 3, 4, 1], 0), step_of("b", [7, 8, 9, 5], 0)]) == [[2, 3, 4, 1], []]
    # Step 2: "a" accepted 2 (ran 3 positions: root 1, drafts 2 3 -> sampled 4), "c" joins.
    chains = drafter.step([step_of("a", [1, 2, 3, 4, 1, 2, 3, 4], 4), step_of("b", [7, 8, 9, 5, 6], 3),
                           step_of("c", [4, 4, 4], 0)])
    # "a": [1 2 3 4] ended at 4 earlier -> the 4 tokens from there; "b": no repeat;
    # "c": [4 4] ended at 2 -> continued past the end from its own guess.
    assert chains == [[1, 2, 3, 4], [], [4, 4, 4, 4]]
    assert drafter.states["a"].index.tokens == [1, 2, 3, 4, 1, 2, 3, 4]  # extended, never re-added
    # "b" finished: the engine's running set drops it, and its state goes.
    drafter.retain(["a", "c"])
    assert set(drafter.states) == {"a", "c"}
    drafter.forget(["c"])
    assert set(drafter.states) == {"a"}
    # A request recomputed from scratch with a shorter text (preempted, or a reused id) is re-indexed.
    drafter.step([step_of("a", [1, 2, 1], 0)])
    assert drafter.states["a"].index.tokens == [1, 2, 1]


def test_large_batches_draft_nothing_but_keep_their_state():
    drafter = ChainDrafter(4, max_batch=1)
    assert drafter.step([step_of("a", [1, 2, 1], 0), step_of("b", [3, 4, 3], 0)]) == [[], []]
    assert drafter.states["a"].index.tokens == [1, 2, 1]
    # [1 2 1] ended at 3 -> 2, 1, then its own guess again: 2, 1.
    assert drafter.step([step_of("a", [1, 2, 1, 2, 1], 2)]) == [[2, 1, 2, 1]]


def test_bad_requests_and_settings_are_refused():
    with pytest.raises(ValueError, match="ran no position"):
        ChainRequest("a", [1, 2], start=1)
    with pytest.raises(ValueError, match="hidden has 2 rows for 1 positions"):
        ChainRequest("a", [1, 2], start=0, hidden=torch.zeros(2, HIDDEN))
    with pytest.raises(ValueError, match="only 2 heads"):
        ChainDrafter(3, heads=identity_heads())
    with pytest.raises(ValueError, match="nothing to draft"):
        ChainDrafter(2, lookup=False)


def eagle_reference_chain(draft, features_by_position, tokens, num_tokens) -> list[int]:
    """Greedy chain recomputed from scratch over every run position (no cache carried between steps)."""
    n = features_by_position.shape[0]
    next_tokens = torch.tensor(tokens[1 : n + 1])[None]
    out, cache = draft.step(next_tokens, draft.fuse(features_by_position.flatten(1)[None]), torch.arange(n)[None])
    hidden, chain = out[0, -1], []
    for depth in range(num_tokens):
        draft_id = draft.logits(hidden[None]).argmax(-1)
        chain.append(int(draft.to_target(draft_id)))
        out, cache = draft.step(draft.to_target(draft_id)[None], hidden[None, None], torch.tensor([[n - 1 + depth + 1]]), cache)
        hidden = out[0, -1]
    return chain


def test_eagle3_chain_follows_the_greedy_draft_across_steps():
    torch.manual_seed(0)
    base = tiny_llama(64, hidden_size=32)
    draft = Eagle3Draft(draft_config_from_base(base.config, 64, (0, 1, 2)), base.get_input_embeddings()).eval()
    for parameter in draft.parameters():
        parameter.data.normal_(std=0.5)
    drafter = ChainDrafter(3, eagle3=draft, lookup=False)
    tokens = [3, 9, 14, 27, 33, 41]
    features = torch.randn(len(tokens) + 4, 3, 32)  # per position, as the engine's aux hidden states
    # Step 1 prefills positions 0..4 (root tokens[5]); step 2 runs 5..7 after two accepted drafts.
    first = drafter.step([ChainRequest("a", tokens, 0, features=features[:5])])
    longer = tokens + [50, 7, 12]
    second = drafter.step([ChainRequest("a", longer, 5, features=features[5:8])])
    with torch.inference_mode():
        assert first == [eagle_reference_chain(draft, features[:5], tokens, 3)]
        assert second == [eagle_reference_chain(draft, features[:8], longer, 3)]
    assert drafter.states["a"].chosen == [EAGLE3, EAGLE3]
    assert drafter.feature_layers == (0, 1, 2)
    # A prefix the engine never ran (prefix caching): the cache starts at that position, relative.
    third = drafter.step([ChainRequest("b", longer, 3, features=features[3:8])])
    with torch.inference_mode():
        assert third == [eagle_reference_chain(draft, features[3:8], longer[3:], 3)]


def test_supported_vllm_versions_and_the_proposers_options():
    assert supported("0.32.0") and supported("0.32.3+cpu")
    assert not supported("0.33.0") and not supported("0.31.2") and not supported("dev") and not supported("1.0")
    assert options_from_env({}) == {"drafter": None, "lookup": True, "max_batch": 4, "lookup_min_ngram": 2, "draft_log": None}
    options = options_from_env({"MEDUSAFORGE_DRAFTER": "runs/demo/heads", "MEDUSAFORGE_LOOKUP": "0", "MEDUSAFORGE_MAX_BATCH": "16",
                                "MEDUSAFORGE_LOOKUP_MIN_NGRAM": "3"})
    assert options == {"drafter": "runs/demo/heads", "lookup": False, "max_batch": 16, "lookup_min_ngram": 3, "draft_log": None}
    with pytest.raises(ValueError, match="MEDUSAFORGE_LOOKUP='maybe'"):
        options_from_env({"MEDUSAFORGE_LOOKUP": "maybe"})
    with pytest.raises(ValueError, match="MEDUSAFORGE_MAX_BATCH='many'"):
        options_from_env({"MEDUSAFORGE_MAX_BATCH": "many"})
    with pytest.raises(ValueError, match="MEDUSAFORGE_LOOKUP_MIN_NGRAM='0': need at least 1"):
        options_from_env({"MEDUSAFORGE_LOOKUP_MIN_NGRAM": "0"})
