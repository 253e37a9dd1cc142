"""Every shipped recipe in configs/ must load into its command's config and pass its checks, so a
renamed option or a bad value fails here rather than half an hour into `make demo`; and a value
from YAML passes the same checks, with the same message, as the same value given as a flag."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from medusaforge.cli import main
from medusaforge.config import DTYPE_NAMES, config_from_args, option, parse_config
from medusaforge.cli import parse_command
from medusaforge.commands.train import DEFAULT_RECIPE, load_recipe

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def command_of(path: Path) -> str:
    for command in ("distill", "cache", "eval", "tree"):
        if path.stem.endswith(command):
            return command
    return "train"  # *-train.yaml and the compare-* recipes


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo-distill.yaml", "demo-cache.yaml", "demo-train.yaml",
                                         "compare-medusa1.yaml", "compare-medusa2.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_every_key_into_its_recipe(path):
    _, config, _ = parse_command([command_of(path), "--config", str(path)])
    written = yaml.safe_load(path.read_text())
    for key, value in written.items():
        if key in ("mode", "method"):
            continue  # chooses the recipe (its config class), checked below
        got = getattr(config, key.replace("-", "_"))
        assert (str(got) if isinstance(got, Path) else got) == value, key
    if command_of(path) == "train":
        recipe = written.get("mode", written.get("method", DEFAULT_RECIPE))
        assert type(config) is load_recipe(recipe)[0]  # the recipe's own config class, not a catch-all


@pytest.mark.parametrize(
    "yaml_text, key, bad",
    [("mode: medusa-2\ndata: x.jsonl\n", "mode", "medusa-2"),
     ("dtype: half\ndata: x.jsonl\n", "dtype", "half"),
     ("mode: medusa2\nbase_loss: kl\ndata: x.jsonl\n", "base_loss", "kl")],
)
def test_a_bad_choice_in_yaml_names_the_key_and_the_file(tmp_path, capsys, yaml_text, key, bad):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}: option '{key}': '{bad}' is not one of:" in err, err


def test_every_command_checks_yaml_choices(tmp_path):
    # The third case: `format: VLLM` used to export the original layout without a word.
    path = tmp_path / "export.yaml"
    path.write_text("heads: runs/heads\nout: runs/export\nformat: VLLM\n")
    with pytest.raises(ValueError, match=f"{path}: option 'format': 'VLLM' is not one of: vllm"):
        parse_command(["export", "--config", str(path)])


def test_the_same_bad_value_as_a_flag_gets_the_same_check(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", "x.jsonl", "--dtype", "half"])
    assert exit_.value.code == 2
    assert "command line (--dtype): option 'dtype': 'half' is not one of: auto, fp32, bf16" in capsys.readouterr().err


def test_cache_and_distill_share_the_dtype_vocabulary(tmp_path):
    path = tmp_path / "cache.yaml"
    path.write_text("data: d.jsonl\nout: o\ncache_dtype: float16\n")
    with pytest.raises(ValueError, match=rf"{path}: option 'cache_dtype': 'float16' is not one of: bf16, fp16, fp32"):
        parse_command(["cache", "--config", str(path)])
    _, distill, _ = parse_command(["distill", "--dtype", "fp16"])
    assert distill.dtype == "fp16"


def test_defaults_are_checked_too():
    from dataclasses import dataclass

    @dataclass
    class Broken:
        dtype: str = option("half", "a default outside its own choices", choices=list(DTYPE_NAMES))

    with pytest.raises(ValueError, match="Broken default: option 'dtype': 'half'"):
        config_from_args(Broken, argparse.Namespace(config=None))
    assert parse_config(Broken, ["--dtype", "bf16"]).dtype == "bf16"


def test_the_recipe_comes_from_the_flag_then_the_yaml_key(tmp_path):
    from medusaforge.training.medusa1 import Medusa1Config
    from medusaforge.training.medusa2 import Medusa2Config

    path = tmp_path / "train.yaml"
    path.write_text("method: medusa2\ndata: x.jsonl\nlora_rank: 4\n")
    _, config, _ = parse_command(["train", "--config", str(path)])
    assert type(config) is Medusa2Config and config.lora_rank == 4
    path.write_text("mode: medusa2\ndata: x.jsonl\n")
    _, config, _ = parse_command(["train", "--config", str(path), "--method", "medusa1"])
    assert type(config) is Medusa1Config  # the flag wins over the file, as for every option
    path.write_text("mode: medusa2\nmethod: medusa1\ndata: x.jsonl\n")
    with pytest.raises(ValueError, match=f"{path}: 'mode' .* and 'method' .* disagree"):
        parse_command(["train", "--config", str(path)])
