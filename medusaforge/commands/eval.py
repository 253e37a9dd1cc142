"""`medusaforge eval`: acceptance length and wall-clock speedup against plain greedy decoding and
against transformers' prompt-lookup decoding.

For every prompt the base model's own `generate(do_sample=False)`, its prompt-lookup decoding and
our decoder run back to back in the same process, dtype and thread setting, after a warm-up of
each. Our output must equal greedy's token for token. An output that parts from greedy's is judged
at the first differing token (decoding/identity.py): a near-tie, where the drafted token's logit lies
within the dtype's rounding bound of the top logit (tree and one-token passes round differently in
bf16), or otherwise a bug, which makes `eval` exit non-zero after writing its report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medusaforge.config import config_to_dict, option
from medusaforge.data.prompts import encode_prompt, load_prompts, prompt_text
from medusaforge.decoding.decoder import DecodeResult
from medusaforge.decoding.identity import BUG, count_outputs, judge_parting, outputs_line, verdict
from medusaforge.decoding.loading import adaptive_drafting, hf_greedy, hf_prompt_lookup, load_drafter, stop_token_ids
from medusaforge.drafters.eagle3_proposer import DynamicTree
from medusaforge.drafters.hybrid import accept_by_source
from medusaforge.drafters.lookup import LookupProposer
from medusaforge.files import atomic_write_text
from medusaforge.models import DEFAULT_MODEL


@dataclass
class EvalConfig:
    """Measure acceptance length and speedup of tree decoding against greedy and prompt-lookup decoding."""

    model: str = option(DEFAULT_MODEL, "base model: built-in name, local folder or hub id")
    heads: Path = option(Path("runs/demo/heads"), "heads folder (a train --out folder or its heads/ subfolder)")
    prompts: str = option("mt-bench", "prompts file (.jsonl / .txt), 'mt-bench' (the 80 first turns) or 'copy-heavy' (45 that copy from their input)")
    limit: int = option(0, "use only the first N prompts (0 = all)")
    drafter: Path | None = option(None, "drafter folder instead of --heads: an EAGLE-3 draft (train --method eagle3's OUT "
                                        "or OUT/draft, an export, SpecForge's) or a heads folder")
    eagle_topk: int = option(DynamicTree.topk, "EAGLE-3 tree: children per expanded node, and nodes expanded per depth")
    eagle_depth: int = option(DynamicTree.depth, "EAGLE-3 tree: draft steps at most")
    eagle_nodes: int = option(DynamicTree.num_nodes, "EAGLE-3 tree: candidate nodes verified per step")
    max_new_tokens: int = option(128, "tokens to generate per prompt")
    tree: Path | None = option(None, "tree JSON; default: the heads' or EAGLE-3 folder's tree.json when present (`medusaforge tree ... --out DIR/tree.json` writes it), else the shipped tree for the head count")
    adaptive: bool = option(True, "shrink the draft, or decode without one, while recent acceptance does not pay for its verify cost")
    lookup: bool = option(True, "also draft prompt-lookup chains (n-gram matches in the prompt and the text so far), merged "
                                "into the drafter's tree (heads or EAGLE-3)")
    lookup_tokens: int = option(16, "with --lookup: tokens per lookup chain after a full-length n-gram match (fewer after a shorter one)")
    dtype: str = option("auto", "bf16, fp32 or auto (bf16 where the hardware runs it natively, else fp32)", choices=["auto", "bf16", "fp32", "fp16"])
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    warmup_tokens: int = option(16, "tokens each decoder generates once before timing starts")
    json: Path = option(Path("eval.json"), "where to write the results")
    histogram: Path | None = option(None, "PNG histogram of accepted lengths (default: next to --json)")
    allow_other_base: bool = option(False, "use heads trained against different base weights")
    baseline: bool = option(True, "also run plain greedy decoding (speedup, identical); off: acceptance only, half the time")
    prompt_lookup: int = option(10, "with --baseline: also time transformers' prompt-lookup decoding with this many tokens "
                                    "per candidate (0: not run), the drafting-free method to beat")

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        if self.lookup_tokens < 1:
            raise ValueError("--lookup-tokens must be at least 1")
        if self.prompt_lookup < 0:
            raise ValueError("--prompt-lookup must be 0 (not run) or a token count")
        DynamicTree(self.eagle_topk, self.eagle_depth, self.eagle_nodes)  # raises for values below 1


def head_acceptance(accepted: list[int], num_heads: int) -> dict[str, list[float]]:
    """Per-head rates over verify steps. `rate[k]`: share of steps whose accepted path reached
    depth k + 1; `conditional[k]`: the same among steps where head k - 1's candidate was accepted."""
    steps = torch.tensor(accepted)
    reached = [int((steps >= k).sum()) for k in range(num_heads + 1)]
    rate = [reached[k + 1] / max(reached[0], 1) for k in range(num_heads)]
    conditional = [reached[k + 1] / reached[k] if reached[k] else 0.0 for k in range(num_heads)]
    return {"rate": rate, "conditional": conditional}


@torch.inference_mode()
def first_difference(base, input_ids: torch.Tensor, expected: list[int], got: list[int]) -> dict:
    """Where two greedy outputs part, how close the base's logits are there (one reference pass
    over greedy's tokens before it), and what that makes the parting: a near-tie or a bug."""
    index = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    context = torch.cat([input_ids, torch.tensor(expected[:index], dtype=torch.long, device=input_ids.device)])
    logits = base(input_ids=context[None]).logits[0, -1].float()
    top2 = logits.topk(2)
    record = {"index": index, "top2_margin": float(top2.values[0] - top2.values[1])}
    for name, tokens in (("baseline", expected), ("medusa", got)):
        token = tokens[index] if index < len(tokens) else None
        record[f"{name}_token"] = token
        record[f"{name}_logit"] = float(logits[token]) if token is not None else None
    return {**record, **judge_parting(logits, record["medusa_token"], next(base.parameters()).dtype)}


def write_histogram(accept_lengths: list[int], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no histogram written (pip install matplotlib)")
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    bins = range(1, max(accept_lengths, default=1) + 2)
    axis.hist(accept_lengths, bins=bins, align="left", rwidth=0.8)
    axis.set_xlabel("tokens emitted per verify step")
    axis.set_ylabel("verify steps")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def run(config: EvalConfig) -> dict:
    loaded = load_drafter(config.model, config.drafter or config.heads, config.tree,
                          DynamicTree(config.eagle_topk, config.eagle_depth, config.eagle_nodes), config.dtype, config.device,
                          config.allow_other_base)
    tokenizer, base, eagle_tree = loaded.tokenizer, loaded.base, loaded.eagle_tree
    if loaded.is_eagle3:
        tree = {"topk": eagle_tree.topk, "depth": eagle_tree.depth, "num_nodes": eagle_tree.num_nodes} if eagle_tree else {}
        depth, shape = (eagle_tree.depth if eagle_tree else 0), f"EAGLE-3 tree {tree}"
    else:
        tree, depth, shape = loaded.tree, loaded.heads.num_heads, f"tree of {len(loaded.tree)} nodes"
    eos = stop_token_ids(tokenizer, base)
    chats = load_prompts(config.prompts, config.limit)
    encoded = [encode_prompt(tokenizer, chat).to(base.device) for chat in chats]
    dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    print(f"eval: {len(chats)} prompts, {config.max_new_tokens} new tokens, {dtype}, {shape}", flush=True)

    lookup = LookupProposer(num_tokens=config.lookup_tokens) if config.lookup else None
    adaptive = adaptive_drafting(loaded.tree_file, config.adaptive, base.dtype)
    if not loaded.drafts and lookup is None:
        print("the tree file says no draft beats plain decoding here: decoding without drafting", flush=True)

    def medusa(ids, n) -> DecodeResult:
        return loaded.generate(ids, n, eos, lookup=lookup, adaptive=adaptive)

    prompt_lookup = config.baseline and config.prompt_lookup > 0
    if config.baseline:
        hf_greedy(base, encoded[0], config.warmup_tokens, eos)  # warm-up: first calls allocate and pick kernels
    if prompt_lookup:
        hf_prompt_lookup(base, encoded[0], config.warmup_tokens, eos, config.prompt_lookup)
    medusa(encoded[0], config.warmup_tokens)

    records, accepted, mismatches, sources, drafted, judgements = [], [], [], [], [], []
    baseline_seconds = medusa_seconds = hf_lookup_seconds = 0.0
    baseline_tokens = medusa_tokens = hf_lookup_tokens = 0
    for number, (chat, ids) in enumerate(zip(chats, encoded), start=1):
        record = {"prompt": prompt_text(chat)}
        line = f"[{number}/{len(chats)}]"
        if config.baseline:
            start = time.perf_counter()
            expected = hf_greedy(base, ids, config.max_new_tokens, eos)
            baseline_time = time.perf_counter() - start
            baseline_seconds += baseline_time
            baseline_tokens += len(expected)
            record.update(baseline_tokens=len(expected), baseline_s=baseline_time)
        if prompt_lookup:
            start = time.perf_counter()
            hf_lookup_tokens += len(hf_prompt_lookup(base, ids, config.max_new_tokens, eos, config.prompt_lookup))
            hf_lookup_seconds += time.perf_counter() - start
        start = time.perf_counter()
        result = medusa(ids, config.max_new_tokens)
        medusa_time = time.perf_counter() - start
        medusa_seconds += medusa_time
        medusa_tokens += len(result.tokens)
        accepted += result.accepted
        drafted += result.drafted
        sources += result.sources
        record.update(medusa_tokens=len(result.tokens), verify_steps=result.num_steps, medusa_s=medusa_time)
        line += f" accept {sum(result.accept_lengths) / max(result.num_steps, 1):.2f}  drafted {len(result.tokens) / medusa_time:.1f} tok/s"
        if config.baseline:
            record["identical"] = identical = result.tokens == expected
            difference = None if identical else first_difference(base, ids, expected, result.tokens)
            if difference is not None:
                record["first_difference"] = difference
                mismatches.append({"prompt": prompt_text(chat), **difference})
            judgements.append(difference)
            index = difference["index"] if difference is not None else None
            line += f"  greedy {len(expected) / baseline_time:.1f} tok/s  {verdict(difference, index)}"
        records.append(record)
        print(line, flush=True)

    accept_lengths = [a + 1 for a in accepted]
    medusa_tps = medusa_tokens / medusa_seconds
    baseline_tps = baseline_tokens / baseline_seconds if config.baseline else None
    hf_lookup_tps = hf_lookup_tokens / hf_lookup_seconds if prompt_lookup else None
    per_head = head_acceptance([a for a, d in zip(accepted, drafted) if d > 0], depth)  # per draft depth for EAGLE-3
    outputs = count_outputs(judgements) if config.baseline else None
    summary = {
        "drafter": "eagle3" if loaded.is_eagle3 else "medusa",
        "accept_length": sum(accept_lengths) / max(len(accept_lengths), 1),
        "speedup": medusa_tps / baseline_tps if config.baseline else None,
        "medusa_tokens_per_s": medusa_tps,
        "baseline_tokens_per_s": baseline_tps,
        "prompt_lookup_tokens_per_s": hf_lookup_tps,
        "speedup_over_prompt_lookup": medusa_tps / hf_lookup_tps if prompt_lookup else None,
        # None: not checked (--baseline false)
        "identical": not mismatches if config.baseline else None,
        "num_identical": sum(r["identical"] for r in records) if config.baseline else None,
        # per class (decoding/identity.py): identical, near_tie, bug, and the largest near-tie gap
        "outputs": outputs,
        "num_prompts": len(chats),
        "per_head_acceptance": per_head["rate"],
        "per_head_conditional_acceptance": per_head["conditional"],
        "verify_steps": len(accepted),
        # steps decoded without a draft (adaptive drafting, or a "no drafting" tree file)
        "plain_steps": drafted.count(0),
        "mean_draft_nodes": sum(drafted) / max(len(drafted), 1),
        # with --lookup: which drafter supplied the accepted path, per source (heads, lookup, both, none)
        "accept_by_source": accept_by_source(sources, accepted) if lookup is not None else None,
        "accept_length_histogram": {str(n): accept_lengths.count(n) for n in sorted(set(accept_lengths))},
        "mismatches": mismatches,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "tree": tree,
        "config": config_to_dict(config),
        "prompts_detail": records,
    }
    atomic_write_text(config.json, json.dumps(summary, indent=2) + "\n")
    histogram = config.histogram or config.json.with_suffix(".png")
    title = f"accept length {summary['accept_length']:.2f} over {len(accepted)} steps"
    if write_histogram(accept_lengths, histogram, title):
        summary["histogram"] = str(histogram)
    report = (f"accept length {summary['accept_length']:.2f}  per-head {[round(r, 3) for r in per_head['rate']]}  "
              f"plain steps {summary['plain_steps']}/{len(accepted)}  mean draft {summary['mean_draft_nodes']:.1f} nodes\n")
    if lookup is not None:
        by_source = summary["accept_by_source"]
        report += "by source: " + "  ".join(f"{s} {v['share']:.0%} of steps, accept {v['accept_length']:.2f}" for s, v in by_source.items()) + "\n"
    if config.baseline:
        report += f"greedy {baseline_tps:.1f} tok/s  drafted {medusa_tps:.1f} tok/s  speedup {summary['speedup']:.2f}x\n"
        report += outputs_line(outputs, next(base.parameters()).dtype) + "\n"
    if prompt_lookup:
        report += (f"HF prompt lookup {hf_lookup_tps:.1f} tok/s ({hf_lookup_tps / baseline_tps:.2f}x greedy): "
                   f"drafted is {summary['speedup_over_prompt_lookup']:.2f}x prompt lookup\n")
    else:
        report += f"drafted {medusa_tps:.1f} tok/s (no baseline run: speedup and identity not measured)\n"
    print(report + f"wrote {config.json}", flush=True)
    if outputs is not None and outputs[BUG]:
        raise RuntimeError(f"{outputs[BUG]} of {len(chats)} outputs part from greedy decoding beyond the near-tie bound "
                           f"(a decoding bug, not rounding); see 'mismatches' in {config.json}")
    return summary
