"""Every shipped recipe in configs/ must load into its command's config and pass its checks, so a
renamed option or a bad value fails here rather than half an hour into `make demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from medusaforge.cli import _load
from medusaforge.config import config_from_args

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def command_of(path: Path) -> str:
    for command in ("distill", "cache"):
        if path.stem.endswith(command):
            return command
    return "train"  # *-train.yaml and the compare-* recipes


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {"demo-distill.yaml", "demo-cache.yaml", "demo-train.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_validates(path):
    config_class, _ = _load(command_of(path))
    config = config_from_args(config_class, argparse.Namespace(config=path))
    assert type(config) is config_class
