"""Typed configuration: one dataclass per command, and one parser that maps YAML and flags onto it.

Defaults live only in the dataclass fields. Every field becomes a `--flag-name` with the field's
`help` metadata as its documentation, and the same field name (with `-` or `_`) is accepted as a
YAML key. Precedence: dataclass default < YAML file (`--config`) < command-line flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field that carries its own CLI documentation."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _scalar_type(annotation: Any) -> Any:
    """`int | None` -> int; `list[float]` -> float; `str` -> str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return args[0] if args else str
    if args:
        return _scalar_type(args[0])
    return annotation


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--flag` per dataclass field. Defaults are left to the dataclass (argparse sees None)."""
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose keys are the options below")
    types = _field_types(cls)
    for field in dataclasses.fields(cls):
        annotation = types[field.name]
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        help_text = f"{field.metadata.get('help', '')} (default: {default})"
        scalar = _scalar_type(annotation)
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        if "choices" in field.metadata:
            kwargs["choices"] = field.metadata["choices"]
        if scalar is bool:
            # `--flag` alone means true; `--flag false` is also accepted so YAML values can be overridden.
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, **kwargs)
        elif _is_list(annotation):
            parser.add_argument(flag, type=scalar, nargs="+", **kwargs)
        else:
            parser.add_argument(flag, type=scalar, **kwargs)


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    if value is None:
        return None
    scalar = _scalar_type(annotation)
    try:
        if _is_list(annotation):
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [scalar(v) for v in value]
        if scalar is bool and not isinstance(value, bool):
            return _parse_bool(str(value))
        if scalar is Path or scalar is str:
            return scalar(value)
        if scalar in (int, float) and isinstance(value, bool):
            raise ValueError("boolean given")
        return scalar(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ValueError(f"{source}: option {key!r}: cannot read {value!r} as {annotation}: {error}") from None


def load_yaml(path: Path, cls: type) -> dict[str, Any]:
    """Read a YAML file into field values for `cls`, refusing unknown keys with the file name."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read config: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file must be a mapping of option: value")
    types = _field_types(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in types:
            known = ", ".join(sorted(types))
            raise ValueError(f"{path}: unknown option {key!r} for {cls.__name__}; known options: {known}")
        values[name] = _coerce(value, types[name], str(key), str(path))
    return values


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build the dataclass from defaults, then the YAML file, then explicit flags."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        values.update(load_yaml(args.config, cls))
    for field in dataclasses.fields(cls):
        flag_value = getattr(args, field.name, None)
        if flag_value is not None:
            values[field.name] = flag_value
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def parse_config(cls: type, argv: list[str] | None = None) -> Any:
    """Parse a command line straight into `cls` (handy for scripts and tests)."""
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly dict of a config (paths as strings)."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        out[key] = str(value) if isinstance(value, Path) else value
    return out
