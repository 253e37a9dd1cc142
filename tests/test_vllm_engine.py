"""The engine as the reference: vLLM 0.32 loads every head layout we export and drafts the same
first tokens as our heads on fixed hidden states.

vLLM lives in its own venv (`make serve-check` creates `.venv-vllm/`; MEDUSAFORGE_VLLM_PYTHON may
point at another interpreter), and this test runs its Python in a subprocess
(tests/vllm_draft_tokens.py). Without that venv the test is skipped, and says so. It is slow (the
vLLM import alone takes 20-60 s on a 2-core CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model
from safetensors.torch import save_file

from medusaforge.cli import main
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.interop.importer import import_heads
from medusaforge.interop.layouts import FormatWarning
from medusaforge.models import lm_head_of, load_base_model

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("MEDUSAFORGE_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.is_file(),
                       reason=f"no vLLM venv at {VLLM_PYTHON}: run `make serve-check` (or "
                              "`bash benchmarks/serve_check.sh install`) to create it"),
]

# name -> (format, shared_lm_head, head_vocab_size, num_layers): every head layout we train, in
# each layout vLLM reads.
LAYOUTS = {
    "own-full-vllm": ("vllm", False, None, 1),
    "own-truncated-vllm": ("vllm", False, 48, 1),
    "own-truncated-2layers-vllm": ("vllm", False, 48, 2),
    "shared-full-vllm": ("vllm", True, None, 1),
    "shared-truncated-vllm": ("vllm", True, 48, 1),
    "own-full-original": ("medusa", False, None, 1),
    "own-truncated-original": ("medusa", False, 48, 1),
}


def trained_like_heads(base, hidden_size, vocab_size, shared, head_vocab_size, num_layers) -> MedusaHeads:
    heads = MedusaHeads(hidden_size, vocab_size, 3, num_layers, shared_lm_head=shared, head_vocab_size=head_vocab_size)
    if head_vocab_size is not None:
        # Token 0 in the map: every widened row then has a lower in-map twin (see interop/full_vocab.py).
        rest = 1 + torch.randperm(vocab_size - 1)[: head_vocab_size - 1]
        heads.token_map.copy_(torch.sort(torch.cat([torch.tensor([0]), rest])).values)
    heads.init_from_base(lm_head_of(base).weight)
    for name, parameter in heads.named_parameters():
        parameter.data.normal_(std=0.3 if "blocks" in name else 1.0)
    return heads


def test_vllm_drafts_our_top1_for_every_exported_layout(tmp_path):
    torch.manual_seed(0)
    model_dir = save_tiny_model(tmp_path / "tiny")
    base = load_base_model(model_dir, check=False)
    vocab_size, hidden_size = lm_head_of(base).weight.shape
    hidden = torch.randn(64, hidden_size)
    save_file({"hidden": hidden}, str(tmp_path / "hidden.safetensors"))
    ours, folders = {}, {}
    for name, (fmt, shared, head_vocab, num_layers) in LAYOUTS.items():
        heads = trained_like_heads(base, hidden_size, vocab_size, shared, head_vocab, num_layers)
        heads.config.base_model = str(model_dir)
        heads_dir = heads.save(tmp_path / f"heads-{name}")
        folders[name] = tmp_path / f"export-{name}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FormatWarning)  # 2 ResBlocks in the original layout
            assert main(["export", "--heads", str(heads_dir), "--format", fmt, "--out", str(folders[name])]) == 0
            # What the export encodes, read back by our importer: for the vLLM layout the trained
            # heads themselves; for the original layout the widened (zero-row) heads engines run.
            exported = import_heads(folders[name], base)
        with torch.no_grad():
            ours[name] = exported(hidden[None])[:, 0].argmax(-1).T.tolist()  # [position][head]
            if fmt == "vllm":
                assert exported(hidden[None]).argmax(-1).tolist() == heads(hidden[None]).argmax(-1).tolist()
    spec = {"base": str(model_dir), "hidden": str(tmp_path / "hidden.safetensors"), "dtype": "float32",
            "drafts": {name: str(folder) for name, folder in folders.items()}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_draft_tokens.py"), str(tmp_path / "spec.json"),
                             str(tmp_path / "out.json")], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    failed = {name: theirs[name]["error"] for name in LAYOUTS if isinstance(theirs[name], dict)}
    assert not failed, f"vLLM refused: {failed}"
    for name in LAYOUTS:
        assert theirs[name] == ours[name], name
