"""Judging drafted outputs against greedy: identical, a near-tie, or a bug.

The pure rule on hand-worked logits, then `medusaforge eval` in bf16 on a tiny model: a decoder
that emits a token the base ranks low is reported as a bug and `eval` exits non-zero; one that
picks the other side of an exact tie is a near-tie and `eval` passes.
"""

import json

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import medusaforge.decoding.loading as decode_loading
from medusaforge.cli import main
from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.identity import (
    BUG, NEAR_TIE, count_outputs, judge_parting, near_tie_bound, outputs_line, verdict,
)
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.models import lm_head_of, load_base_model

from helpers import save_tiny_model, write_jsonl


def logits(*values) -> torch.Tensor:
    return torch.tensor(values)


def test_bf16_bound_is_a_share_of_the_top_logit():
    # 2^-5 of the top logit: 20 -> 0.625, 32 -> 1.0; below magnitude 1 the bound stays 2^-5 = 0.03125.
    assert near_tie_bound(20.0, torch.bfloat16) == 0.625
    assert near_tie_bound(-32.0, torch.bfloat16) == 1.0
    assert near_tie_bound(0.25, torch.bfloat16) == 0.03125
    assert near_tie_bound(16.0, torch.float16) == 0.0625  # 2^-8 * 16
    assert near_tie_bound(16.0, torch.float32) == 2.0**-13  # 2^-17 * 16


def test_one_bf16_step_below_the_top_is_a_near_tie_and_a_low_token_is_a_bug():
    # Top logit 20 (bound 0.625): the runner-up at 19.875 is one bf16 step down; token 2 is 10 down.
    at = logits(20.0, 19.875, 10.0)
    assert judge_parting(at, 1, torch.bfloat16) == {"class": NEAR_TIE, "gap": 0.125, "bound": 0.625}
    assert judge_parting(at, 2, torch.bfloat16) == {"class": BUG, "gap": 10.0, "bound": 0.625}
    # In fp32 the same 0.125 is far beyond rounding (bound 20 * 2^-17 = 1.5e-4).
    assert judge_parting(at, 1, torch.float32)["class"] == BUG


def test_the_gap_is_to_the_drafted_token_not_the_top_two_margin():
    # The top two tie, but the drafted token is third, 4 below: not a near-tie.
    at = logits(24.0, 24.0, 20.0)
    assert judge_parting(at, 2, torch.bfloat16) == {"class": BUG, "gap": 4.0, "bound": 0.75}


def test_the_bound_is_inclusive_and_small_logits_keep_a_floor():
    assert judge_parting(logits(32.0, 31.0), 1, torch.bfloat16)["class"] == NEAR_TIE  # gap 1.0 = bound 1.0
    assert judge_parting(logits(32.0, 30.75), 1, torch.bfloat16)["class"] == BUG  # 1.25 > 1.0
    # Logits near 0: bound 2^-5 * 1; a gap of 0.015625 is within it, 0.5 is not.
    assert judge_parting(logits(0.015625, 0.0, -0.5), 1, torch.bfloat16)["class"] == NEAR_TIE
    assert judge_parting(logits(0.015625, 0.0, -0.484375), 2, torch.bfloat16)["class"] == BUG


def test_an_output_that_stops_early_or_runs_on_is_a_bug():
    assert judge_parting(logits(1.0, 0.0), None, torch.bfloat16) == {"class": BUG, "gap": None, "bound": 0.03125}


def test_counts_per_class_and_the_words_printed():
    near_small = {"class": NEAR_TIE, "gap": 0.125, "bound": 0.625}
    near_large = {"class": NEAR_TIE, "gap": 0.5, "bound": 0.625}
    bug = {"class": BUG, "gap": 3.0, "bound": 0.625}
    counts = count_outputs([None, near_small, near_large, bug])
    assert counts == {"identical": 1, "near_tie": 2, "bug": 1, "largest_near_tie_gap": 0.5}
    assert count_outputs([None, None])["largest_near_tie_gap"] is None
    assert verdict(None) == "identical"
    assert verdict(near_small, 7) == "near-tie at token 7 (gap 0.125)"
    assert verdict(bug, 7).startswith("MISMATCH at token 7 (gap 3 > bound 0.625)")
    line = outputs_line(count_outputs([None, near_small, near_large]), torch.bfloat16)
    assert line.startswith("outputs against greedy: 1/3 identical, 2 part at a near-tie (largest gap 0.5")
    assert ", 0 part otherwise" in line and "MISMATCH" not in line
    assert "MISMATCH" in outputs_line(counts, torch.bfloat16) and ", 1 part otherwise" in outputs_line(counts, torch.bfloat16)


def make_inputs(tmp_path, tie_first_token: bool = False):
    """A tiny model, heads for it, two prompts. tie_first_token: the token greedy emits first on
    prompt 1 gets a twin (an identical lm_head row, both doubled so bf16 cannot move the top
    elsewhere): an exact tie that either token resolves honestly. Returns (model, heads, prompts, twins)."""
    model_dir = save_tiny_model(tmp_path / "model")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello there"}, {"turns": ["What is the capital of France?"]}])
    twins = None
    if tie_first_token:
        model = LlamaForCausalLM.from_pretrained(model_dir)
        ids = encode_prompt(AutoTokenizer.from_pretrained(model_dir), load_prompts(str(prompts))[0])
        with torch.no_grad():
            first = int(model(input_ids=ids[None]).logits[0, -1].argmax())
            twin = model.config.vocab_size - 1 if first != model.config.vocab_size - 1 else 0
            weight = model.lm_head.weight
            weight[first] *= 2
            weight[twin] = weight[first]
        model.save_pretrained(model_dir)
        twins = {first: twin, twin: first}
    base = load_base_model(model_dir, check=False)
    torch.manual_seed(0)
    heads = MedusaHeads(base.config.hidden_size, base.config.vocab_size, 2, 1, base_model=str(model_dir))
    heads.init_from_base(lm_head_of(base).weight)
    return model_dir, heads.save(tmp_path / "heads"), prompts, twins


def run_bf16_eval(tmp_path, model_dir, heads_dir, prompts) -> tuple[int, dict]:
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(model_dir), "--heads", str(heads_dir), "--prompts", str(prompts),
                 "--max-new-tokens", "8", "--dtype", "bf16", "--warmup-tokens", "2", "--json", str(out)])
    return code, json.loads(out.read_text())


def test_eval_in_bf16_refuses_a_decoder_that_emits_a_wrong_token(tmp_path, monkeypatch, capsys):
    model_dir, heads_dir, prompts, _ = make_inputs(tmp_path)
    honest = decode_loading.medusa_generate

    def wrong_decoder(base, heads, ids, *args, **kwargs):
        # The real decoder, then its first token swapped for the one the base ranks last.
        result = honest(base, heads, ids, *args, **kwargs)
        with torch.no_grad():
            result.tokens[0] = int(base(input_ids=ids[None]).logits[0, -1].argmin())
        return result

    monkeypatch.setattr(decode_loading, "medusa_generate", wrong_decoder)
    code, report = run_bf16_eval(tmp_path, model_dir, heads_dir, prompts)
    printed = capsys.readouterr()
    assert code != 0  # the JSON is written, then eval fails
    assert report["dtype"] == "bfloat16" and report["identical"] is False
    assert report["outputs"] == {"identical": 0, "near_tie": 0, "bug": 2, "largest_near_tie_gap": None}
    for mismatch in report["mismatches"]:
        assert mismatch["index"] == 0 and mismatch["class"] == BUG and mismatch["gap"] > mismatch["bound"]
    assert printed.out.count("MISMATCH at token 0") == 2 and "2 part otherwise" in printed.out
    assert "decoding bug" in printed.err


def test_eval_in_bf16_calls_the_other_side_of_an_exact_tie_a_near_tie(tmp_path, monkeypatch, capsys):
    model_dir, heads_dir, prompts, twins = make_inputs(tmp_path, tie_first_token=True)
    honest = decode_loading.medusa_generate

    def other_twin(*args, **kwargs):
        result = honest(*args, **kwargs)
        result.tokens[0] = twins.get(result.tokens[0], result.tokens[0])
        return result

    monkeypatch.setattr(decode_loading, "medusa_generate", other_twin)
    code, report = run_bf16_eval(tmp_path, model_dir, heads_dir, prompts)
    printed = capsys.readouterr().out
    assert code == 0
    outputs = report["outputs"]
    assert outputs["bug"] == 0 and outputs["near_tie"] >= 1 and outputs["identical"] + outputs["near_tie"] == 2
    assert report["prompts_detail"][0]["first_difference"]["index"] == 0  # prompt 1 parts at the twin
    assert outputs["largest_near_tie_gap"] <= report["prompts_detail"][0]["first_difference"]["bound"]
    assert "MISMATCH" not in printed and "near-tie at token 0" in printed
    assert f"{outputs['near_tie']} part at a near-tie" in printed and "0 part otherwise" in printed
