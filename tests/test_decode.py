"""Medusa greedy decoding against model.generate() on tiny random models."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from medusaforge.decoding.decoder import medusa_generate
from medusaforge.decoding.tree import build_tree_buffers, verify_attention_mask
from medusaforge.decoding.verify import keep_cache_entries, new_cache, run_decoder
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.drafters.medusa_proposer import path_tree, prepare_heads

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
    if right:  # the deepest path is 4 candidates, + the base's own token
        assert max(result.accept_lengths) == 5 and result.num_steps <= 10
    else:
        assert set(result.accept_lengths) == {1} and result.num_steps == 39


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


def test_sampling_with_typical_acceptance_runs_and_respects_limits():
    base = tiny_llama()
    heads = prepare_heads(MedusaHeads(64, VOCAB, num_heads=3), base)
    heads.init_from_base(base.lm_head.weight)
    generator = torch.Generator().manual_seed(0)
    result = medusa_generate(base, heads, PROMPT, 25, tree=TREE[:-1], temperature=0.8, generator=generator)
    assert len(result.tokens) == 25 and all(0 <= t < VOCAB for t in result.tokens)


def test_tree_deeper_than_heads_is_refused():
    base = tiny_llama()
    heads = prepare_heads(MedusaHeads(64, VOCAB, num_heads=2), base)
    with pytest.raises(ValueError, match="depth 4"):
        medusa_generate(base, heads, PROMPT, 5, tree=TREE)
