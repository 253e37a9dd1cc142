"""benchmarks/serve_check.py's arithmetic, without vLLM: counter deltas -> acceptance, and the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_check.py"
spec = importlib.util.spec_from_file_location("serve_check", SCRIPT)
serve_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_check)


def test_acceptance_counts_only_the_measured_pass():
    # Warm-up left 2 drafts; the pass adds 10 drafts of 3 tokens, 6 accepted: 5 at position 0, 1 at 1.
    before = {"num_drafts": 2, "num_accepted_tokens": 1, "num_accepted_tokens_per_pos": [1, 0, 0]}
    after = {"num_drafts": 12, "num_accepted_tokens": 7, "num_accepted_tokens_per_pos": [6, 1, 0]}
    result = serve_check.acceptance(before, after)
    assert result["num_drafts"] == 10 and result["num_accepted_tokens"] == 6
    assert result["accept_length"] == 1.6
    assert result["acceptance_per_position"] == [0.5, 0.1, 0.0]
    assert serve_check.acceptance({}, {})["accept_length"] is None


def report(mode, token_ids, tokens_per_second, accept_length=None):
    run = {"token_ids": token_ids, "tokens_per_second": tokens_per_second, "accept_length": accept_length,
           "acceptance_per_position": [0.25] if accept_length else []}
    return {"mode": mode, "loaded": True, "one_at_a_time": run, "batched": dict(run, tokens_per_second=2 * tokens_per_second)}


def test_table_compares_every_mode_with_plain_greedy():
    rows = serve_check.table([
        report("plain", [[1, 2], [3]], 10.0),
        report("medusa", [[1, 2], [3]], 12.0, accept_length=1.25),
        report("ngram", [[1, 2], [4]], 5.0, accept_length=1.1),
        {"mode": "eagle3", "loaded": False, "error": "ValueError: no such folder"},
    ]).splitlines()
    assert rows[2].startswith("| plain | yes | True / True |")
    assert "| medusa | yes | True / True | 1.250 | 0.250 | 12.0 | 24.0 | 1.20x / 1.20x |" == rows[3]
    assert "| ngram | yes | False / False |" in rows[4] and "0.50x / 0.50x" in rows[4]
    assert rows[5].startswith("| eagle3 | no: ValueError: no such folder")


def test_bf16_is_chosen_only_with_native_bf16():
    assert serve_check.default_dtype(["avx512f", "avx512_bf16"]) == "bfloat16"  # this host (AMD Zen 4)
    assert serve_check.default_dtype(["amx_bf16", "amx_tile"]) == "bfloat16"
    assert serve_check.default_dtype(["avx512f"]) == "float32"


def test_each_mode_subprocess_gets_every_option_but_the_report_path():
    args = serve_check.parse_args(["--base", "B", "--prompts", "P.json", "--out", "report.json", "--medusa", "M"])
    assert args.passthrough == ["--base", "B", "--prompts", "P.json", "--medusa", "M"]
    assert serve_check.speculative_config("plain", args) is None
    assert serve_check.speculative_config("ngram", args)["method"] == "ngram"
