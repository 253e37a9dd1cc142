"""`medusaforge train`: pick a training recipe, parse its own options, run it.

Each recipe is one module in medusaforge/training/ with its own config dataclass and a
`train(config)` loop written out top to bottom. The recipe is chosen by `--mode` (or its other
name `--method`), else by the `mode:`/`method:` key of the `--config` YAML file, else medusa1;
only then is the rest of the command line parsed, into that recipe's config, so
`medusaforge train --mode medusa2 --help` lists exactly Medusa-2's options.

`--plan` answers before a launch whether the run fits: it builds the base from its config.json on
the meta device, sizes the recipe's trainable part, and prints the memory of one rank per GPU count
and layout (training/plan.py); nothing is trained and no weights are read.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path

from medusaforge.config import COMMAND_LINE, check_choice, option, read_yaml_mapping

# recipe name -> (module, config class, one line). Each module defines the class and `train(config)`.
RECIPES = {
    "medusa1": ("medusaforge.training.medusa1", "Medusa1Config", "frozen base; the heads train on its final hidden states (online or from a cache)"),
    "medusa2": ("medusaforge.training.medusa2", "Medusa2Config", "the base (LoRA or full) trains jointly with the heads; from stage-1 heads"),
    "eagle3": ("medusaforge.training.eagle3", "Eagle3Config", "frozen base; an EAGLE-3 draft layer over fused low/mid/high features, trained with training-time test"),
}
DEFAULT_RECIPE = "medusa1"
RECIPE_KEYS = ("mode", "method")  # flag names and YAML keys that choose the recipe; not recipe options


@dataclass
class PlanOptions:
    """Flags of `train --plan`: questions about a recipe, not part of it (so not YAML keys)."""

    plan: bool = option(False, "print the memory per GPU of this recipe at --plan-gpus counts and exit; nothing is trained, no weights are read (--model may be a folder holding only config.json, e.g. configs/models/qwen3-8b)")
    plan_gpus: list[int] = option([1, 8], "GPU counts (torchrun ranks) to plan for")
    device_memory_gib: float = option(80.0, "memory of one device in GiB, to say whether each layout fits")

    def validate(self) -> None:
        if any(gpus < 1 for gpus in self.plan_gpus) or self.device_memory_gib <= 0:
            raise ValueError(f"{COMMAND_LINE}: --plan-gpus must be >= 1 and --device-memory-gib > 0")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """PlanOptions' flags, with the dataclass's defaults and help (defaults live in one place)."""
    defaults, fields = PlanOptions(), PlanOptions.__dataclass_fields__
    parser.add_argument("--plan", type=lambda text: text.lower() in ("1", "true", "yes", "on"), nargs="?", const=True,
                        default=defaults.plan, help=fields["plan"].metadata["help"])
    parser.add_argument("--plan-gpus", type=int, nargs="+", default=defaults.plan_gpus,
                        help=f"{fields['plan_gpus'].metadata['help']} (default: {' '.join(map(str, defaults.plan_gpus))})")
    parser.add_argument("--device-memory-gib", type=float, default=defaults.device_memory_gib,
                        help=f"{fields['device_memory_gib'].metadata['help']} (default: {defaults.device_memory_gib:g})")


def plan_options(argv: list[str]) -> PlanOptions:
    chooser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_plan_arguments(chooser)
    known, _ = chooser.parse_known_args(argv)
    options = PlanOptions(known.plan, known.plan_gpus, known.device_memory_gib)
    options.validate()
    return options


def print_plan(name: str, config, options: PlanOptions) -> None:
    """The memory plan of recipe `name` with `config`, one table line per GPU count and layout."""
    from medusaforge.training.plan import format_rows, gib
    from medusaforge.training.plan_model import global_sequences, plan

    shape, trainable, rows, device_type = plan(name, config, options.plan_gpus)
    source = f"offline from {config.cache}" if config.cache else "online (the frozen base runs every micro-batch)"
    print(f"plan: {name} on {config.model} ({device_type}), {source}")
    print(f"  base: {shape.total_params:,} parameters ({shape.num_layers} layers of {shape.layer_params:,}), "
          f"held in fp32; trainable: {trainable:,} parameters, fp32 + AdamW")
    print(f"  micro-batch: {global_sequences(config)} sequences over all ranks x --max-length {config.max_length} "
          f"tokens, counted at full length (GiB per rank below)")
    for line in format_rows(rows, options.device_memory_gib):
        print("  " + line)
    print("  columns: base-w = frozen base weights; train-w, grads, adamw, comm = the trainable part (comm: DDP buckets or "
          "FSDP gathers); bf16cp = autocast copies; base-fw = base forward or cache read; act = heads/draft activations")
    print("  layouts: single = one process; ddp = heads/draft replicated (what train runs under torchrun); "
          "+fsdp-base = the frozen base's layers sharded (--fsdp-base); fsdp = the trainable part fully sharded "
          "(an estimate: train does not shard the trainable part yet)")
    if any(row.total > options.device_memory_gib * 2**30 for row in rows):
        print("  a row that does not fit: lower --batch-size and raise --grad-accum by the same factor (the same "
              "optimizer step), shorten --max-length, or shard the base (--fsdp-base)")
    runtime = rows[0].runtime if rows else 0
    print(f"  total includes {gib(runtime)} GiB of runtime (CUDA context and allocator slack on GPU; on CPU the "
          "process's own baseline is not counted)")


def recipe_name(argv: list[str]) -> str:
    """The recipe a train command line asks for: the flag, else the YAML key, else the default."""
    chooser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    chooser.add_argument("--mode", "--method", dest="mode", default=None)
    chooser.add_argument("--config", type=Path, default=None)
    known, _ = chooser.parse_known_args(argv)
    if known.mode is not None:
        check_choice(known.mode, list(RECIPES), "mode", f"{COMMAND_LINE} (--mode/--method)")
        return known.mode
    if known.config is not None:
        written = {str(k).replace("-", "_"): v for k, v in read_yaml_mapping(known.config).items()}
        given = [key for key in RECIPE_KEYS if key in written]
        if len(given) == 2 and written["mode"] != written["method"]:
            raise ValueError(f"{known.config}: 'mode' ({written['mode']!r}) and 'method' ({written['method']!r}) disagree; give one")
        if given:
            check_choice(written[given[0]], list(RECIPES), given[0], str(known.config))
            return written[given[0]]
    return DEFAULT_RECIPE


def load_recipe(name: str):
    """-> (config class, train function) of a registered recipe (importing only that recipe)."""
    module_name, class_name, _ = RECIPES[name]
    module = importlib.import_module(module_name)
    return getattr(module, class_name), module.train


def select_recipe(argv: list[str], parser: argparse.ArgumentParser):
    """Called by cli.py: choose the recipe, describe it on `parser`, add the --mode/--method flag.
    -> (config class, run function, YAML keys the recipe's config must not see)."""
    name = recipe_name(argv)
    config_class, run = load_recipe(name)
    options = plan_options(argv)
    if options.plan:
        run = lambda config: print_plan(name, config, options)  # noqa: E731 (the recipe's run, replaced)
    listing = "; ".join(f"{recipe}: {line}" for recipe, (_, _, line) in RECIPES.items())
    parser.description = (
        f"{(config_class.__doc__ or '').strip()}\n\nRecipe: {name}. Recipes ({listing}). "
        f"`medusaforge train --mode RECIPE --help` lists that recipe's options."
    )
    parser.add_argument("--mode", "--method", dest="mode", default=None, metavar="{" + ",".join(RECIPES) + "}",
                        help=f"training recipe, also read from the YAML key mode/method (default: {DEFAULT_RECIPE})")
    add_plan_arguments(parser)
    return config_class, run, RECIPE_KEYS
