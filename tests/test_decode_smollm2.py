"""Medusa greedy decoding on the real SmolLM2-135M-Instruct equals model.generate()."""

import pytest
import torch
import torch.nn.functional as F

from medusaforge.decoding.adaptive import AdaptiveDrafting
from medusaforge.decoding.decoder import medusa_generate
from medusaforge.drafters.medusa_proposer import prepare_heads
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.models import final_hidden_states, load_base_model, load_tokenizer
from medusaforge.data.prompts import encode_prompt

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


def quick_heads(base, sequence: torch.Tensor, prompt_length: int, num_heads=2, steps=12) -> MedusaHeads:
    """Heads fitted for a few steps to the base's own continuation of one prompt: enough for
    multi-token acceptance, so the test exercises accepted paths and KV compaction for real."""
    hidden = final_hidden_states(base, sequence[None])[0].detach()  # [T, hidden]
    heads = MedusaHeads(hidden.shape[-1], base.config.vocab_size, num_heads=num_heads, shared_lm_head=True)
    heads.init_from_base(base.lm_head.weight)
    optimizer = torch.optim.Adam(heads.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = 0.0
        for k in range(num_heads):
            positions = slice(prompt_length - 1, len(sequence) - k - 2)
            logits = heads.head_logits(hidden[positions], k)
            loss = loss + F.cross_entropy(logits.float(), sequence[prompt_length + k + 1 :])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return heads


def test_smollm2_medusa_greedy_is_identical_to_generate():
    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    base = load_base_model(MODEL, dtype=torch.float32)
    eos = [tokenizer.eos_token_id]
    prompts = ["Write a haiku about the sea.", "List three uses of a paper clip."]
    encoded = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    expected = []
    for ids in encoded:
        out = base.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        expected.append(out[0, len(ids) :])
    heads = quick_heads(base, torch.cat([encoded[0], expected[0]]), len(encoded[0]))
    prepare_heads(heads, base)

    tree = [[0], [1], [2], [0, 0], [0, 1], [1, 0]]
    results = [medusa_generate(base, heads, ids, 40, eos, tree) for ids in encoded]
    for result, reference in zip(results, expected):
        assert result.tokens == reference.tolist()
    # the first prompt is the one the heads were fitted on: several tokens per step
    assert sum(results[0].accept_lengths) / results[0].num_steps > 1.5
    # adaptive drafting (timing its own steps) may shrink or skip drafts, never change a token
    adaptive = AdaptiveDrafting()
    for ids, reference in zip(encoded, expected):
        assert medusa_generate(base, heads, ids, 40, eos, tree, adaptive=adaptive).tokens == reference.tolist()
