"""benchmarks/serve_check.py's pure parts, without vLLM: counter deltas -> acceptance, the choice of K
from a sweep, the order the engines run in, and the recorded tables, on hand-made reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_check.py"
spec = importlib.util.spec_from_file_location("serve_check", SCRIPT)
serve_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_check)
import serve_check_report as report_lib  # noqa: E402  (put on sys.path by serve_check.py, its neighbour)


def test_acceptance_counts_only_the_measured_pass():
    # Warm-up left 2 drafts; the pass adds 10 drafts of 3 tokens, 6 accepted: 5 at position 0, 1 at 1.
    before = {"num_drafts": 2, "num_accepted_tokens": 1, "num_accepted_tokens_per_pos": [1, 0, 0]}
    after = {"num_drafts": 12, "num_accepted_tokens": 7, "num_accepted_tokens_per_pos": [6, 1, 0]}
    result = report_lib.acceptance(before, after)
    assert result["num_drafts"] == 10 and result["num_accepted_tokens"] == 6
    assert result["accept_length"] == 1.6
    assert result["acceptance_per_position"] == [0.5, 0.1, 0.0]
    assert report_lib.acceptance({}, {})["accept_length"] is None


def points(*speeds):
    return [{"k": k, "tokens_per_second": s} for k, s in enumerate(speeds, start=1)]


def test_k_is_the_smallest_within_two_percent_of_the_fastest():
    # Fastest is K=3 at 50.0; 2% below is 49.0: K=2 (49.5) qualifies, K=1 (40) does not.
    assert report_lib.choose_k(points(40.0, 49.5, 50.0, 45.0)) == 2
    # Nothing within 2% but the fastest itself.
    assert report_lib.choose_k(points(40.0, 45.0, 50.0, 48.0)) == 3
    assert report_lib.choose_k(points(52.0, 45.0)) == 1
    assert report_lib.choose_k([]) is None
    assert report_lib.choose_k([{"k": 1, "tokens_per_second": None}]) is None


def test_sweep_stops_after_two_slower_k_in_a_row():
    assert not report_lib.sweep_should_stop(points(40.0, 45.0))
    assert not report_lib.sweep_should_stop(points(40.0, 45.0, 44.0))  # one slower: keep going
    assert report_lib.sweep_should_stop(points(40.0, 45.0, 44.0, 43.0))
    assert not report_lib.sweep_should_stop(points(40.0, 45.0, 44.0, 46.0))  # a new best
    assert report_lib.sweep_should_stop(points(50.0, 45.0, 44.0))
    assert not report_lib.sweep_should_stop([])


def test_rounds_alternate_modes_with_the_order_rotated():
    assert report_lib.alternation(["plain", "ngram", "medusa"], 2) == [
        (0, "plain"), (0, "ngram"), (0, "medusa"), (1, "ngram"), (1, "medusa"), (1, "plain")]
    assert report_lib.alternation(["plain", "ngram"], 3) == [
        (0, "plain"), (0, "ngram"), (1, "ngram"), (1, "plain"), (2, "plain"), (2, "ngram")]
    assert report_lib.alternation([], 2) == []


def run(tokens_per_second, token_ids, drafts=0, accepted=0, per_position=()):
    return {"tokens_per_second": tokens_per_second, "token_ids": token_ids, "num_drafts": drafts,
            "num_accepted_tokens": accepted, "num_accepted_tokens_per_pos": list(per_position)}


def mode_report(mode, k, one, batched):
    return {"mode": mode, "k": k, "loaded": True, "runs": {"mt-bench": {"one_at_a_time": one, "batched": batched}}}


def test_table_takes_ratios_within_a_round_and_pools_acceptance():
    same, other = [[1, 2], [3]], [[1, 2], [4]]
    by_round = [
        {"plain": mode_report("plain", None, run(10.0, same), run(100.0, same)),
         "ngram": mode_report("ngram", 2, run(12.0, same, 10, 6, [4, 2]), run(90.0, same, 10, 2, [2, 0]))},
        {"plain": mode_report("plain", None, run(20.0, same), run(100.0, same)),
         # Round 2: faster host, but ngram's second output differs from plain's in the batch.
         "ngram": mode_report("ngram", 2, run(22.0, same, 30, 10, [8, 2]), run(110.0, other, 10, 4, [3, 1]))},
    ]
    by_round[0]["suffix"] = {"mode": "suffix", "loaded": False, "error": "ImportError: Arctic | Inference"}
    rows = report_lib.table(by_round, ["plain", "ngram", "suffix"], ["mt-bench"]).splitlines()
    assert rows[2] == "| plain (no drafting) | - | mt-bench | - | - | 15.0 | 1.00x | 100.0 | 1.00x | - |"
    # Accepted length pooled: one at a time 1 + 16/40 = 1.40, batched 1 + 6/20 = 1.30; per position 12/40, 4/40.
    # vs plain per round: 12/10 = 1.20 and 22/20 = 1.10 -> median 1.15; batched 0.90 and 1.10 -> 1.00.
    # Identical: one at a time 2/2; batched 1/2 (the second prompt differs in round 2).
    assert rows[3] == ("| vLLM `ngram` | 2 | mt-bench | 1.40 / 1.30 | 0.30, 0.10 | 17.0 | 1.15x (1.10-1.20) | "
                       "100.0 | 1.00x (0.90-1.10) | 2/2 / 1/2 |")
    assert rows[4] == "| vLLM `suffix` (Arctic Inference) | - | not run: ImportError: Arctic / Inference | | | | | | | |"


def test_one_round_gives_plain_ratios_without_a_range():
    by_round = [{"plain": mode_report("plain", None, run(10.0, [[1]]), run(40.0, [[1]])),
                 "medusa": mode_report("medusa", 1, run(8.0, [[2]], 4, 1, [1]), run(20.0, [[1]], 4, 2, [2]))}]
    row = report_lib.table(by_round, ["plain", "medusa"], ["mt-bench"]).splitlines()[3]
    assert row == "| vLLM `medusa`, our heads' export | 1 | mt-bench | 1.25 / 1.50 | 0.25 | 8.0 | 0.80x | 20.0 | 0.50x | 0/1 / 1/1 |"


def test_sweep_table_shows_every_k_and_the_pick():
    sweeps = {"ngram": {"points": [{"k": 1, "tokens_per_second": 40.0, "accept_length": 1.5},
                                   {"k": 2, "tokens_per_second": 44.0, "accept_length": 1.9}], "chosen": 2},
              "ours-heads": {"points": [], "chosen": None, "error": "RuntimeError: skipped: cannot import"}}
    rows = report_lib.sweep_table(sweeps).splitlines()
    assert rows[0] == "| mode | K=1 | K=2 | chosen K |"
    assert rows[2] == "| vLLM `ngram` | 40.0 tok/s, 1.50 | 44.0 tok/s, 1.90 | 2 |"
    assert rows[3].endswith("| - | - | none: RuntimeError: skipped: cannot import |")


def test_each_mode_is_configured_as_vllm_and_our_proposer_expect(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"mt-bench": ["a", "b", "c"], "copy-heavy": ["d", "e", "f"], "sweep": ["g", "h", "i"]}))
    args = serve_check.parse_args(["--base", "B", "--prompts", str(prompts), "--out", "report.json", "--medusa", "M",
                                   "--ours-heads", "H", "--num-prompts", "2"])
    assert args.passthrough == ["--base", "B", "--prompts", str(prompts), "--medusa", "M", "--ours-heads", "H",
                                "--num-prompts", "2"]
    assert serve_check.speculative_config("plain", None, args) is None
    assert serve_check.speculative_config("ngram", 3, args)["num_speculative_tokens"] == 3
    assert serve_check.speculative_config("medusa", 2, args) == {"method": "medusa", "model": "M", "num_speculative_tokens": 2}
    # Repeated prompts must not be replayed from suffix decoding's cache of past responses.
    assert serve_check.speculative_config("suffix", None, args)["suffix_decoding_max_cached_requests"] == 0
    ours = serve_check.speculative_config("ours-heads", 4, args)
    assert ours == {"method": "custom_class", "model": "medusaforge.serving.vllm.proposer.MedusaforgeProposer",
                    "num_speculative_tokens": 4}
    assert serve_check.mode_env("ours-heads", args) == {"MEDUSAFORGE_DRAFTER": "H", "MEDUSAFORGE_LOOKUP": "1"}
    assert serve_check.mode_env("ngram", args) == {}
    # Measured sets are cut to --num-prompts; the sweep's prompts are not.
    assert serve_check.read_prompts(prompts, 2) == {"mt-bench": ["a", "b"], "copy-heavy": ["d", "e"], "sweep": ["g", "h", "i"]}
    # Without an EAGLE-3 folder its rows are not run, and say why.
    modes, skipped = serve_check.planned_modes(args)
    assert modes == ["plain", "ngram", "suffix", "medusa", "ours-heads"]
    assert skipped == {"eagle3": "no --eagle3 folder given", "ours-eagle3": "no --ours-eagle3 folder given"}


def test_an_older_prompts_file_is_the_mt_bench_set(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["a", "b"]))
    assert serve_check.read_prompts(prompts, 16) == {"mt-bench": ["a", "b"]}


def test_bf16_is_chosen_only_with_native_bf16():
    assert serve_check.default_dtype(["avx512f", "avx512_bf16"]) == "bfloat16"
    assert serve_check.default_dtype(["amx_bf16", "amx_tile"]) == "bfloat16"
    assert serve_check.default_dtype(["avx512f"]) == "float32"


def test_positions_that_never_accept_are_folded():
    assert report_lib.per_position_cell([0.5, 0.25, 0.0, 0.0]) == "0.50, 0.25; 0 at 3-4"
    assert report_lib.per_position_cell([0.5, 0.0]) == "0.50; 0 at 2"
    assert report_lib.per_position_cell([0.0, 0.0, 0.0]) == "0.00; 0 at 2-3"
    assert report_lib.per_position_cell([0.5, 0.1]) == "0.50, 0.10"
    assert report_lib.per_position_cell([]) == "-"
