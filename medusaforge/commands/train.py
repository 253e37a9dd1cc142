"""`medusaforge train`: pick a training recipe, parse its own options, run it.

Each recipe is one module in medusaforge/training/ with its own config dataclass and a
`train(config)` loop written out top to bottom. The recipe is chosen by `--mode` (or its other
name `--method`), else by the `mode:`/`method:` key of the `--config` YAML file, else medusa1;
only then is the rest of the command line parsed, into that recipe's config, so
`medusaforge train --mode medusa2 --help` lists exactly Medusa-2's options.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from medusaforge.config import COMMAND_LINE, check_choice, read_yaml_mapping

# recipe name -> (module, config class, one line). Each module defines the class and `train(config)`.
RECIPES = {
    "medusa1": ("medusaforge.training.medusa1", "Medusa1Config", "frozen base; the heads train on its final hidden states (online or from a cache)"),
    "medusa2": ("medusaforge.training.medusa2", "Medusa2Config", "the base (LoRA or full) trains jointly with the heads; from stage-1 heads"),
    "eagle3": ("medusaforge.training.eagle3", "Eagle3Config", "frozen base; an EAGLE-3 draft layer over fused low/mid/high features, trained with training-time test"),
}
DEFAULT_RECIPE = "medusa1"
RECIPE_KEYS = ("mode", "method")  # flag names and YAML keys that choose the recipe; not recipe options


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
    listing = "; ".join(f"{recipe}: {line}" for recipe, (_, _, line) in RECIPES.items())
    parser.description = (
        f"{(config_class.__doc__ or '').strip()}\n\nRecipe: {name}. Recipes ({listing}). "
        f"`medusaforge train --mode RECIPE --help` lists that recipe's options."
    )
    parser.add_argument("--mode", "--method", dest="mode", default=None, metavar="{" + ",".join(RECIPES) + "}",
                        help=f"training recipe, also read from the YAML key mode/method (default: {DEFAULT_RECIPE})")
    return config_class, run, RECIPE_KEYS
