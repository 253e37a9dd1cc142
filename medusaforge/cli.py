"""`medusaforge SUBCOMMAND ...`: parses options into each command's dataclass and calls its `run`.

Each command lives in its own module, which defines a config dataclass and a `run(config)`
function; this file only wires names to them (imported lazily, so `--help` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from medusaforge.config import add_dataclass_arguments, config_from_args

# name -> (module, config class, run function, one-line description)
COMMANDS = {
    "distill": ("medusaforge.commands.distill", "DistillConfig", "run", "let the base model write the assistant replies (self-distillation)"),
    "train": ("medusaforge.commands.train", "TrainConfig", "run", "train Medusa heads (Medusa-1) or heads + base (Medusa-2)"),
    "generate": ("medusaforge.commands.generate", "GenerateConfig", "run", "generate text with tree speculative decoding"),
    "eval": ("medusaforge.commands.eval", "EvalConfig", "run", "measure acceptance length and speedup against plain greedy decoding"),
    "tree": ("medusaforge.commands.tree", "TreeSearchConfig", "run", "search a hardware-aware sparse candidate tree"),
    "cache": ("medusaforge.commands.cache", "CacheConfig", "run", "cache the base model's final hidden states for offline training"),
    "export": ("medusaforge.commands.export", "ExportConfig", "run", "export heads to vLLM or original-Medusa format"),
}


def _load(name: str):
    module_name, config_name, run_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, run_name)


def build_parser(available_only: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medusaforge", description="Train, evaluate and export Medusa heads.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, _, _, description) in COMMANDS.items():
        if available_only and importlib.util.find_spec(module_name) is None:
            continue
        config_class, _ = _load(name)
        sub = subparsers.add_parser(name, help=description, description=(config_class.__doc__ or description).strip())
        add_dataclass_arguments(sub, config_class)
    return parser


def parse_command(argv: list[str]):
    """`[COMMAND, --option, ...]` -> (command name, its config, its run function). Every bad
    option raises ValueError (or exits through argparse for a malformed command line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config_class, run = _load(args.command)
    return args.command, config_from_args(config_class, args), run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        command, config, run = parse_command(argv)
    except ValueError as error:
        print(f"medusaforge {argv[0] if argv else ''}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        run(config)
    except (ValueError, OSError, RuntimeError) as error:
        # Expected user-facing failures (bad data, wrong heads, existing output) get one clear line.
        print(f"medusaforge {command}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
