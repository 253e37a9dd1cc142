"""medusaforge inside vLLM 0.32, end to end in the engine: our custom-class proposer and the
truncated-heads plugin load, greedy outputs of a batch equal plain vLLM's, the plugin's heads
project to the truncated vocabulary only, and the first drafts equal our own drafter's on the same
context.

Each mode starts one engine in the vLLM venv (tests/vllm_generate.py in a subprocess; ~30-60 s
each on a 2-core CPU). Without that venv the tests are skipped, and say so. The venv needs
medusaforge installed (`.venv-vllm/bin/pip install --no-deps -e .`) for the proposer class and the
plugin's entry point to be found.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer

from medusaforge.cli import main
from medusaforge.drafters.chain import EAGLE3, HEADS, LOOKUP, ChainDrafter, ChainRequest, heads_chain, lookup_chain
from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base
from medusaforge.drafters.lookup import NgramIndex
from medusaforge.drafters.medusa_heads import MedusaHeads

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("MEDUSAFORGE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
PROPOSER = "medusaforge.serving.vllm.proposer.MedusaforgeProposer"
NUM_HEADS, HEAD_VOCAB, MAX_TOKENS = 3, 64, 24
# HF hidden_states indices; 1 twice: vLLM captures a layer once, the proposer must still feed it twice.
EAGLE_FEATURES = (0, 1, 1)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.is_file(),
                       reason=f"no vLLM venv at {VLLM_PYTHON}: run `make serve-check` (or "
                              "`bash benchmarks/serve_check.sh install`) to create it"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama vLLM's CPU attention accepts (head_dim 64), random truncated heads in our layout
    and their vLLM export, three prompts (one repeats itself, so lookup has something to match), and
    plain vLLM's greedy outputs."""
    root = tmp_path_factory.mktemp("vllm-serving")
    tokenizer = tiny_tokenizer()
    base = tiny_llama(len(tokenizer), seed=0, hidden_size=256)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    torch.manual_seed(1)
    heads = MedusaHeads(256, len(tokenizer), NUM_HEADS, head_vocab_size=HEAD_VOCAB, base_model=str(root / "base"))
    # Token 0 in the map: every widened row then has a lower in-map twin (interop/full_vocab.py).
    heads.token_map.copy_(torch.sort(torch.cat([torch.tensor([0]), 1 + torch.randperm(len(tokenizer) - 1)[: HEAD_VOCAB - 1]])).values)
    for name, parameter in heads.named_parameters():
        parameter.data.normal_(std=0.05 if "blocks" in name else 1.0)
    heads.save(root / "heads")
    assert main(["export", "--heads", str(root / "heads"), "--format", "vllm", "--out", str(root / "heads-vllm")]) == 0
    prompts = [tokenizer("The quick brown fox jumps over the lazy dog. The quick brown fox")["input_ids"],
               tokenizer("What is the capital of France?")["input_ids"],
               tokenizer("Hello there, how are you today?")["input_ids"]]
    plain = run_engine(root, "plain", prompts, None, {})
    return {"root": root, "base": base.float().eval(), "heads": heads.eval(), "prompts": prompts, "plain": plain}


def run_engine(root: Path, name: str, prompts, speculative_config, env) -> dict:
    spec = {"base": str(root / "base"), "prompts": prompts, "max_tokens": MAX_TOKENS, "dtype": "float32",
            "speculative_config": speculative_config, "env": env}
    (root / f"{name}.json").write_text(json.dumps(spec))
    result = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_generate.py"), str(root / f"{name}.json"),
                             str(root / f"{name}-out.json")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((root / f"{name}-out.json").read_text())


def run_our_proposer(root: Path, name: str, prompts, drafter: Path, lookup: bool) -> tuple[dict, list[dict]]:
    """vLLM with our custom-class proposer drafting from `drafter`, every draft logged -> (the engine's
    outputs, one draft-log entry per drafted request and step)."""
    log = root / f"{name}-drafts.jsonl"
    env = {"MEDUSAFORGE_DRAFTER": str(drafter), "MEDUSAFORGE_LOOKUP": "1" if lookup else "0", "MEDUSAFORGE_MAX_BATCH": "8",
           "MEDUSAFORGE_DRAFT_LOG": str(log)}
    speculative_config = {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": NUM_HEADS}
    ours = run_engine(root, name, prompts, speculative_config, env)
    return ours, [json.loads(line) for line in log.read_text().splitlines()]


def our_heads_chain(base, heads, tokens: list[int]) -> list[int]:
    """What our heads draft after `tokens` (the last one is the root, not yet run): their argmax
    chain on the base's final hidden state at the position before the root."""
    with torch.no_grad():
        hidden = base(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
        return heads_chain(heads, hidden[None], NUM_HEADS)[0].tolist()


def test_our_proposer_in_vllm_equals_plain_and_drafts_our_chains(setup):
    root = setup["root"]
    ours, entries = run_our_proposer(root, "custom", setup["prompts"], root / "heads", lookup=True)
    assert ours["token_ids"] == setup["plain"]["token_ids"]
    assert ours["drafter"]["class"] == "MedusaforgeProposer"
    # The first step prefills every prompt, in the order they were added.
    order = list(dict.fromkeys(e["req_id"] for e in entries))
    assert len(order) == 3
    checked = {LOOKUP: 0, HEADS: 0}
    for entry in entries:
        index = order.index(entry["req_id"])
        prompt = setup["prompts"][index]
        output = setup["plain"]["token_ids"][index]
        if entry["num_tokens"] > len(prompt) + len(output):
            continue  # the last step may sample past max_tokens; the engine drops those tokens after
        tokens = prompt + output[: entry["num_tokens"] - len(prompt)]
        if entry["source"] == LOOKUP:
            assert entry["chain"] == lookup_chain(NgramIndex(tokens=tokens), NUM_HEADS, 2)
            checked[LOOKUP] += 1
        elif entry["source"] == HEADS and checked[HEADS] < 12:  # the first steps: each costs a base forward here
            assert entry["chain"] == our_heads_chain(setup["base"], setup["heads"], tokens), entry
            checked[HEADS] += 1
    assert checked[LOOKUP] > 0 and checked[HEADS] > 0, checked


def test_plugin_serves_truncated_heads_at_their_cost_and_equals_plain(setup):
    root = setup["root"]
    ours = run_engine(root, "plugin", setup["prompts"], {"method": "medusa", "model": str(root / "heads-vllm"),
                                                         "num_speculative_tokens": NUM_HEADS}, {})
    assert ours["token_ids"] == setup["plain"]["token_ids"]
    assert ours["drafter"] == {"class": "TruncatedMedusa", "lm_head_rows": [HEAD_VOCAB] * NUM_HEADS}
    # The first propose call drafts for every prompt after its prefill: the root is the first token sampled.
    (first,) = ours["medusa_drafts"]
    expected = [our_heads_chain(setup["base"], setup["heads"], prompt + setup["plain"]["token_ids"][i][:1])
                for i, prompt in enumerate(setup["prompts"])]
    assert first == expected


def test_our_proposer_with_an_eagle3_draft_equals_plain_and_drafts_its_greedy_chain(setup):
    root, base = setup["root"], setup["base"]
    torch.manual_seed(2)
    draft = Eagle3Draft(draft_config_from_base(base.config, HEAD_VOCAB, EAGLE_FEATURES), base.get_input_embeddings())
    draft_ids = setup["heads"].token_map  # a truncated draft vocabulary: target id = draft id + d2t[draft id]
    t2d = torch.zeros(base.config.vocab_size, dtype=torch.bool)
    t2d[draft_ids] = True
    draft.set_vocab(draft_ids - torch.arange(HEAD_VOCAB), t2d)
    for name, parameter in draft.named_parameters():
        parameter.data.normal_(std=0.5 if "norm" not in name else 0.1).add_(1.0 if "norm" in name else 0.0)
    draft.eval().save(root / "eagle3" / "draft")  # a `train --method eagle3` output folder
    ours, entries = run_our_proposer(root, "eagle3", setup["prompts"], root / "eagle3", lookup=False)
    assert ours["token_ids"] == setup["plain"]["token_ids"]
    order = list(dict.fromkeys(e["req_id"] for e in entries))
    assert {e["source"] for e in entries} == {EAGLE3}
    checked = 0
    for entry in entries[:12]:  # the first steps; each reference below re-runs the base on the whole context
        index = order.index(entry["req_id"])
        prompt, output = setup["prompts"][index], setup["plain"]["token_ids"][index]
        tokens = prompt + output[: entry["num_tokens"] - len(prompt)]
        with torch.no_grad():
            states = base(torch.tensor([tokens[:-1]]), output_hidden_states=True).hidden_states
        features = torch.stack([states[i][0] for i in EAGLE_FEATURES], dim=1)  # [positions, 3, H]
        reference = ChainDrafter(NUM_HEADS, eagle3=draft, lookup=False).step([ChainRequest("r", tokens, 0, features=features)])
        assert entry["chain"] == reference[0], entry
        checked += 1
    assert checked == 12
