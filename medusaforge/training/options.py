"""The option groups that training recipes share, as small dataclasses.

A recipe's config inherits the groups it uses (`class Medusa1Config(OutputOptions, OptimOptions,
HeadOptions, DataOptions, BaseModelOptions)`), so its fields stay flat: every field is one
`--flag` and one YAML key, exactly as before the split. Defaults live here, once; each group checks
its own fields in `check_*`, and a recipe's `validate()` calls the checks of the groups it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medusaforge.config import dtype_option, option
from medusaforge.models import DEFAULT_MODEL

TRAIN_DTYPES = ("auto", "fp32", "bf16")  # no fp16: training has no loss scaling


@dataclass
class BaseModelOptions:
    model: str = option(DEFAULT_MODEL, "base model: local HF folder, hub id, or the built-in smollm2-135m-instruct")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = dtype_option("auto", "compute dtype: auto (bf16 autocast where the device runs bf16 natively, else fp32), fp32 or bf16 (no fp16: training has no loss scaling)", choices=TRAIN_DTYPES)
    trust_remote_code: bool = option(False, "allow the model's own Python code from its folder (off by default)")
    seed: int = option(0, "random seed (data order, split)")


@dataclass
class DataOptions:
    data: Path | None = option(None, "training data: JSONL (ShareGPT or OpenAI messages)")
    max_length: int = option(1024, "truncate each conversation to this many tokens")
    eval_fraction: float = option(0.1, "share of conversations held out for the final evaluation")
    skip_invalid: bool = option(False, "skip bad records (counted and reported) instead of stopping")
    batch_size: int = option(8, "conversations per micro-batch, over all ranks (each torchrun rank takes its share)")
    grad_accum: int = option(1, "micro-batches per optimizer step")

    def check_data(self) -> None:
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("--eval-fraction must be in [0, 1)")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("--batch-size and --grad-accum must be >= 1")


@dataclass
class HeadOptions:
    num_heads: int = option(4, "number of Medusa heads (head k predicts token t+k+2)")
    num_layers: int = option(1, "ResBlocks per head")
    head_weights: list[float] | None = option(None, "loss weight per head (default: decay**k)")
    head_weight_decay: float = option(0.8, "per-head loss weight decay used when --head-weights is not given")
    init_heads: Path | None = option(None, "start from these heads (any layout: ours, vLLM, original) instead of copies of the base lm_head")
    shared_lm_head: bool = option(False, "every head reuses the frozen base lm_head; only the ResBlocks train")
    chunk_size: int = option(512, "tokens per chunk in the head loss (peak memory ~ chunk * vocab * 4 bytes)")

    def check_heads(self) -> None:
        if self.num_heads < 1 or self.num_layers < 0:
            raise ValueError("--num-heads must be >= 1 and --num-layers >= 0")
        if self.head_weights is not None and len(self.head_weights) != self.num_heads:
            raise ValueError(f"--head-weights has {len(self.head_weights)} values for {self.num_heads} heads")
        if self.chunk_size < 1:
            raise ValueError("--chunk-size must be >= 1")


@dataclass
class OptimOptions:
    epochs: float = option(1.0, "passes over the training split (fractions allowed)")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides --epochs)")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.05, "fraction of steps spent in linear warmup before the cosine decay")
    min_lr_ratio: float = option(0.0, "cosine decays to lr * this")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)")
    skip_nonfinite: bool = option(False, "skip optimizer steps whose loss or gradient is NaN/inf (counted, reported) instead of stopping")

    def check_optim(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be >= 1")
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError("--epochs and --lr must be > 0")


@dataclass
class OutputOptions:
    out: Path = option(Path("runs/train"), "output folder: heads/, checkpoints/, metrics.jsonl, summary.json")
    overwrite: bool = option(False, "allow writing into a non-empty --out")
    resume: str | None = option(None, "resume from a checkpoint folder, or 'auto' for the newest in --out")
    save_every: int = option(0, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = option(2, "keep this many checkpoints")
    log_every: int = option(1, "write metrics every N steps")
    progress: bool = option(True, "show a progress bar")

    def check_output(self) -> None:
        if self.save_every < 0 or self.keep_last < 0 or self.log_every < 1:
            raise ValueError("--save-every and --keep-last must be >= 0, --log-every >= 1")


@dataclass
class EvalOptions:
    """Held-out points during training (setup.held_out_point), for convergence curves. Every recipe
    has it; Medusa-2, which has no time budget, takes it without BudgetOptions."""

    eval_every: int = option(0, "also evaluate the held-out split every N steps (a metrics.jsonl line with held_out_top1 and the training seconds so far, for convergence curves); its time counts neither as training time nor against --max-minutes, where the recipe has one")

    def check_eval(self) -> None:
        if self.eval_every < 0:
            raise ValueError("--eval-every must be >= 0")


@dataclass
class BudgetOptions(EvalOptions):
    """How the Medusa-1 and EAGLE-3 recipes spend a CPU: micro-batches sized in tokens, and a time
    budget that decides how many of the planned steps run (training/batches.py, training/budget.py)."""

    batch_tokens: int | None = option(None, "micro-batch size in tokens: conversations of similar length grouped so that (longest x count) <= N; replaces --batch-size for training (held-out evaluation still uses --batch-size)")
    max_minutes: float | None = option(None, "time budget of the training loop: run as many of the planned steps (--max-steps or --epochs) as fit, with the LR decay fitted to them, so a slower host trains fewer steps, not longer")

    def check_budget(self, max_length: int) -> None:
        if self.batch_tokens is not None and self.batch_tokens < max_length:
            raise ValueError(f"--batch-tokens {self.batch_tokens} is below --max-length {max_length}: a conversation of the "
                             "longest allowed length would not fit in a micro-batch")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError("--max-minutes must be > 0")
        self.check_eval()
