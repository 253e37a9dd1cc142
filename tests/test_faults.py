"""Fault injection through the real CLI entry point: malformed data, wrong templates, foreign or
damaged heads, damaged checkpoints and model files, NaN losses and a full disk.

Every case runs `medusaforge.cli.main([...])` and records (case, exit code, message) in a table
that is printed at the end (`pytest -s tests/test_faults.py`). An expected failure must return 1
(2 for option errors), print one `medusaforge CMD: error: ...` line that names the offending file
(and line, for data), and leave every file that existed before exactly as it was.
"""

import errno
import json
import shutil

import pytest
import torch
from helpers import CHATML_TEMPLATE, save_tiny_model, sharegpt, tiny_llama, tiny_tokenizer, write_jsonl

import medusaforge.training.checkpoint
import medusaforge.training.medusa1
import medusaforge.training.medusa2
from medusaforge.training.checkpoint import list_checkpoints, load_checkpoint
from medusaforge.cli import main
from medusaforge.drafters.medusa_heads import MedusaHeads

TABLE: list[tuple[str, int, str]] = []
GOOD = sharegpt(("human", "Hello there"), ("gpt", "The quick brown fox jumps over the lazy dog."))


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    width = max(len(name) for name, _, _ in TABLE)
    print(f"\n\n{len(TABLE)} faulty inputs tried through medusaforge.cli.main:")
    for name, code, message in TABLE:
        print(f"  {name:<{width}}  rc={code}  {message[:150]}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Model folders (good, no template, prefix-breaking template, content-altering template,
    truncated weights) and a finished 2-step run with checkpoints, built once."""
    root = tmp_path_factory.mktemp("faults")
    paths = {"root": root, "model": save_tiny_model(root / "tiny")}
    for name, template in [("no_template", None), ("prefix_template", "{{ messages|length }}" + CHATML_TEMPLATE),
                           ("upper_template", CHATML_TEMPLATE.replace("message['content']", "message['content']|upper"))]:
        tokenizer = tiny_tokenizer()
        tokenizer.chat_template = template
        tiny_llama(len(tokenizer)).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    paths["truncated_model"] = root / "truncated_model"
    shutil.copytree(paths["model"], paths["truncated_model"])
    weights = paths["truncated_model"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    paths["data"] = write_jsonl(root / "good.jsonl", [GOOD] * 6)
    paths["run"] = root / "run"
    assert main(base_args(paths, paths["data"], paths["run"]) + ["--save-every", "1", "--keep-last", "3"]) == 0
    return paths


def base_args(paths, data, out, max_steps=2):
    return ["train", "--model", str(paths["model"]), "--data", str(data), "--out", str(out), "--num-heads", "2",
            "--batch-size", "2", "--max-steps", str(max_steps), "--eval-fraction", "0", "--progress", "false",
            "--dtype", "fp32", "--max-length", "64"]


def snapshot(*roots):
    """{path: bytes} of every file under the given files/folders."""
    files = {}
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            files[path] = path.read_bytes()
    return files


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # option errors exit through argparse with code 2
        code = exit_.code
    return code, capsys.readouterr().err


def previous_output(tmp_path):
    """An --out folder holding an earlier run's files, which a failed run must not touch."""
    out = tmp_path / "out"
    (out / "heads").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (out / "summary.json").write_text('{"steps": 1}\n')
    (out / "heads" / "heads.safetensors").write_bytes(b"earlier heads")
    return out


def expect_error(name, argv, capsys, must_name, also=(), keep=(), code=1):
    """Run argv; assert exit code, a one-line error naming `must_name`, and `keep` files unchanged."""
    before = snapshot(*keep)
    got, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if "error:" in line]
    message = lines[-1] if lines else err.strip().splitlines()[-1]
    TABLE.append((name, got, message))
    assert got == code, err[-2000:]
    assert message.startswith(f"medusaforge {argv[0]}: error:") or code == 2, message
    assert str(must_name) in message, message
    for fragment in also:
        assert fragment in message, message
    assert snapshot(*keep) == before, f"{name}: files changed"
    return message


# ---- malformed training data ------------------------------------------------------------------

DATA_CASES = {
    "truncated JSON": ([GOOD, '{"conversations": [{"from": "human", "val'], ":2: malformed JSON"),
    "wrong type: conversations is a string": ([{"conversations": "hi"}], ":1: 'conversations'/'messages' must be a list"),
    "wrong type: content is a number": ([{"messages": [{"role": "user", "content": 5}]}], ":1: turn 0 content must be a string"),
    "wrong type: record is an array": (["[1, 2]"], ":1: expected a JSON object, got list"),
    "wrong type: turn is a string": ([{"conversations": ["hello"]}], ":1: turn 0 must be an object"),
    "unknown role": ([sharegpt(("robot", "hi"), ("gpt", "yo"))], ":1: turn 0 has unknown role 'robot'"),
    "no conversation key": ([{"text": "hello"}], ":1: no 'conversations' or 'messages' list"),
    "empty conversation": ([GOOD, {"conversations": []}], ":2: empty conversation"),
    "only system turns": ([{"messages": [{"role": "system", "content": "Be brief."}]}], ":1: only system turns"),
    "assistant speaks first": ([sharegpt(("gpt", "hi"), ("human", "yo"))], ":1: the first non-system turn must be a user turn"),
    "no assistant turn": ([sharegpt(("human", "hi"))], ":1: no assistant turn"),
    "empty file": ([], ": no usable conversations"),
    "10x max-length prompts (assistant cut off)": (
        [sharegpt(("human", "fox " * 640), ("gpt", "dog"))], ": no example keeps an assistant token within max_length=64"),
}


@pytest.mark.parametrize("name", DATA_CASES)
def test_malformed_data_is_refused_naming_file_and_line(name, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    records, fragment = DATA_CASES[name]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    out = previous_output(tmp_path)
    expect_error(name, base_args(world, data, out) + ["--overwrite"], capsys, f"{data}{fragment}", keep=[out, data])


def test_non_utf8_bytes_name_line_and_byte(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.jsonl"
    data.write_bytes((json.dumps(GOOD) + "\n").encode() * 2 + b'{"conversations": "\xff\xfe caf\xe9"}\n')
    out = previous_output(tmp_path)
    expect_error("non-UTF-8 bytes", base_args(world, data, out) + ["--overwrite"], capsys,
                 f"{data}:3: not valid UTF-8 (byte 19)", keep=[out, data])


def test_skip_invalid_counts_bad_records_and_trains_on_the_rest(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.jsonl"
    data.write_bytes((json.dumps(GOOD) + "\n").encode() * 4 + b'{"conv\n\xff\n{"messages": []}\n')
    code, err = run_cli(base_args(world, data, tmp_path / "out") + ["--skip-invalid"], capsys)
    TABLE.append(("3 bad records with --skip-invalid", code, next(l for l in err.splitlines() if "invalid records" in l)))
    assert code == 0 and "3 invalid records skipped" in err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["invalid_records_skipped"] == 3


def test_overlong_records_are_truncated_or_dropped_with_a_count(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    long_reply = sharegpt(("human", "hi"), ("gpt", "the lazy dog " * 160))  # ~10x --max-length 64
    long_prompt = sharegpt(("human", "fox " * 640), ("gpt", "dog"))
    data = write_jsonl(tmp_path / "data.jsonl", [GOOD, long_reply, GOOD, long_prompt])
    code, err = run_cli(base_args(world, data, tmp_path / "out"), capsys)
    message = next(line for line in err.splitlines() if line.startswith("dropped"))
    TABLE.append(("10x max-length records (kept truncated / dropped)", code, message))
    assert code == 0
    assert f"dropped 1 conversations whose assistant turns all lie beyond max_length=64 (first: {data}:4)" in message


# ---- chat templates --------------------------------------------------------------------------

@pytest.mark.parametrize("model, fragment", [
    ("no_template", "the tokenizer has no chat template"),
    ("prefix_template", "does not render a conversation's prefix as a prefix"),
    ("upper_template", "dropped or altered assistant turn 1"),
])
def test_a_wrong_chat_template_is_refused(model, fragment, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    out = previous_output(tmp_path)
    argv = base_args(world, world["data"], out) + ["--overwrite", "--model", str(world[model])]
    expect_error(f"chat template: {model}", argv, capsys, f"{world['data']}:1", also=[fragment], keep=[out])


# ---- heads, models and checkpoints -----------------------------------------------------------

def foreign_heads(tmp_path, hidden_size, fingerprint=""):
    heads = MedusaHeads(hidden_size, len(tiny_tokenizer()), num_heads=2, base_model="some-other-model")
    heads.config.base_fingerprint = fingerprint
    return heads.save(tmp_path / "foreign_heads")


def test_heads_from_another_model_are_refused(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    out = previous_output(tmp_path)
    for name, heads_dir, fragment in [
        ("heads of another model (hidden 32)", foreign_heads(tmp_path / "a", 32), "hidden_size 32 != base 64"),
        ("heads of another model (same shape)", foreign_heads(tmp_path / "b", 64, "0123456789abcdef"), "different base weights"),
        ("a full model given as heads", world["model"], "this is a full model"),
    ]:
        argv = base_args(world, world["data"], out) + ["--overwrite", "--init-heads", str(heads_dir)]
        expect_error(name, argv, capsys, heads_dir, also=[fragment], keep=[out, heads_dir])


def test_truncated_safetensors_files_are_refused_naming_the_file(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    out = previous_output(tmp_path)
    heads_dir = shutil.copytree(world["run"] / "heads", tmp_path / "heads")
    weights = heads_dir / "heads.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    argv = base_args(world, world["data"], out) + ["--overwrite", "--init-heads", str(heads_dir)]
    expect_error("truncated heads.safetensors (train --init-heads)", argv, capsys, weights, also=["corrupt or truncated"], keep=[out, heads_dir])
    export_out = tmp_path / "export"
    expect_error("truncated heads.safetensors (export)", ["export", "--heads", str(heads_dir), "--out", str(export_out)],
                 capsys, weights, keep=[heads_dir])
    assert not export_out.exists()
    model_weights = world["truncated_model"] / "model.safetensors"
    argv = base_args(world, world["data"], out) + ["--overwrite", "--model", str(world["truncated_model"])]
    expect_error("truncated model.safetensors (--model)", argv, capsys, model_weights, also=["corrupt or truncated"], keep=[out])


def damaged_copy(world, tmp_path, damage):
    run = shutil.copytree(world["run"], tmp_path / "run")
    checkpoint = list_checkpoints(run / "checkpoints")[-1]
    damage(checkpoint)
    return run, checkpoint


CHECKPOINT_CASES = {
    "truncated optimizer.safetensors": (lambda c: (c / "optimizer.safetensors").write_bytes(b"\x10\x00"), "optimizer.safetensors", "corrupt or truncated"),
    "truncated training_state.json": (lambda c: (c / "training_state.json").write_text('{"step": 2, "opt'), "training_state.json", "unreadable"),
    "training_state.json of wrong shape": (lambda c: (c / "training_state.json").write_text("[1]"), "training_state.json", "not a medusaforge training state"),
    "checkpoint without COMPLETE marker": (lambda c: (c / "COMPLETE").unlink(), "step-000002", "incomplete checkpoint"),
    "truncated checkpoint heads": (lambda c: (c / "heads" / "heads.safetensors").write_bytes(b"xx"), "heads.safetensors", "corrupt or truncated"),
}


@pytest.mark.parametrize("name", CHECKPOINT_CASES)
def test_damaged_checkpoints_are_refused_naming_the_file(name, world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    damage, file_name, fragment = CHECKPOINT_CASES[name]
    run, checkpoint = damaged_copy(world, tmp_path, damage)
    argv = base_args(world, world["data"], run) + ["--resume", str(checkpoint)]
    message = expect_error(f"--resume: {name}", argv, capsys, checkpoint, also=[file_name, fragment], keep=[run])
    assert str(world["run"]) not in message


def test_output_folders_are_never_silently_overwritten(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    out = previous_output(tmp_path)
    expect_error("train into a non-empty --out", base_args(world, world["data"], out), capsys, out,
                 also=["--overwrite"], keep=[out])
    expect_error("--resume with a missing checkpoint folder", base_args(world, world["data"], out) + ["--resume", str(tmp_path / "nope")],
                 capsys, tmp_path / "nope", keep=[out])
    expect_error("export into a non-empty --out", ["export", "--heads", str(world["run"] / "heads"), "--out", str(out)],
                 capsys, out, keep=[out])


def test_bad_config_files_are_refused_naming_the_file(world, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("num_heads: [1, 2\n")
    expect_error("truncated YAML --config", ["train", "--config", str(config)], capsys, config, code=2)
    config.write_text("num_heads: four\n")
    expect_error("YAML value of the wrong type", ["train", "--config", str(config)], capsys, config, also=["num_heads"], code=2)


def test_a_damaged_tokenized_cache_is_named_and_rebuilt(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    assert main(base_args(world, world["data"], tmp_path / "first")) == 0
    cache_file = next((tmp_path / "cache" / "tokenized").glob("*.safetensors"))
    cache_file.write_bytes(cache_file.read_bytes()[:50])
    code, err = run_cli(base_args(world, world["data"], tmp_path / "second"), capsys)
    message = next(line for line in err.splitlines() if "unreadable cache" in line)
    TABLE.append(("truncated tokenized-data cache (rebuilt)", code, message))
    assert code == 0 and str(cache_file) in message
    assert (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()[0].split('"tokens_per_s"')[0] == \
        (tmp_path / "second" / "metrics.jsonl").read_text().splitlines()[0].split('"tokens_per_s"')[0]


def test_a_damaged_hidden_state_cache_is_refused_naming_the_file(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    hidden = tmp_path / "hidden"
    assert main(["cache", "--model", str(world["model"]), "--data", str(world["data"]), "--out", str(hidden),
                 "--max-length", "64", "--dtype", "fp32"]) == 0
    out = previous_output(tmp_path)
    argv = ["train", "--model", str(world["model"]), "--cache", str(hidden), "--out", str(out), "--overwrite",
            "--num-heads", "2", "--batch-size", "2", "--max-steps", "2", "--progress", "false", "--dtype", "fp32"]
    index = hidden / "index.json"
    good_index = index.read_text()
    index.write_text(good_index[: len(good_index) // 2])
    expect_error("truncated hidden-state cache index.json (train --cache)", argv, capsys, index, also=["corrupt"], keep=[out])
    index.write_text(good_index)
    shard = sorted(hidden.glob("shard-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:3000])
    expect_error("truncated hidden-state cache shard (train --cache)", argv, capsys, shard, also=["corrupt or truncated"], keep=[out])


# ---- faults during training ------------------------------------------------------------------

def nan_on_call(monkeypatch, bad_calls, recipe=None):
    """Make the head loss NaN on the given (1-based) calls, i.e. micro-batches."""
    recipe = recipe or medusaforge.training.medusa1
    real = recipe.medusa_head_losses
    calls = {"n": 0}

    def faulty(*args, **kwargs):
        calls["n"] += 1
        result = real(*args, **kwargs)
        if calls["n"] in bad_calls:
            result.loss_sums = [s * float("nan") for s in result.loss_sums]
        return result

    monkeypatch.setattr(recipe, "medusa_head_losses", faulty)


def assert_checkpoints_finite(out):
    for checkpoint in list_checkpoints(out / "checkpoints"):
        heads, _ = load_checkpoint(checkpoint, restore_rng=False)
        assert all(torch.isfinite(p).all() for p in heads.parameters()), checkpoint


def test_a_nan_loss_stops_the_run_and_keeps_the_checkpoints(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    nan_on_call(monkeypatch, {3})
    out = tmp_path / "out"
    argv = base_args(world, world["data"], out, max_steps=5) + ["--save-every", "1", "--keep-last", "5"]
    expect_error("NaN loss at step 3", argv, capsys, "step 3: loss nan", also=["--skip-nonfinite", "intact"])
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["step-000001", "step-000002"]
    assert_checkpoints_finite(out)
    assert not (out / "summary.json").exists()


MEDUSA2_ARGS = ["--mode", "medusa2", "--lora-rank", "2", "--lora-target-modules", "q_proj", "v_proj"]


@pytest.mark.parametrize("mode", ["medusa1", "medusa2"])
def test_skip_nonfinite_skips_and_counts_the_bad_steps(mode, world, tmp_path, capsys, monkeypatch):
    # Medusa-2 used to ignore --skip-nonfinite, --save-every and --keep-last silently.
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    nan_on_call(monkeypatch, {2, 4}, getattr(medusaforge.training, mode))
    out = tmp_path / "out"
    argv = base_args(world, world["data"], out, max_steps=5) + ["--save-every", "1", "--keep-last", "4", "--skip-nonfinite"]
    argv += MEDUSA2_ARGS if mode == "medusa2" else []
    code, err = run_cli(argv, capsys)
    TABLE.append((f"{mode}: NaN loss at steps 2, 4 with --skip-nonfinite", code, err.strip().splitlines()[-3]))
    assert code == 0, err
    assert "2 of 5 steps were skipped" in err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in metrics] == [False, True, False, True, False]
    assert json.loads((out / "summary.json").read_text())["nonfinite_steps_skipped"] == 2
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == [f"step-00000{s}" for s in (2, 3, 4, 5)]  # --keep-last 4
    assert (out / "checkpoints" / "step-000005" / "base.safetensors").is_file() == (mode == "medusa2")
    assert_checkpoints_finite(out)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    real_save = medusaforge.training.checkpoint.save_file

    def save_or_disk_full(tensors, path, *args, **kwargs):
        if "step-000003" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(medusaforge.training.checkpoint, "save_file", save_or_disk_full)
    out = tmp_path / "out"
    argv = base_args(world, world["data"], out, max_steps=5) + ["--save-every", "1", "--keep-last", "1"]
    expect_error("disk full while saving step 3", argv, capsys, out / "checkpoints" / "step-000003",
                 also=["No space left on device", "previous checkpoint is untouched"])
    checkpoints = out / "checkpoints"
    assert [c.name for c in list_checkpoints(checkpoints)] == ["step-000002"]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    load_checkpoint(checkpoints / "step-000002", restore_rng=False)  # still loads
