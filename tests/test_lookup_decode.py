"""Greedy decoding with the lookup drafter, alone and merged with heads, against model.generate().

The lookup source (4-grams only) is forced right by giving it a reference text that holds the
base's own greedy continuation, and forced wrong by a reference in which every 4-gram of that
continuation is followed by another token. The model's own text repeats no 4-gram in the decoded
span (checked), so no match comes from anywhere else. The heads are forced right or wrong by an
oracle, as in test_decode.py.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medusaforge.decoding.decoder import medusa_generate, speculative_generate
from medusaforge.drafters.hybrid import HybridProposer, accept_by_source
from medusaforge.drafters.lookup import LookupProposer
from medusaforge.drafters.medusa_proposer import MedusaProposer

VOCAB = 256
TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
PROMPT = torch.tensor([5, 17, 99, 3, 42, 7, 11, 64])
NEW_TOKENS = 40
NGRAM = 4


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(6)  # a seed whose greedy text repeats no 4-gram in 56 tokens (random models loop)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def expected(base):
    """The base's greedy continuation, a few tokens longer than decoded so drafts can run past it."""
    mask = torch.ones_like(PROMPT[None])
    out = base.generate(PROMPT[None], attention_mask=mask, max_new_tokens=NEW_TOKENS + 8, do_sample=False, pad_token_id=0)
    stream = out[0].tolist()
    ngrams = [tuple(stream[i : i + NGRAM]) for i in range(len(stream) - NGRAM + 1)]
    assert len(set(ngrams)) == len(ngrams), "the tiny model's text repeats a 4-gram: pick another seed"
    return stream[len(PROMPT) :]


def right_reference(expected):
    return PROMPT.tolist() + expected


def wrong_reference(expected):
    # Every 4-gram of the true stream, each followed by a token the stream never contains: a match is
    # always found, its first drafted token is always wrong, and no 4-gram across two windows can
    # equal a true one (each holds that token).
    stream = PROMPT.tolist() + expected
    absent = min(set(range(VOCAB)) - set(stream))
    return [t for i in range(NGRAM, len(stream)) for t in stream[i - NGRAM : i] + [absent]]


def oracle_heads(reference, right: bool, num_heads=3, topk=2):
    def candidates(hidden, tokens):
        rows = []
        for k in range(num_heads):
            position = len(tokens) + k  # head k proposes the token k + 1 after the root
            truth = reference[position] if position < len(reference) else 0
            wrong = [(truth + 101 + r) % VOCAB for r in range(topk)]
            rows.append([truth] + wrong[: topk - 1] if right else wrong)
        return torch.tensor(rows)

    return candidates


@pytest.mark.parametrize("right", [True, False])
def test_lookup_alone_is_lossless(base, expected, right):
    reference = right_reference(expected) if right else wrong_reference(expected)
    proposer = LookupProposer(num_tokens=6, min_ngram=NGRAM, max_ngram=NGRAM, reference=reference)
    result = speculative_generate(base, proposer, PROMPT, NEW_TOKENS)
    assert result.tokens == expected[:NEW_TOKENS]
    assert all(d > 0 for d in result.drafted)  # a 4-gram matched at every step
    if right:  # a 6-token chain all right: 7 tokens per step
        assert result.accepted[:-1] == [6] * (len(result.accepted) - 1)
        assert {source for source, _ in proposer.steps} == {"lookup"}
    else:
        assert sum(result.accepted) == 0
        assert {source for source, _ in proposer.steps} == {"none"}


def test_lookup_with_no_match_drafts_nothing_and_is_lossless(base, expected):
    proposer = LookupProposer(num_tokens=6, min_ngram=NGRAM, max_ngram=NGRAM)  # the text repeats no 4-gram
    result = speculative_generate(base, proposer, PROMPT, NEW_TOKENS)
    assert result.tokens == expected[:NEW_TOKENS]
    assert result.drafted == [0] * len(result.drafted)
    assert len(result.accepted) == NEW_TOKENS - 1


@pytest.mark.parametrize(
    "lookup_right, heads_right, lookup_tokens, source, accepted, candidates",
    [
        (True, False, 3, "lookup", 3, 9),
        (False, True, 3, "heads", 3, 9),
        # Candidates per step: the heads' 6 and the lookup chain's, less the nodes both propose.
        # The same 3 right tokens from both: one shared path, 6 + 3 - 3 candidates.
        (True, True, 3, "both", 3, 6),
        # Both right, lookup deeper: its 6-token path wins, the heads' 3 nodes on it are shared.
        (True, True, 6, "lookup", 6, 9),
        (False, False, 3, "none", 0, 9),
    ],
)
def test_hybrid_is_lossless_and_names_the_source_of_each_accepted_path(
    base, expected, lookup_right, heads_right, lookup_tokens, source, accepted, candidates
):
    reference = right_reference(expected)
    heads = MedusaProposer(None, TREE, candidates=oracle_heads(reference, heads_right))
    lookup_reference = right_reference(expected) if lookup_right else wrong_reference(expected)
    lookup = LookupProposer(num_tokens=lookup_tokens, min_ngram=NGRAM, max_ngram=NGRAM, reference=lookup_reference)
    proposer = HybridProposer(heads, lookup, model_nodes_on_match=None)  # merging only: no cut
    result = speculative_generate(base, proposer, PROMPT, NEW_TOKENS)
    assert result.tokens == expected[:NEW_TOKENS]
    steps = proposer.steps[:-1]  # the last step may be cut short by max_new_tokens
    assert steps == [(source, accepted)] * len(steps)
    assert set(result.drafted[:-1]) == {candidates}


def test_medusa_generate_takes_lookup_and_reports_sources(base, expected):
    reference = right_reference(expected)
    lookup = LookupProposer(num_tokens=3, min_ngram=NGRAM, max_ngram=NGRAM, reference=reference)
    result = medusa_generate(base, None, PROMPT, NEW_TOKENS, tree=TREE, candidates=oracle_heads(reference, False), lookup=lookup)
    assert result.tokens == expected[:NEW_TOKENS]
    assert len(result.sources) == len(result.accepted)
    assert set(result.sources[:-1]) == {"lookup"}
    # No heads' tree at all (a tree file that says "no drafting"): lookup alone.
    alone = medusa_generate(base, None, PROMPT, NEW_TOKENS, tree=[], lookup=lookup)
    assert alone.tokens == expected[:NEW_TOKENS]
    assert set(alone.sources[:-1]) == {"lookup"}


def test_accept_by_source_on_a_hand_made_run():
    sources = ["lookup", "heads", "none", "lookup", "both"]
    accepted = [5, 2, 0, 3, 1]
    assert accept_by_source(sources, accepted) == {
        "both": {"steps": 1, "share": 0.2, "accept_length": 2.0},
        "heads": {"steps": 1, "share": 0.2, "accept_length": 3.0},
        "lookup": {"steps": 2, "share": 0.4, "accept_length": 5.0},
        "none": {"steps": 1, "share": 0.2, "accept_length": 1.0},
    }


def test_eval_with_lookup_reports_accept_length_per_source(tmp_path):
    import json

    from helpers import save_tiny_model, write_jsonl

    from medusaforge.cli import main
    from medusaforge.drafters.medusa_heads import MedusaHeads
    from medusaforge.models import lm_head_of, load_base_model

    model_dir = save_tiny_model(tmp_path / "model")
    tiny = load_base_model(model_dir, check=False)
    torch.manual_seed(0)
    heads = MedusaHeads(tiny.config.hidden_size, tiny.config.vocab_size, 2, 1, base_model=str(model_dir))
    heads.init_from_base(lm_head_of(tiny).weight)
    heads_dir = heads.save(tmp_path / "heads")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello there, the cat sat. Hello there, the cat sat."}, {"prompt": "What is the capital of France?"}])
    out = tmp_path / "eval.json"
    main(["eval", "--model", str(model_dir), "--heads", str(heads_dir), "--prompts", str(prompts), "--max-new-tokens", "24",
          "--dtype", "fp32", "--warmup-tokens", "2", "--json", str(out), "--lookup", "true", "--lookup-tokens", "4"])
    result = json.loads(out.read_text())
    assert result["identical"] is True
    by_source = result["accept_by_source"]
    assert set(by_source) <= {"heads", "lookup", "both", "none"}
    assert sum(v["steps"] for v in by_source.values()) == result["verify_steps"]
    assert abs(sum(v["share"] for v in by_source.values()) - 1.0) < 1e-9
    mean = sum(v["steps"] * v["accept_length"] for v in by_source.values()) / result["verify_steps"]
    assert abs(mean - result["accept_length"]) < 1e-9


def test_hybrid_puts_the_lookup_chain_first_only_after_a_long_enough_match():
    from medusaforge.drafters.proposer import Verified

    # Heads always propose 50 -> 51 (top-1 of head 0) and 52 (rank 1), 53 under 50 (head 1).
    heads = MedusaProposer(None, [[0], [1], [0, 0]], candidates=lambda hidden, tokens: torch.tensor([[50, 52], [53, 54]]))
    lookup = LookupProposer(num_tokens=2, min_ngram=1, max_ngram=3, scale_by_match=False)
    hybrid = HybridProposer(heads, lookup, lookup_first_ngram=2, model_nodes_on_match=None)
    prefill = Verified(start=0, tokens=[1, 2, 3, 9], next_token=1, hidden=torch.zeros(4, 8))
    hybrid.update(prefill)
    # ... 1 2 3 9 1 2: the 2-gram [1, 2] matched, so the chain 3 9 takes nodes 1-2 and the heads follow.
    draft = hybrid.propose([1, 2, 3, 9, 1, 2], prefill)
    assert draft.tokens.tolist() == [2, 3, 9, 50, 52, 53]
    assert draft.parents == (-1, 0, 1, 0, 0, 3)
    assert draft.sources == (3, 1, 1, 2, 2, 2)  # bit 0: lookup (listed first), bit 1: heads
    # ... 7 9: only the 1-gram [9] matched, so the heads' tree keeps nodes 1-3 and the chain follows.
    hybrid.update(prefill)
    draft = hybrid.propose([1, 2, 3, 9, 1, 2, 7, 9], prefill)
    assert draft.tokens.tolist() == [9, 50, 52, 53, 1, 2]
    assert draft.parents == (-1, 0, 0, 1, 0, 4)


def test_hybrid_cuts_the_heads_tree_after_a_long_match_when_asked():
    from medusaforge.drafters.proposer import Verified

    heads = MedusaProposer(None, [[0], [1], [0, 0]], candidates=lambda hidden, tokens: torch.tensor([[50, 52], [53, 54]]))
    hybrid = HybridProposer(heads, LookupProposer(num_tokens=2, min_ngram=1, max_ngram=3, scale_by_match=False), model_nodes_on_match=1)
    prefill = Verified(start=0, tokens=[1, 2, 3, 9], next_token=1, hidden=torch.zeros(4, 8))
    hybrid.update(prefill)
    # The 2-gram [1, 2] matched: the chain 3 9, then only the heads' first node (50).
    draft = hybrid.propose([1, 2, 3, 9, 1, 2], prefill)
    assert draft.tokens.tolist() == [2, 3, 9, 50] and draft.parents == (-1, 0, 1, 0)
    # A 1-gram match is not long: the heads' whole tree stays.
    hybrid.update(prefill)
    assert hybrid.propose([1, 2, 3, 9, 1, 2, 7, 9], prefill).tokens.tolist() == [9, 50, 52, 53, 1, 2]


def test_hybrid_does_not_run_the_model_after_a_long_match_when_given_no_nodes():
    from medusaforge.drafters.proposer import Verified

    calls = []
    heads = MedusaProposer(None, [[0], [1], [0, 0]], candidates=lambda hidden, tokens: calls.append(1) or torch.tensor([[50, 52], [53, 54]]))
    hybrid = HybridProposer(heads, LookupProposer(num_tokens=2, min_ngram=1, max_ngram=3, scale_by_match=False), model_nodes_on_match=0)
    prefill = Verified(start=0, tokens=[1, 2, 3, 9], next_token=1, hidden=torch.zeros(4, 8))
    hybrid.update(prefill)
    # The 2-gram [1, 2] matched: the chain 3 9 alone, and the model was never asked.
    draft = hybrid.propose([1, 2, 3, 9, 1, 2], prefill)
    assert draft.tokens.tolist() == [2, 3, 9] and draft.parents == (-1, 0, 1) and calls == []
    # A 1-gram match is not long: the model runs and its whole tree stays.
    hybrid.update(prefill)
    assert hybrid.propose([1, 2, 3, 9, 1, 2, 7, 9], prefill).tokens.tolist() == [9, 50, 52, 53, 1, 2] and calls == [1]


def test_hybrid_free_draft_is_the_long_lookup_match_alone_and_never_runs_the_model():
    from medusaforge.drafters.proposer import Verified

    calls = []
    heads = MedusaProposer(None, [[0], [1], [0, 0]], candidates=lambda hidden, tokens: calls.append(1) or torch.tensor([[50, 52], [53, 54]]))
    hybrid = HybridProposer(heads, LookupProposer(num_tokens=2, min_ngram=1, max_ngram=3, scale_by_match=False))
    prefill = Verified(start=0, tokens=[1, 2, 3, 9], next_token=1, hidden=torch.zeros(4, 8))
    hybrid.update(prefill)
    # The 2-gram [1, 2] matched: the chain 3 9, named as lookup's.
    draft = hybrid.propose_free([1, 2, 3, 9, 1, 2], prefill)
    assert draft.tokens.tolist() == [2, 3, 9] and draft.parents == (-1, 0, 1) and calls == []
    step = Verified(start=6, tokens=[2, 3], next_token=7, hidden=torch.zeros(2, 8), nodes=torch.tensor([0, 1]))
    hybrid.update(step)
    assert hybrid.steps == [("lookup", 1)]
    # A 1-gram match is not long: no free draft, and still no model run.
    hybrid.update(prefill)
    assert hybrid.propose_free([1, 2, 3, 9, 1, 2, 7, 9], prefill) is None and calls == []


class CutToOneNode:
    """Adaptive drafting that always allows the model's draft one candidate node."""

    def reset(self):
        pass

    def next_size(self):
        return 1

    def record(self, drafted, nodes, seconds):
        raise AssertionError("a free draft's step was recorded")


def drafting_turned_off():
    from medusaforge.decoding.adaptive import AdaptiveDrafting
    from medusaforge.decoding.cost import StepCost

    # A drafted step costs 5x a plain one: no draft of the heads pays, so drafting turns off.
    return AdaptiveDrafting(StepCost(fixed=5.0, per_node=0.0), plain_seconds=1.0)


@pytest.mark.parametrize("make_adaptive", [drafting_turned_off, CutToOneNode], ids=["off", "cut-to-one-node"])
@pytest.mark.parametrize("lookup_right", [True, False])
def test_a_long_lookup_match_goes_whole_whatever_adaptive_drafting_allows(base, expected, lookup_right, make_adaptive):
    reference = right_reference(expected)
    lookup_reference = reference if lookup_right else wrong_reference(expected)
    heads = MedusaProposer(None, TREE, candidates=oracle_heads(reference, False))  # the heads never pay
    lookup = LookupProposer(num_tokens=3, min_ngram=NGRAM, max_ngram=NGRAM, reference=lookup_reference)
    result = speculative_generate(base, HybridProposer(heads, lookup), PROMPT, NEW_TOKENS, adaptive=make_adaptive())
    assert result.tokens == expected[:NEW_TOKENS]
    # A 4-gram matches on every step: its 3-token chain is verified whole, neither dropped nor cut to
    # one node, and no such step is recorded (it says nothing about the heads' draft).
    assert set(result.drafted[:-1]) == {3}
    assert set(result.accepted[:-1]) == ({3} if lookup_right else {0})
