"""`medusaforge eval` end to end on a tiny fp32 model: the JSON the issue asks for, both modes."""

import json

import pytest
import torch

from medusaforge.cli import main
from medusaforge.commands.eval import head_acceptance
from medusaforge.decoding.tree import save_tree
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.models import load_base_model, lm_head_of

from helpers import save_tiny_model, write_jsonl


def make_inputs(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    base = load_base_model(model_dir, check=False)
    torch.manual_seed(0)
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 2, 1, base_model=str(model_dir))
    heads.init_from_base(lm_head_of(base).weight)
    heads_dir = heads.save(tmp_path / "heads")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello there"}, {"turns": ["What is the capital of France?"]}])
    return model_dir, heads_dir, prompts


def run_eval(tmp_path, *extra) -> dict:
    model_dir, heads_dir, prompts = make_inputs(tmp_path)
    out = tmp_path / "eval.json"
    main(["eval", "--model", str(model_dir), "--heads", str(heads_dir), "--prompts", str(prompts),
          "--max-new-tokens", "12", "--dtype", "fp32", "--warmup-tokens", "2", "--json", str(out), *extra])
    return json.loads(out.read_text())


def assert_rates_match_the_timings(result: dict) -> None:
    """tok/s is tokens over seconds, summed over the prompts the same report lists, and each speedup
    is drafted tok/s over the other method's: an inverted or mis-summed ratio fails here."""
    detail = result["prompts_detail"]
    drafted_tokens, drafted_seconds = sum(r["medusa_tokens"] for r in detail), sum(r["medusa_s"] for r in detail)
    assert drafted_tokens > 0 and drafted_seconds > 0
    assert result["medusa_tokens_per_s"] == pytest.approx(drafted_tokens / drafted_seconds, rel=1e-9)
    if result["baseline_tokens_per_s"] is None:
        assert result["speedup"] is None
        return
    greedy_tokens, greedy_seconds = sum(r["baseline_tokens"] for r in detail), sum(r["baseline_s"] for r in detail)
    assert result["baseline_tokens_per_s"] == pytest.approx(greedy_tokens / greedy_seconds, rel=1e-9)
    assert result["speedup"] == pytest.approx((drafted_tokens / drafted_seconds) / (greedy_tokens / greedy_seconds), rel=1e-9)
    if result["prompt_lookup_tokens_per_s"] is not None:  # its timings are not itemised per prompt
        assert result["speedup_over_prompt_lookup"] == pytest.approx(
            result["medusa_tokens_per_s"] / result["prompt_lookup_tokens_per_s"], rel=1e-9)


def test_eval_writes_the_required_keys_and_outputs_are_identical_in_fp32(tmp_path):
    result = run_eval(tmp_path)
    for key in ("accept_length", "speedup", "medusa_tokens_per_s", "baseline_tokens_per_s", "identical", "num_prompts",
                "prompt_lookup_tokens_per_s", "speedup_over_prompt_lookup"):
        assert result[key] is not None, key
    assert_rates_match_the_timings(result)
    # Identical outputs: both methods wrote the same number of tokens.
    assert [r["medusa_tokens"] for r in result["prompts_detail"]] == [r["baseline_tokens"] for r in result["prompts_detail"]]
    assert result["num_prompts"] == 2 and result["identical"] is True and result["num_identical"] == 2
    assert set(result["accept_by_source"]) <= {"heads", "lookup", "both", "none"}  # prompt lookup is on by default
    steps = sum(r["verify_steps"] for r in result["prompts_detail"])
    # Every emitted token but the prefill's first comes from a verify step (a last step may be cut at the limit).
    emitted_by_steps = sum(int(n) * c for n, c in result["accept_length_histogram"].items())
    assert emitted_by_steps >= sum(r["medusa_tokens"] - 1 for r in result["prompts_detail"])
    assert steps == result["verify_steps"]
    assert result["accept_length"] == emitted_by_steps / steps  # the mean of the histogram it reports


def test_eval_without_baseline_reports_acceptance_only(tmp_path):
    result = run_eval(tmp_path, "--baseline", "false")
    assert result["speedup"] is None and result["identical"] is None and result["baseline_tokens_per_s"] is None
    assert result["prompt_lookup_tokens_per_s"] is None and result["speedup_over_prompt_lookup"] is None
    assert result["verify_steps"] > 0
    assert_rates_match_the_timings(result)
    assert result["config"]["adaptive"] is True


def test_a_no_drafting_tree_file_decodes_plainly_and_stays_identical(tmp_path):
    tree = tmp_path / "tree.json"
    save_tree([], tree, num_nodes=0, note="no tree beat plain decoding")
    result = run_eval(tmp_path, "--tree", str(tree), "--lookup", "false")
    assert result["identical"] is True
    assert result["plain_steps"] == result["verify_steps"] > 0 and result["accept_length"] == 1.0
    assert result["accept_by_source"] is None


def test_prompt_lookup_zero_skips_that_baseline_only(tmp_path):
    result = run_eval(tmp_path, "--prompt-lookup", "0")
    assert result["prompt_lookup_tokens_per_s"] is None and result["speedup_over_prompt_lookup"] is None
    assert result["identical"] is True
    assert_rates_match_the_timings(result)


def test_eval_without_adaptive_drafting_drafts_every_step(tmp_path):
    result = run_eval(tmp_path, "--adaptive", "false")
    assert result["identical"] is True and result["plain_steps"] == 0


def test_head_acceptance_on_hand_counts():
    # Steps accepted 0, 1, 2, 2 candidates: head 0 right in 3 of 4 steps, head 1 in 2 of 4 (2 of the 3 that reached it).
    rates = head_acceptance([0, 1, 2, 2], num_heads=2)
    assert rates["rate"] == [0.75, 0.5]
    assert rates["conditional"] == [0.75, 2 / 3]
