"""Typed configuration: one dataclass per command, and one parser that maps YAML and flags onto it.

Defaults live only in the dataclass fields. Every field becomes a `--flag-name` with the field's
`help` metadata as its documentation, and the same field name (with `-` or `_`) is accepted as a
YAML key. Precedence: dataclass default < YAML file (`--config`) < command-line flag.

Every value is checked the same way whatever its source (default, YAML, flag): it is read as the
field's type, then checked against the field's `choices`, and a bad one is reported with the key
and where it came from (the YAML file's name, or "command line").
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

# The one dtype vocabulary of every command. A command offers the subset it can honour (training
# has no fp16 loss scaling, so it offers auto/fp32/bf16); the spellings are the same everywhere.
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")
COMMAND_LINE = "command line"


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field that carries its own CLI documentation (and optionally `choices`, and
    `aliases`: other flag names / YAML keys for the same field)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def dtype_option(default: str, help: str, choices: tuple[str, ...] = DTYPE_NAMES) -> Any:
    """A dtype field whose values come from the shared vocabulary (DTYPE_NAMES)."""
    unknown = set(choices) - set(DTYPE_NAMES)
    assert not unknown, f"dtype choices {sorted(unknown)} are not in the shared vocabulary {DTYPE_NAMES}"
    return option(default, help, choices=list(choices))


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--flag` per dataclass field. Defaults are left to the dataclass (argparse sees None).
    Choices are shown in the help but checked by `check_choices`, so a flag and a YAML value fail
    with the same message."""
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose keys are the options below")
    types = _field_types(cls)
    for field in dataclasses.fields(cls):
        annotation = types[field.name]
        flags = [_flag(field.name), *(_flag(alias) for alias in field.metadata.get("aliases", ()))]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        help_text = field.metadata.get("help", "")
        if "choices" in field.metadata:
            help_text += f" (one of: {', '.join(map(str, field.metadata['choices']))})"
        help_text += f" (default: {default})"
        scalar = _scalar_type(annotation)
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        if "choices" in field.metadata:
            kwargs["metavar"] = "{" + ",".join(map(str, field.metadata["choices"])) + "}"
        if scalar is bool:
            # `--flag` alone means true; `--flag false` is also accepted so YAML values can be overridden.
            parser.add_argument(*flags, type=_parse_bool, nargs="?", const=True, **kwargs)
        elif _is_list(annotation):
            parser.add_argument(*flags, type=scalar, nargs="+", **kwargs)
        else:
            parser.add_argument(*flags, type=scalar, **kwargs)


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


def check_choice(value: Any, choices: list | tuple, key: str, source: str) -> None:
    """The one check and message for a value outside its choices, whatever its source."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        if value is not None and item not in choices:
            raise ValueError(f"{source}: option {key!r}: {item!r} is not one of: {', '.join(map(str, choices))}")


def check_choices(cls: type, values: dict[str, Any], sources: dict[str, str]) -> None:
    """Check every field that has `choices`: given values with their source, defaults as 'default'."""
    for field in dataclasses.fields(cls):
        choices = field.metadata.get("choices")
        if choices is None:
            continue
        if field.name in values:
            value, source = values[field.name], sources.get(field.name, COMMAND_LINE)
        else:
            value = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
            source = f"{cls.__name__} default"
        check_choice(value, choices, field.name, source)


def _yaml_names(cls: type) -> dict[str, str]:
    """YAML key (with '_') -> field name, for field names and their aliases."""
    names = {}
    for field in dataclasses.fields(cls):
        names[field.name] = field.name
        for alias in field.metadata.get("aliases", ()):
            names[alias.replace("-", "_")] = field.name
    return names


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file, or a ValueError naming the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: cannot read config: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config file must be a mapping of option: value")
    return raw


def load_yaml(path: Path, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a YAML file into field values for `cls`, refusing unknown keys and bad choices with the
    file name. Keys in `skip` belong to the caller (e.g. `mode`, read by `medusaforge train`)."""
    types = _field_types(cls)
    names = _yaml_names(cls)
    values: dict[str, Any] = {}
    for key, value in read_yaml_mapping(path).items():
        key_name = str(key).replace("-", "_")
        if key_name in skip:
            continue
        if key_name not in names:
            known = ", ".join(sorted(types))
            raise ValueError(f"{path}: unknown option {key!r} for {cls.__name__}; known options: {known}")
        name = names[key_name]
        values[name] = _coerce(value, types[name], str(key), str(path))
    check_choices(cls, values, {name: str(path) for name in values})
    return values


def config_from_args(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> Any:
    """Build the dataclass from defaults, then the YAML file, then explicit flags; every value,
    whatever its source, passes the same checks before `validate()`."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config_path = getattr(args, "config", None)
    if config_path is not None:
        values.update(load_yaml(config_path, cls, skip))
        sources.update({name: str(config_path) for name in values})
    for field in dataclasses.fields(cls):
        flag_value = getattr(args, field.name, None)
        if flag_value is not None:
            values[field.name] = flag_value
            sources[field.name] = f"{COMMAND_LINE} ({_flag(field.name)})"
    check_choices(cls, values, sources)
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
