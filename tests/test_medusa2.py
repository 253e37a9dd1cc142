"""Medusa-2: heads-weight schedules, the chunked KL, LoRA student/teacher, merging, and the recipe
end to end (two stages through the CLI) on a tiny random model."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import learnable_data, save_tiny_model, tiny_llama, tiny_tokenizer
from torch.nn import functional as F

from medusaforge.cli import main
from medusaforge.config import parse_config
from medusaforge.drafters.medusa_heads import load_heads
from medusaforge.training.medusa2_base import base_loss_sum, make_lora_student, make_teacher, quality_report
from medusaforge.training.medusa2_loss import heads_weight_at, linear_kl_divergence
from medusaforge.models import base_fingerprint, final_hidden_states
from medusaforge.training.medusa1 import Medusa1Config
from medusaforge.training.medusa2 import Medusa2Config

LORA_TARGETS = ["q_proj", "v_proj", "gate_proj"]


def lora_options(rank=4, targets=LORA_TARGETS):
    return SimpleNamespace(lora_rank=rank, lora_alpha=8.0, lora_dropout=0.0, lora_target_modules=targets)


def randomise_lora_b(model, seed=1):
    """peft starts lora_B at zero (adapters are a no-op); give them values so they matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))


# ---- pure maths ------------------------------------------------------------------------------


def test_heads_weight_schedules_hand_worked():
    # 10 steps, warm-up over half of them (5 steps), peak 0.2.
    constant = [heads_weight_at(s, 10, 0.2, "constant", 0.5) for s in range(10)]
    assert constant == [0.2] * 10
    linear = [heads_weight_at(s, 10, 0.2, "linear", 0.5) for s in range(10)]
    assert linear == pytest.approx([0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.2, 0.2, 0.2, 0.2])
    sine = [heads_weight_at(s, 10, 0.2, "sine", 0.5) for s in range(10)]
    # 0.2 * sin(pi/2 * s/5): sin 18 deg = 0.309017, sin 36 = 0.587785, sin 54 = 0.809017, sin 72 = 0.951057
    assert sine == pytest.approx([0.0, 0.0618034, 0.117557, 0.1618034, 0.1902113, 0.2, 0.2, 0.2, 0.2, 0.2], abs=1e-6)
    # No warm-up: every schedule is the peak from step 0.
    assert heads_weight_at(0, 10, 0.2, "sine", 0.0) == 0.2 and heads_weight_at(0, 10, 0.2, "linear", 0.0) == 0.2
    with pytest.raises(ValueError, match="schedule"):
        heads_weight_at(0, 10, 0.2, "cosine", 0.5)


def test_chunked_kl_matches_materialised_kl_and_its_gradients():
    torch.manual_seed(0)
    x = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    teacher_x, teacher_weight = torch.randn(7, 16), torch.randn(50, 16)
    reference = F.kl_div(
        F.log_softmax(x @ weight.T, -1), F.log_softmax(teacher_x @ teacher_weight.T, -1), log_target=True, reduction="sum"
    )
    reference.backward()
    expected_grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    chunked = linear_kl_divergence(x, weight, teacher_x, teacher_weight, chunk_size=3)
    (2.0 * chunked).backward()
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(x.grad, 2.0 * expected_grads[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad, 2.0 * expected_grads[1], rtol=1e-4, atol=1e-5)
    # The same distribution on both sides: exactly zero.
    assert linear_kl_divergence(teacher_x, teacher_weight, teacher_x, teacher_weight).item() == 0.0


def test_quality_report_hand_worked():
    # 4 tokens: mean NLL ln 2 before (perplexity 2), ln 4 after (4); one greedy token of 4 changed.
    before = {"nll_sum": 4 * math.log(2), "num_tokens": 4, "greedy": torch.tensor([1, 2, 3, 4])}
    after = {"nll_sum": 4 * math.log(4), "num_tokens": 4, "greedy": torch.tensor([1, 2, 9, 4])}
    report = quality_report(before, after)
    assert report["perplexity_before"] == pytest.approx(2.0) and report["perplexity_after"] == pytest.approx(4.0)
    assert report["perplexity_change"] == pytest.approx(1.0) and report["greedy_changed_fraction"] == 0.25


# ---- LoRA student and teacher ------------------------------------------------------------------


@pytest.fixture
def tiny_setup():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, len(tokenizer), (2, 12), generator=generator)
    return tokenizer, model, input_ids


def test_lora_teacher_is_the_original_model_bit_for_bit(tiny_setup):
    _, model, input_ids = tiny_setup
    with torch.no_grad():
        original_logits = model(input_ids=input_ids).logits
        original_hidden = final_hidden_states(model, input_ids)
    peft_model = make_lora_student(model, lora_options())
    randomise_lora_b(peft_model)
    teacher = make_teacher(model, peft_model, "lora")
    teacher_hidden, teacher_weight = teacher(input_ids, None)
    assert torch.equal(teacher_hidden, original_hidden)
    assert torch.equal(teacher_hidden @ teacher_weight.T, original_logits)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=input_ids).logits, original_logits)  # the adapters are on again


def test_kl_term_is_zero_at_step_0(tiny_setup):
    _, model, input_ids = tiny_setup
    peft_model = make_lora_student(model, lora_options())  # lora_B starts at zero
    peft_model.train()
    teacher = make_teacher(model, peft_model, "lora")
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
    hidden = final_hidden_states(model, input_ids)
    kl = base_loss_sum(model, hidden, input_ids, loss_mask, None, "distill", teacher, chunk_size=5)
    assert kl.item() == 0.0
    kl.backward()  # and it is connected to the adapters (zero gradient, but a gradient)
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_A" in n)


def test_lora_trains_only_adapter_weights(tiny_setup):
    _, model, _ = tiny_setup
    peft_model = make_lora_student(model, lora_options())
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == set(LORA_TARGETS)


def test_merge_then_load_gives_the_adapters_on_logits(tiny_setup, tmp_path):
    _, model, input_ids = tiny_setup
    peft_model = make_lora_student(model, lora_options())
    randomise_lora_b(peft_model)
    peft_model.eval()
    with torch.no_grad():
        adapters_on = model(input_ids=input_ids).logits
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, adapters_on, rtol=1e-5, atol=1e-5)
    assert base_fingerprint(loaded) == base_fingerprint(merged)


# ---- the recipe through the CLI ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def common_args(model_dir, data, out):
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--num-heads", "2",
        "--batch-size", "8", "--eval-fraction", "0.2", "--progress", "false", "--dtype", "fp32",
    ]


def run_two_stages(tmp_path, model_dir, num_conversations, stage1_args, stage2_args):
    """Stage 1 (heads only) then stage 2 (medusa2 with LoRA, from the stage-1 heads) -> their out folders."""
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=num_conversations, reply_words=14)
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert main(common_args(model_dir, data, stage1) + stage1_args) == 0
    argv = common_args(model_dir, data, stage2) + [
        "--mode", "medusa2", "--init-heads", str(stage1 / "heads"), "--lora-rank", "4", "--lora-target-modules", *LORA_TARGETS,
    ]
    assert main(argv + stage2_args) == 0
    return stage1, stage2


def test_two_stage_recipe_lora_distill_with_merge(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    from transformers import AutoModelForCausalLM

    stage1, stage2 = run_two_stages(
        tmp_path, tiny_model_dir, 40, ["--max-steps", "4", "--lr", "3e-3"],
        ["--max-steps", "4", "--lr", "1e-2", "--heads-weight-schedule", "linear", "--merge", "--eval-every", "1"],
    )

    summary = json.loads((stage2 / "summary.json").read_text())
    quality = summary["base_quality"]
    assert quality["num_tokens"] > 0 and math.isfinite(quality["perplexity_after"])
    assert quality["perplexity_after"] != quality["perplexity_before"]  # the base did train
    metrics = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    # --eval-every 1: a held-out line after every step but the last (summary.json holds that one),
    # the heads on the base as trained so far, with the training seconds so far.
    interim = [line for line in metrics if "held_out_top1" in line]
    assert [line["step"] for line in interim] == [1, 2, 3]
    assert all(len(line["held_out_top1"]) == 2 and len(line["held_out_loss"]) == 2 for line in interim)
    seconds = [line["seconds"] for line in interim]
    assert seconds == sorted(seconds) and seconds[-1] <= summary["train_seconds"]
    assert [line["step"] for line in metrics if "loss" in line] == [1, 2, 3, 4]
    assert metrics[0]["heads_weight"] == 0.0 and metrics[0]["base_loss"] == 0.0  # KL of the untouched base
    assert metrics[0]["lr_heads"] == pytest.approx(4 * metrics[0]["lr_base"])

    # Only the adapted modules' weights moved; norms, embeddings and lm_head are the original ones.
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(stage2 / "merged")
    original_state, merged_state = original.state_dict(), merged.state_dict()
    assert original_state.keys() == merged_state.keys()
    changed = {name for name in original_state if not torch.equal(original_state[name], merged_state[name])}
    assert changed and all(any(f".{t}." in name for t in LORA_TARGETS) for name in changed)
    assert (stage2 / "adapter" / "adapter_config.json").is_file()
    assert (stage2 / "merged" / "tokenizer_config.json").is_file()

    # The heads moved from stage 1, belong to the merged base, and refuse the original one.
    stage1_heads = load_heads(stage1 / "heads", base=original)
    heads = load_heads(stage2 / "heads", base=merged)
    assert not torch.equal(heads.heads[0].lm_head.weight, stage1_heads.heads[0].lm_head.weight)
    with pytest.raises(ValueError, match="different base weights"):
        load_heads(stage2 / "heads", base=original)


@pytest.mark.parametrize("base_loss", ["distill", "ce"])
def test_full_fine_tuning_saves_the_base_and_matching_heads(tmp_path, tiny_model_dir, monkeypatch, base_loss):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    from transformers import AutoModelForCausalLM

    data = learnable_data(tmp_path / "data.jsonl", num_conversations=20, reply_words=14)
    out = tmp_path / "full"
    argv = common_args(tiny_model_dir, data, out) + [
        "--mode", "medusa2", "--base-train", "full", "--base-loss", base_loss, "--max-steps", "2", "--lr", "1e-3",
        "--heads-weight-schedule", "constant",
    ]
    assert main(argv) == 0
    assert not (out / "adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    load_heads(out / "heads", base=merged)  # the fingerprint matches the saved base
    assert json.loads((out / "summary.json").read_text())["base_loss"] == base_loss


def test_each_recipe_has_its_own_options(tmp_path):
    from medusaforge.cli import parse_command

    _, medusa1, _ = parse_command(["train", "--data", "x.jsonl"])
    _, medusa2, _ = parse_command(["train", "--method", "medusa2", "--data", "x.jsonl", "--resume", "auto"])
    assert type(medusa1) is Medusa1Config and not hasattr(medusa1, "lora_rank")
    assert type(medusa2) is Medusa2Config and medusa2.resume == "auto" and not hasattr(medusa2, "cache")
    # Options of the other recipe are refused, not silently ignored.
    with pytest.raises(SystemExit):
        parse_command(["train", "--data", "x.jsonl", "--lora-rank", "4"])
    path = tmp_path / "m2.yaml"
    path.write_text("mode: medusa2\ndata: x.jsonl\ncache: runs/cache\n")
    with pytest.raises(ValueError, match=f"{path}: unknown option 'cache' for Medusa2Config"):
        parse_command(["train", "--config", str(path)])
    with pytest.raises(ValueError, match="lm_head"):
        parse_config(Medusa2Config, ["--data", "x.jsonl", "--lora-target-modules", "q_proj", "lm_head"])
    assert parse_config(Medusa2Config, ["--data", "x.jsonl", "--eval-every", "5"]).eval_every == 5
    with pytest.raises(ValueError, match="--eval-every must be >= 0"):
        parse_config(Medusa2Config, ["--data", "x.jsonl", "--eval-every", "-1"])
    assert not hasattr(medusa2, "max_minutes")  # no time budget in this recipe (yet)
    path.write_text("mode: medusa2\nbase_train: partial\ndata: x.jsonl\n")
    with pytest.raises(ValueError, match=f"{path}: option .base_train.: .partial. is not one of"):
        parse_command(["train", "--config", str(path)])


def test_stage_two_from_truncated_vocabulary_heads_keeps_their_token_map(tmp_path, tiny_model_dir, monkeypatch):
    # The demo's stage-1 heads project onto a truncated vocabulary; stage 2 must train them as they are.
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    from transformers import AutoModelForCausalLM

    stage1, stage2 = run_two_stages(
        tmp_path, tiny_model_dir, 20, ["--max-steps", "2", "--head-vocab", "24"], ["--max-steps", "2", "--lr", "1e-3", "--merge"]
    )
    stage1_heads = load_heads(stage1 / "heads", base=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    heads = load_heads(stage2 / "heads", base=AutoModelForCausalLM.from_pretrained(stage2 / "merged"))
    assert heads.config.head_vocab_size == 24 and torch.equal(heads.token_map, stage1_heads.token_map)
    assert heads.heads[0].lm_head.weight.shape == stage1_heads.heads[0].lm_head.weight.shape
    assert not torch.equal(heads.heads[0].lm_head.weight, stage1_heads.heads[0].lm_head.weight)
