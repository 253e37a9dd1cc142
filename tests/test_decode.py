"""Medusa greedy decoding against model.generate() on tiny random models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from medusaforge.decoding.adaptive import AdaptiveDrafting
from medusaforge.decoding.cost import StepCost
from medusaforge.decoding.decoder import medusa_generate, speculative_generate
from medusaforge.decoding.tree import build_tree_buffers, verify_attention_mask
from medusaforge.decoding.verify import crop_cache, keep_cache_entries, new_cache, prefill, run_decoder, verify_step
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.drafters.medusa_proposer import path_tree, prepare_heads
from medusaforge.drafters.proposer import DraftTree

VOCAB = 256
TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]]
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None, **SIZES)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None, **SIZES)
    return Qwen2ForCausalLM(config).eval()


def hf_greedy(base, prompt, max_new_tokens, eos=None):
    out = base.generate(
        prompt[None], max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0, attention_mask=torch.ones_like(prompt[None])
    )
    return out[0, len(prompt) :].tolist()


def oracle(reference, right: bool, num_heads=4, topk=2):
    """Candidates from the known greedy continuation `reference` (prompt + tokens): rank 0 is the
    true future token when `right`, and no rank ever is when not."""

    def propose(hidden, tokens):
        rows = []
        for k in range(num_heads):
            position = len(tokens) + k  # head k proposes the token after the root, + k
            truth = reference[position] if position < len(reference) else 0
            wrong = [(truth + 1 + r) % VOCAB for r in range(topk)]
            rows.append([truth] + wrong[: topk - 1] if right else wrong)
        return torch.tensor(rows)

    return propose


PROMPT = torch.tensor([5, 17, 99, 3, 42, 7])


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("right", [True, False])
def test_greedy_equals_generate_with_oracle_heads(make_model, right):
    base = make_model()
    expected = hf_greedy(base, PROMPT, 40)
    reference = PROMPT.tolist() + hf_greedy(base, PROMPT, 48)
    result = medusa_generate(base, None, PROMPT, 40, tree=TREE, candidates=oracle(reference, right))
    assert result.tokens == expected
    mean_accept = sum(result.accept_lengths) / result.num_steps
    if right:  # the deepest path is 4 candidates, + the base's own token
        assert mean_accept > 4 and max(result.accept_lengths) == 5 and result.num_steps <= 10
    else:
        assert mean_accept == 1 and result.num_steps == 39


def test_greedy_equals_generate_with_random_heads():
    base = tiny_llama(seed=1)
    heads = MedusaHeads(64, VOCAB, num_heads=3)
    heads.init_from_base(base.lm_head.weight)
    prepare_heads(heads, base)
    expected = hf_greedy(base, PROMPT, 30)
    result = medusa_generate(base, heads, PROMPT, 30, tree=TREE[:-1])
    assert result.tokens == expected


def test_shared_and_truncated_heads_decode():
    base = tiny_llama(seed=2)
    for kwargs in (dict(shared_lm_head=True), dict(head_vocab_size=100)):
        heads = prepare_heads(MedusaHeads(64, VOCAB, num_heads=2, **kwargs), base)
        heads.init_from_base(base.lm_head.weight)
        result = medusa_generate(base, heads, PROMPT, 12, tree=[[0], [1], [0, 0]])
        assert result.tokens == hf_greedy(base, PROMPT, 12)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 6, 7])
def test_max_new_tokens_is_exact_even_when_a_step_accepts_more(max_new_tokens):
    base = tiny_llama()
    reference = PROMPT.tolist() + hf_greedy(base, PROMPT, 20)
    result = medusa_generate(base, None, PROMPT, max_new_tokens, tree=TREE, candidates=oracle(reference, True))
    assert result.tokens == hf_greedy(base, PROMPT, max_new_tokens)
    assert len(result.tokens) == max_new_tokens and result.stopped_by == "length"


@pytest.mark.parametrize("stop_index", [0, 3, 6])
def test_stops_exactly_at_eos(stop_index):
    base = tiny_llama()
    continuation = hf_greedy(base, PROMPT, 30)
    eos = continuation[stop_index]
    expected = hf_greedy(base, PROMPT, 30, eos=eos)
    assert expected[-1] == eos and len(expected) <= stop_index + 1
    reference = PROMPT.tolist() + continuation + [0] * 8
    result = medusa_generate(base, None, PROMPT, 30, eos_token_ids=[eos], tree=TREE, candidates=oracle(reference, True))
    assert result.tokens == expected and result.stopped_by == "eos"


def test_cache_after_accepted_path_equals_token_by_token_cache():
    base = tiny_llama()
    decoder = base.get_decoder()
    buffers = build_tree_buffers(path_tree(TREE).parents)
    # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [1,0], 6 [0,0,0], 7 [0,0,0,0]
    tokens = torch.tensor([9, 30, 31, 40, 41, 42, 50, 60])
    nodes = torch.tensor([0, 1, 3, 6])  # accept root -> [0] -> [0, 0] -> [0, 0, 0]
    with torch.inference_mode():
        tree_cache = new_cache(base)
        run_decoder(decoder, PROMPT[None], torch.arange(6)[None], tree_cache)
        mask = verify_attention_mask(buffers, 6, torch.float32)
        run_decoder(decoder, tokens[None], (6 + buffers.depths)[None], tree_cache, mask)
        keep_cache_entries(tree_cache, 6, nodes)

        step_cache = new_cache(base)
        run_decoder(decoder, PROMPT[None], torch.arange(6)[None], step_cache)
        for offset, token in enumerate(tokens[nodes].tolist()):
            run_decoder(decoder, torch.tensor([[token]]), torch.tensor([[6 + offset]]), step_cache)

    assert tree_cache.get_seq_length() == step_cache.get_seq_length() == 10
    for tree_layer, step_layer in zip(tree_cache.layers, step_cache.layers):
        torch.testing.assert_close(tree_layer.keys, step_layer.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tree_layer.values, step_layer.values, atol=1e-5, rtol=1e-5)


def test_tree_deeper_than_heads_is_refused():
    base = tiny_llama()
    heads = prepare_heads(MedusaHeads(64, VOCAB, num_heads=2), base)
    with pytest.raises(ValueError, match="depth 4"):
        medusa_generate(base, heads, PROMPT, 5, tree=TREE)


def test_a_batch_of_several_sequences_is_refused():
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"one sequence at a time.*\[2, 6\]"):
        medusa_generate(base, None, torch.stack([PROMPT, PROMPT]), 5, tree=TREE, candidates=oracle([0] * 64, True))
    one = medusa_generate(base, None, PROMPT[None], 5, tree=TREE, candidates=oracle([0] * 64, False))
    assert one.tokens == hf_greedy(base, PROMPT, 5)  # [1, T] is one sequence


class RandomTreeOracle:
    """A different tree every step, from the known continuation: a chain of the true tokens of
    random length, with wrong siblings before each true node (so its index moves), or no draft."""

    feature_layers = ()

    def __init__(self, reference, seed=0):
        self.reference = reference
        self.rng = torch.Generator().manual_seed(seed)
        self.updates = []

    def draw(self, n):
        return int(torch.randint(n, (1,), generator=self.rng))

    def update(self, verified):
        self.updates.append((verified.start, len(verified.tokens)))

    def propose(self, tokens, verified):
        if self.draw(5) == 0:
            return None
        node_tokens, parents, last_true = [tokens[-1]], [-1], 0
        for token in self.reference[len(tokens) : len(tokens) + self.draw(5)]:
            for _ in range(self.draw(3)):
                node_tokens.append((token + 1 + self.draw(VOCAB - 1)) % VOCAB)
                parents.append(last_true)
            node_tokens.append(token)
            parents.append(last_true)
            last_true = len(node_tokens) - 1
        return DraftTree(torch.tensor(node_tokens), tuple(parents))


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_qwen2])
def test_dynamic_trees_and_skipped_drafts_stay_identical_to_generate(make_model):
    base = make_model()
    expected = hf_greedy(base, PROMPT, 40)
    proposer = RandomTreeOracle(PROMPT.tolist() + hf_greedy(base, PROMPT, 48))
    result = speculative_generate(base, proposer, PROMPT, 40)
    assert result.tokens == expected
    assert 0 in result.drafted and max(result.accept_lengths) > 2  # both kinds of step happened
    # update: once after the prefill (start 0, the prompt), then after every step at the next position
    assert proposer.updates[0] == (0, len(PROMPT))
    position = len(PROMPT)
    for (start, count), accepted in zip(proposer.updates[1:], result.accepted):
        assert start == position and count == accepted + 1
        position += count


@pytest.mark.parametrize("right", [True, False])
def test_adaptive_drafting_stays_identical_and_stops_drafting_when_wrong(right):
    base = tiny_llama()
    expected = hf_greedy(base, PROMPT, 60)
    reference = PROMPT.tolist() + hf_greedy(base, PROMPT, 68)
    # a verify step costs 2x a plain one plus a little per node: drafting pays only when right
    adaptive = AdaptiveDrafting(StepCost(fixed=2.0, per_node=0.01), plain_seconds=1.0)
    result = medusa_generate(base, None, PROMPT, 60, tree=TREE, candidates=oracle(reference, right), adaptive=adaptive)
    assert result.tokens == expected
    if right:
        assert 0 not in result.drafted
    else:  # after the first step, only the probes (every 8th step) draft
        assert result.drafted[0] == 7 and result.drafted[1:].count(0) >= 0.8 * (len(result.drafted) - 1)
    online = medusa_generate(base, None, PROMPT, 60, tree=TREE, candidates=oracle(reference, right), adaptive=AdaptiveDrafting())
    assert online.tokens == expected


def test_verify_step_returns_the_accepted_nodes_hidden_states_and_chosen_layers():
    base = tiny_llama()
    reference = PROMPT.tolist() + hf_greedy(base, PROMPT, 8)
    truth = reference[len(PROMPT) :]
    # root = the first greedy token; node 1 wrong, node 2 right, node 3 right under node 2
    draft = DraftTree(torch.tensor([truth[0], (truth[1] + 1) % VOCAB, truth[1], truth[2]]), (-1, 0, 0, 2))
    with torch.inference_mode():
        cache = new_cache(base)
        first = prefill(base, cache, PROMPT, feature_layers=(1, 2))
        verified = verify_step(base, cache, draft, feature_layers=(1, 2))
        full = base.get_decoder()(input_ids=torch.tensor([reference[:9]]), output_hidden_states=True)
    assert first.next_token == truth[0] and first.features.shape == (6, 2, 64)
    assert verified.nodes.tolist() == [0, 2, 3] and verified.accepted == 2
    assert verified.start == 6 and verified.tokens == truth[:3] and verified.next_token == truth[3]
    torch.testing.assert_close(verified.hidden, full.last_hidden_state[0, 6:9], atol=1e-5, rtol=1e-5)
    for i, layer in enumerate((1, 2)):
        torch.testing.assert_close(verified.features[:, i], full.hidden_states[layer][0, 6:9], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(first.features[:, i], full.hidden_states[layer][0, :6], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 9


def test_sampling_draws_the_next_token_from_the_base_distribution():
    """With every candidate rejected, the step's new token is a sample of softmax(logits / T) after
    the root: its empirical mean token id must match the exact mean."""
    base = tiny_llama()
    temperature = 0.1  # a random tiny model is nearly uniform (mean id ~127.5); sharpened, the mean is ~147
    draft = DraftTree(torch.tensor([PROMPT[-1].item(), 1, 2, 3]), (-1, 0, 1, 2))
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        probs = torch.softmax(base(input_ids=PROMPT[None]).logits[0, -1] / temperature, dim=-1)
        cache = new_cache(base)
        prefill(base, cache, PROMPT[:-1])
        samples = []
        for _ in range(400):
            # threshold min(1, huge * exp(-H)) = 1 rejects every candidate
            verified = verify_step(base, cache, draft, temperature=temperature, typical_epsilon=1.0, typical_alpha=1e9, generator=generator)
            assert verified.accepted == 0
            samples.append(verified.next_token)
            crop_cache(cache, len(PROMPT) - 1)
    ids = torch.arange(VOCAB, dtype=torch.float64)
    exact_mean = float((probs.double() * ids).sum())
    exact_std = float((probs.double() * (ids - exact_mean) ** 2).sum().sqrt())
    assert exact_std > 20  # several likely tokens far apart: a wrong distribution shows in the mean
    mean = sum(samples) / len(samples)
    assert abs(mean - exact_mean) < 4 * exact_std / len(samples) ** 0.5
