"""models.py: a model folder is replaced whole, so a failed save never leaves the name empty."""

import os

import pytest
import torch
from helpers import tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from medusaforge.models import resolve_dtype, save_model_folder


def saved_weight(directory):
    return AutoModelForCausalLM.from_pretrained(directory).lm_head.weight


@pytest.fixture
def old_and_new(tmp_path):
    tokenizer = tiny_tokenizer()
    old, new = tiny_llama(len(tokenizer), seed=0, hidden_size=32), tiny_llama(len(tokenizer), seed=1, hidden_size=32)
    target = save_model_folder(old, tokenizer, tmp_path / "model", {"note.json": "{}"})
    assert (target / "note.json").read_text() == "{}" and (target / "tokenizer_config.json").is_file()
    return tokenizer, old, new, target


def test_a_swap_that_fails_at_the_last_rename_keeps_the_old_folder(old_and_new, monkeypatch):
    tokenizer, old, new, target = old_and_new
    real_replace = os.replace

    def replace_failing_into_target(source, destination):
        # The finished new folder cannot be renamed onto the name (say, the disk is gone).
        if os.fspath(destination) == os.fspath(target) and ".tmp-" in os.fspath(source):
            raise OSError("injected: rename failed")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_failing_into_target)
    with pytest.raises(OSError, match="injected"):
        save_model_folder(new, tokenizer, target)
    monkeypatch.undo()
    assert torch.equal(saved_weight(target), old.lm_head.weight)  # rmtree-then-rename lost it here
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no staging or old copy left


def test_a_save_that_fails_midway_leaves_the_old_folder_and_no_staging(old_and_new, monkeypatch):
    tokenizer, old, new, target = old_and_new

    def broken_tokenizer_save(*args, **kwargs):
        raise OSError("injected: disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken_tokenizer_save)
    with pytest.raises(OSError, match="disk full"):
        save_model_folder(new, tokenizer, target)
    assert torch.equal(saved_weight(target), old.lm_head.weight)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]


def test_a_successful_save_replaces_the_folder(old_and_new):
    tokenizer, old, new, target = old_and_new
    save_model_folder(new, tokenizer, target)
    assert torch.equal(saved_weight(target), new.lm_head.weight)
    assert not (target / "note.json").exists()  # the old folder's files went with it


def test_resolve_dtype_names_the_vocabulary():
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="'half' is not one of: auto, fp32, bf16, fp16"):
        resolve_dtype("half", torch.device("cpu"))
