"""README.md model card for exported heads: what they are, how well they did, how to serve them."""

from __future__ import annotations

import json
from pathlib import Path

from medusaforge.drafters.medusa_heads import HeadsConfig
from medusaforge.interop.layouts import FILL_FOR_FORMAT
from medusaforge.models import BUILTIN_MODELS

# Eval-JSON keys shown in the "Measured" table, with their labels; other numbers are listed after.
EVAL_KEYS = {
    "accept_length": "mean accepted tokens per verify step (incl. the base model's own token)",
    "speedup": "speedup over plain greedy decoding (wall clock)",
    "num_prompts": "prompts measured",
    "medusa_tokens_per_s": "tokens per second with Medusa",
    "baseline_tokens_per_s": "tokens per second, plain greedy",
    "identical": "Medusa output identical to plain greedy on every prompt",
    "per_head_acceptance": "acceptance rate of each head's token",
    "dtype": "dtype measured in",
}
# TensorRT-LLM deleted examples/medusa and the TensorRT engine backend that Medusa needed from its
# main branch in July 2026 (PRs #15763, #15918, #16369); a release tag from before then still has them.
TRTLLM_EXAMPLE = "https://github.com/NVIDIA/TensorRT-LLM/tree/v0.21.0/examples/medusa"
TRTLLM_REMOVED = ("TensorRT-LLM removed Medusa in 2026: `examples/medusa` was deleted and the TensorRT engine "
                  "backend it needs was removed, so current releases cannot serve these heads. Pin a release from "
                  "before July 2026 (the last we can name is v1.2.1; the 0.x line up to v0.21.0 also carries it).")


def read_eval_json(path: str | Path) -> dict:
    """The eval command's JSON; its numbers may sit at the top level or under "summary"."""
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: eval JSON not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: expected a JSON object")
    summary = results.get("summary")
    return {**results, **summary} if isinstance(summary, dict) else results


def model_card(
    config: HeadsConfig,
    fmt: str,
    out_dir: str,
    base_model_id: str = "",
    eval_results: dict | None = None,
    data: str = "",
    num_speculative_tokens: int | None = None,
    agreement: dict | None = None,
) -> str:
    """Markdown text of README.md for heads exported in `fmt` ("vllm" or "medusa") to `out_dir`.

    agreement: export's measurement of how often each head's top-1 survived widening a truncated
    vocabulary ({"fill", "per_head", "num_tokens", "hidden_cache"}), or None."""
    base = base_model_id or config.base_model or "BASE_MODEL"
    k = num_speculative_tokens or config.num_heads
    data = data or str(config.extra.get("data", "") or config.extra.get("dataset", "") or "not recorded")
    lines = [
        f"# Medusa heads for {base}",
        "",
        f"{config.num_heads} Medusa heads trained with medusaforge, exported in the "
        f"{'vLLM' if fmt == 'vllm' else 'original Medusa (FasterDecoding / TensorRT-LLM)'} layout. "
        "Head k predicts the token k+2 positions ahead from the base model's final hidden state; "
        "they are not a model on their own and must be served with the base model below.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| training data | {data} |",
        f"| heads | {config.num_heads} |",
        f"| ResBlocks per head | {config.num_layers} |",
        f"| hidden size | {config.hidden_size} |",
        f"| vocabulary | {config.vocab_size}"
        + (f" (heads project to {config.head_vocab_size} tokens via token_map)" if config.head_vocab_size != config.vocab_size else "")
        + " |",
        f"| head projection | {'shared base lm_head' if config.shared_lm_head else 'one per head'} |",
    ]
    if config.base_fingerprint:
        lines.append(f"| base weights fingerprint | `{config.base_fingerprint}` |")
    if base.lower() in BUILTIN_MODELS:
        # Engines need a real folder; the built-in's weights are a dequantized GGUF, not the hub checkpoint.
        lines += [
            "",
            f"`{base}` is medusaforge's built-in model: the heads were trained on its dequantized GGUF weights, "
            "so engines must load the folder medusaforge converted it to, not the hub checkpoint. Print its path with "
            f"`python -c \"from medusaforge.models import convert_builtin; print(convert_builtin('{base.lower()}'))\"` "
            "and use that path wherever the commands below say "
            f"`{base}`.",
        ]
    lines += _widened_section(config, fmt, agreement)
    lines += ["", "## Measured", ""] + _measured(eval_results)
    lines += ["", "## Serve with vLLM", ""] + _vllm_section(fmt, base, out_dir, k)
    lines += ["", "## Serve with TensorRT-LLM", ""] + _trtllm_section(fmt, base, out_dir, config)
    return "\n".join(lines) + "\n"


def _measured(results: dict | None) -> list[str]:
    if not results:
        return ["Not measured here: run `medusaforge eval` and export with `--eval-json` to fill this in."]
    lines = ["| metric | value |", "|---|---|"]
    for key, label in EVAL_KEYS.items():
        if key in results:
            lines.append(f"| {label} (`{key}`) | {_number(results[key])} |")
    others = [key for key, v in results.items() if key not in EVAL_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)]
    lines += [f"| `{key}` | {_number(results[key])} |" for key in others]
    if "tree" in results or "medusa_choices" in results:
        tree = results.get("tree", results.get("medusa_choices"))
        lines += ["", f"Candidate tree used: `{json.dumps(tree) if not isinstance(tree, str) else tree}`"]
    lines += ["", "Measured with medusaforge's own tree decoding; an engine's numbers depend on its "
              "drafting scheme (vLLM drafts one top-1 chain) and batch size."]
    return lines


def _widened_section(config: HeadsConfig, fmt: str, agreement: dict | None) -> list[str]:
    truncated = config.head_vocab_size != config.vocab_size
    if not truncated:
        return []
    layout = "vLLM 0.32 loads no truncated vocabulary" if fmt == "vllm" else \
        "the original Medusa layout has no token map"
    fill = agreement["fill"] if agreement else FILL_FOR_FORMAT[fmt]
    how = ("each copies the row of the nearest trained token with a lower id, so it ties with that token and "
           "argmax picks the trained one (ids below the first trained id, which have no such twin, get 15/16 of its row)"
           if fill == "shadow" else "they score 0, which wins only when every "
           "trained logit is negative")
    lines = ["", "## Vocabulary in this layout", "",
             f"The heads were trained on {config.head_vocab_size} of the {config.vocab_size} tokens, and {layout}; "
             f"the other rows are filled with {fill} rows: {how}."]
    if agreement:
        shown = ", ".join(f"head {k}: {100 * a:.2f}%" for k, a in enumerate(agreement["per_head"]))
        lines += ["", f"Measured top-1 agreement with the trained heads on {agreement['num_tokens']} real hidden "
                      f"states: {shown}."]
    else:
        lines += ["", "Top-1 agreement with the trained heads was not measured (export with --hidden-cache)."]
    return lines


def _number(value) -> str:
    if isinstance(value, list):
        return ", ".join(_number(v) for v in value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _vllm_section(fmt: str, base: str, out_dir: str, k: int) -> list[str]:
    if fmt != "vllm":
        return [
            "vLLM reads its own layout; export one with",
            "",
            "```bash",
            f"medusaforge export --heads {out_dir} --format vllm --out {out_dir}-vllm",
            "```",
        ]
    spec = f'{{"method": "medusa", "model": "{out_dir}", "num_speculative_tokens": {k}}}'
    return [
        "```python",
        "from vllm import LLM, SamplingParams",
        "",
        f'llm = LLM(model="{base}", speculative_config={spec})',
        'print(llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0].text)',
        "```",
        "",
        "or as a server:",
        "",
        "```bash",
        f"vllm serve {base} --speculative-config '{spec}'",
        "```",
        "",
        f"`num_speculative_tokens` may be at most {k}, the number of heads. vLLM proposes each head's top-1 "
        "token (a chain, not a tree) and reports acceptance in its `vllm:spec_decode_*` metrics; "
        "`examples/serve_vllm.py` prints them.",
    ]


def _trtllm_section(fmt: str, base: str, out_dir: str, config: HeadsConfig) -> list[str]:
    if fmt != "medusa":
        return [
            TRTLLM_REMOVED,
            "",
            "Its converter read the original Medusa layout; export one with",
            "",
            "```bash",
            f"medusaforge export --heads {out_dir} --format medusa --out {out_dir}-medusa",
            "```",
        ]
    # The head count is passed explicitly: the converter's flag has a default that wins over config.json
    # in some releases, and published Medusa configs are known to state the wrong count.
    return [
        TRTLLM_REMOVED,
        "",
        f"With such a release's Medusa example ({TRTLLM_EXAMPLE}; Llama-family bases):",
        "",
        "```bash",
        f"python convert_checkpoint.py --model_dir {base} \\",
        f"    --medusa_model_dir {out_dir} \\",
        "    --output_dir ./tllm_checkpoint_medusa --dtype float16 \\",
        f"    --num_medusa_heads {config.num_heads} --num_medusa_layers {config.num_layers}",
        "trtllm-build --checkpoint_dir ./tllm_checkpoint_medusa --output_dir ./trt_engine_medusa \\",
        "    --gemm_plugin float16 --speculative_decoding_mode medusa --max_batch_size 4",
        "python ../run.py --engine_dir ./trt_engine_medusa --tokenizer_dir " + base + " \\",
        "    --use_py_session --temperature 0.0 --max_output_len 100 --input_text \"Hello\" \\",
        "    --medusa_choices \"[[0], [0, 0], [1], [0, 1], [2], [0, 0, 0]]\"",
        "```",
        "",
        "`--model_dir` must be a Hugging Face folder of exactly the base weights the heads were trained on. "
        "Replace the `--medusa_choices` tree with the one `medusaforge tree` found for these heads "
        f"(paths may be at most {config.num_heads} deep).",
    ]
