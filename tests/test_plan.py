"""`train --plan`: the memory terms on hand-worked shapes, and every shipped 8B recipe planned against
its shipped config.json (meta device: no weights, no tokenizer, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medusaforge.cli import main
from medusaforge.training.plan import (
    BaseShape, Workload, base_forward_bytes, base_weight_bytes, eagle3_step_bytes, format_rows, medusa_activation_bytes,
    plan_row, rank_sequences, trainable_state_bytes,
)

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "configs").glob("*-train.yaml") if p.name.startswith(("llama3.1-8b", "qwen3-8b")))
SHIPPED = {"meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b-instruct", "Qwen/Qwen3-8B": "qwen3-8b"}
# Parameter counts as published on the model cards (8.03B and 8.19B), which the meta build must reproduce.
PUBLISHED_PARAMETERS = {"llama-3.1-8b-instruct": 8_030_261_248, "qwen3-8b": 8_190_735_360}

# 4 layers of 100 parameters, an untied lm_head of 50, and 30 for the embedding and final norm: 480.
SMALL = BaseShape(num_layers=4, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4,
                  vocab_size=20, total_params=480, layer_params=100, lm_head_params=50)


def test_trainable_state_is_four_fp32_copies_and_ddp_adds_its_buckets():
    assert trainable_state_bytes(1000, 1, shard=False) == {"weights": 4000, "gradients": 4000, "optimizer": 8000, "comm": 0}
    assert trainable_state_bytes(1000, 4, shard=False)["comm"] == 4000  # DDP buckets: one more gradient copy
    # Fully sharded over 4: a quarter of each persistent term, plus gathered weights and unsharded gradients.
    assert trainable_state_bytes(1000, 4, shard=True) == {"weights": 1000, "gradients": 1000, "optimizer": 2000, "comm": 8000}


def test_a_sharded_base_keeps_its_share_of_the_layers_two_gathered_layers_and_the_edges():
    assert SMALL.edge_params == 30
    assert base_weight_bytes(SMALL, 8, shard=False) == 4 * 480
    assert base_weight_bytes(SMALL, 1, shard=True) == 4 * 480  # one process shards nothing
    # world 4: 400/4 = 100 layer values + 2 gathered layers (200) + edges 30 + lm_head 50 = 380.
    assert base_weight_bytes(SMALL, 4, shard=True) == 4 * 380


def test_base_forward_keeps_the_fp32_residual_stream_and_one_layer_of_temporaries():
    # 10 tokens: final hidden 10*8*4 = 320; the layer 10*(3*2*16 + 4*4*8) = 2240.
    assert base_forward_bytes(SMALL, 10, compute=2, keep_all_hidden=False) == 320 + 2240
    # EAGLE-3 keeps all L+1 = 5 hidden states.
    assert base_forward_bytes(SMALL, 10, compute=2, keep_all_hidden=True) == 5 * 320 + 2240


def test_medusa_activations_on_a_hand_worked_micro_batch():
    work = Workload(recipe="medusa1", sequences=2, length=5, compute=2, online=True, num_heads=2, num_layers=1,
                    head_vocab=20, chunk_size=4)
    # Per head: 10 tokens x 8 x (gathered 4 + ResBlock 2+2+4 + d/dx 4) = 1280, plus d/dW 20*8*4 = 640.
    # One chunk: 4 rows x 20 x (2 + 4 + 4) = 800.
    assert medusa_activation_bytes(SMALL, work) == 2 * (1280 + 640) + 800
    shared = Workload(**{**work.__dict__, "head_vocab": 0})
    assert medusa_activation_bytes(SMALL, shared) == 2 * 1280 + 800  # shared lm_head: no d/dW buffer


def test_eagle3_step_counts_the_attention_probabilities_of_every_earlier_step():
    # Per token, bf16: H terms 8*(3*(4+4+2) + 12 + 8) = 400; q/k/v 8*(4*2 + 8*1) = 128; MLP 4*2*16 = 128;
    # probabilities 2 heads x (3 + 1) keys x (4 fp32 + 2 bf16) = 48. Three tokens: 3 * 704.
    assert eagle3_step_bytes(SMALL, tokens=3, length=3, step=1, compute=2) == 3 * 704
    # fp32: no cast of the probabilities, and every compute-dtype term doubles.
    assert eagle3_step_bytes(SMALL, tokens=3, length=3, step=1, compute=4) == 3 * (8 * (3 * 12 + 24 + 16) + 8 * (16 + 8) + 4 * 4 * 16 + 2 * 4 * 4)


def test_ranks_share_the_global_micro_batch_and_the_row_adds_up():
    assert rank_sequences(8, 3) == 3 and rank_sequences(8, 8) == 1 and rank_sequences(1, 8) == 1
    work = Workload(recipe="medusa1", sequences=1, length=5, compute=2, online=True, num_heads=1, num_layers=1, head_vocab=20)
    row = plan_row(SMALL, 100, work, gpus=2, layout="ddp", base_loaded=True, runtime=7)
    # base, 16 B per trainable parameter + 4 for the DDP buckets, 2 for the bf16 autocast copies
    assert row.total == 4 * 480 + 2000 + 200 + sum(row.activations.values()) + 7
    assert plan_row(SMALL, 100, work, 2, "ddp", base_loaded=False, runtime=0).base_weights == 4 * 20 * 8  # lm_head only
    fits, too_small = format_rows([row], 1.0), format_rows([row], 1e-6)
    assert fits[1].endswith("yes") and too_small[1].endswith("NO")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_8b_recipe_plans_against_its_shipped_config(path, capsys):
    model = yaml.safe_load(path.read_text())["model"]
    folder = ROOT / "configs" / "models" / SHIPPED[model]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # architecture only: no weights, no tokenizer
    assert main(["train", "--config", str(path), "--model", str(folder), "--plan", "--plan-gpus", "1", "8"]) == 0
    out = capsys.readouterr().out
    assert f"base: {PUBLISHED_PARAMETERS[SHIPPED[model]]:,} parameters" in out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in ("1", "8")]
    assert [r[0] for r in rows][:1] == ["1"] and "8" in [r[0] for r in rows]
    replicated = next(r for r in rows if r[:2] == ["8", "ddp"])
    assert replicated[-1] == "yes", f"{path.name}: the shipped 8-GPU recipe must fit an 80 GiB GPU: {replicated}"


def test_the_eagle3_draft_of_llama_8b_has_the_hand_counted_parameters(capsys):
    # fc 3*4096*4096 + q 8192*4096 + k, v 2*8192*1024 + o 4096*4096 + MLP 3*4096*14336 + 4 norms of 4096
    # + lm_head 32000*4096 = 424,689,664 (the base embedding is frozen and not the draft's).
    expected = 3 * 4096 * 4096 + 8192 * 4096 + 2 * 8192 * 1024 + 4096 * 4096 + 3 * 4096 * 14336 + 4 * 4096 + 32000 * 4096
    main(["train", "--config", str(ROOT / "configs" / "llama3.1-8b-eagle3-train.yaml"),
          "--model", str(ROOT / "configs" / "models" / "llama-3.1-8b-instruct"), "--plan", "--plan-gpus", "8"])
    assert f"trainable: {expected:,} parameters" in capsys.readouterr().out


def test_a_model_without_a_config_gets_a_clear_error(tmp_path, capsys):
    assert main(["train", "--data", "x.jsonl", "--model", str(tmp_path), "--plan"]) == 1
    err = capsys.readouterr().err
    assert f"--model {tmp_path}: no local config.json to plan from" in err and "configs/models/qwen3-8b" in err
