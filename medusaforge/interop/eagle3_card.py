"""README.md model card for an exported EAGLE-3 draft: what it is, how well it did, how to serve it."""

from __future__ import annotations

import json

# Eval-JSON keys shown first, with their labels; other numbers are listed after them.
EVAL_KEYS = {
    "accept_length": "mean tokens per verify step (incl. the base model's own token)",
    "speedup": "speedup over plain greedy decoding (wall clock)",
    "num_prompts": "prompts measured",
    "identical": "greedy output identical to plain greedy on every prompt",
    "dtype": "dtype measured in",
}


def eagle3_card(config: dict, out_dir: str, base_model_id: str = "", eval_results: dict | None = None, data: str = "") -> str:
    """Markdown for README.md. `config` is the exported config.json (eagle3_layout.engine_config)."""
    base = base_model_id or (config.get("medusaforge") or {}).get("base_model") or "BASE_MODEL"
    vllm_ids = config["eagle_aux_hidden_state_layer_ids"]
    sglang_ids = config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
    lines = [
        f"# EAGLE-3 draft for {base}",
        "",
        "One Llama decoder layer trained with medusaforge (training-time test) to draft tokens for the "
        "base model below, in the checkpoint layout SpecForge writes and vLLM (`eagle3`) and SGLang "
        "(`EAGLE3`) load. It reads three of the base's hidden states and the base's own token embedding, "
        "so it is not a model on its own.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| training data | {data or 'not recorded'} |",
        f"| hidden size | {config['hidden_size']} |",
        f"| vocabulary | {config['vocab_size']} (the draft predicts {config['draft_vocab_size']} of them; "
        "`d2t` maps draft ids to base ids) |",
        f"| base layers read | vLLM `eagle_aux_hidden_state_layer_ids` {vllm_ids}; SpecForge/SGLang "
        f"`eagle_config` {sglang_ids} (the same layers: SGLang counts the output of layer i, vLLM the input of layer i+1) |",
        f"| dtype | {config.get('torch_dtype', 'unknown')} |",
        "",
        "## Measured",
        "",
    ]
    lines += _measured(eval_results)
    lines += [
        "",
        "## Serve with vLLM",
        "",
        "```bash",
        f"vllm serve {base} --speculative-config "
        f"'{{\"method\": \"eagle3\", \"model\": \"{out_dir}\", \"num_speculative_tokens\": 4}}'",
        "```",
        "",
        "## Serve with SGLang",
        "",
        "```bash",
        f"python -m sglang.launch_server --model-path {base} --speculative-algorithm EAGLE3 \\",
        f"    --speculative-draft-model-path {out_dir} --speculative-num-steps 4 \\",
        "    --speculative-eagle-topk 4 --speculative-num-draft-tokens 16",
        "```",
        "",
        "Both engines take the token embedding from the base model; the folder has none.",
    ]
    return "\n".join(lines) + "\n"


def _measured(results: dict | None) -> list[str]:
    if not results:
        return ["Not measured here: run `medusaforge eval --drafter DIR` and export with `--eval-json` to fill this in."]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {label} (`{key}`) | {_number(results[key])} |" for key, label in EVAL_KEYS.items() if key in results]
    lines += [
        f"| `{key}` | {_number(value)} |"
        for key, value in results.items()
        if key not in EVAL_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    if "tree" in results:
        lines += ["", f"Draft tree: `{json.dumps(results['tree'])}`"]
    lines += ["", "Measured with medusaforge's own decoder at batch size 1; an engine's figures depend on its "
              "drafting settings and batch size."]
    return lines


def _number(value) -> str:
    if isinstance(value, list):
        return ", ".join(_number(v) for v in value)
    return f"{value:.3f}" if isinstance(value, float) else str(value)
