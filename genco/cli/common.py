"""What the CLI modules share: JSON output, and flags generated from the config dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from genco.errors import ConfigError


def print_json(obj: object) -> None:
    """Results go to stdout as indented JSON (paths and other objects as strings)."""
    print(json.dumps(obj, indent=2, default=str))


def _flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def add_config_args(
    parser: argparse.ArgumentParser,
    config: type,
    only: Sequence[str],
    prefix: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> None:
    """One flag per named field of a config dataclass (``--prefix-field-name``): its type,
    default and help text are the field's, so they are written once, in the dataclass.

    ``overrides``: a different default for this command on purpose (e.g. a faster local
    run), named by the caller. A bool field that defaults to False becomes a switch.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    overrides = overrides or {}
    for name in only:
        f = fields[name]
        default = overrides.get(name, f.default)
        text = f.metadata.get("help", "").replace("%", "%%")
        if isinstance(f.default, bool):
            if default:
                raise TypeError(f"{config.__name__}.{name}: no switch for a True default")
            parser.add_argument(_flag(prefix, name), action="store_true", help=text)
        else:
            parser.add_argument(
                _flag(prefix, name),
                type=type(f.default),
                default=default,
                help=f"{text} (default {default})",
            )


def config_from_args(
    args: argparse.Namespace, config: type, only: Sequence[str], prefix: str = "", **fixed: Any
) -> Any:
    """The config with the named fields read from ``args`` (as ``add_config_args`` named
    them) and ``fixed`` ones given by the caller; every other field keeps its default."""
    values = {name: getattr(args, prefix + name) for name in only}
    try:
        return config(**values, **fixed)
    except ValueError as exc:  # __post_init__ names the field and value: a bad flag
        raise ConfigError(str(exc)) from exc
