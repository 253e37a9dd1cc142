"""`medusaforge COMMAND ...`: parses options into the command's config dataclass and calls its `run`.

Each command lives in its own module (medusaforge/commands/), which defines a config dataclass and
a `run(config)` function; this file only wires names to them. Only the named command's module is
imported, so one command's imports never slow down or break another's. `train` first picks its
recipe (`--mode`/`--method`, or the YAML file's `mode`/`method` key) and then parses that recipe's
own options (see commands/train.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from medusaforge.config import add_dataclass_arguments, config_from_args

# name -> (module, config class, run function, one-line description)
COMMANDS = {
    "distill": ("medusaforge.commands.distill", "DistillConfig", "run", "let the base model write the assistant replies (self-distillation)"),
    "train": ("medusaforge.commands.train", None, None, "train a drafter: Medusa heads (--mode medusa1), heads + base (--mode medusa2)"),
    "generate": ("medusaforge.commands.generate", "GenerateConfig", "run", "generate text with tree speculative decoding"),
    "eval": ("medusaforge.commands.eval", "EvalConfig", "run", "measure acceptance length and speedup against plain greedy decoding"),
    "tree": ("medusaforge.commands.tree", "TreeSearchConfig", "run", "search a hardware-aware sparse candidate tree"),
    "cache": ("medusaforge.commands.cache", "CacheConfig", "run", "cache the base model's final hidden states for offline training"),
    "export": ("medusaforge.commands.export", "ExportConfig", "run", "export heads to vLLM or original-Medusa format"),
}


def _top_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<9} {description}" for name, (_, _, _, description) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="medusaforge", description="Train, evaluate and export speculative-decoding drafters.",
        epilog=f"commands:\n{listing}\n\n`medusaforge COMMAND --help` lists a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's options")
    return parser


def parse_command(argv: list[str]):
    """`[COMMAND, --option, ...]` -> (command name, its config, its run function). A bad value
    raises ValueError naming the option and its source; a malformed command line exits through argparse."""
    top = _top_parser().parse_args(argv)
    name, options = top.command, top.options
    module_name, config_name, run_name, description = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"medusaforge {name}")
    skip: tuple[str, ...] = ()
    if hasattr(module, "select_recipe"):
        # The recipe decides which config class (and so which options) the rest of the line has.
        config_class, run, skip = module.select_recipe(options, parser)
    else:
        config_class, run = getattr(module, config_name), getattr(module, run_name)
        parser.description = (config_class.__doc__ or description).strip()
    add_dataclass_arguments(parser, config_class)
    args = parser.parse_args(options)
    return name, config_from_args(config_class, args, skip), run


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
