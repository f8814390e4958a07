"""Command-line flags generated from typed config dataclasses, so a field's default and help text live in one
place (the dataclass) and the CLI cannot drift from it."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

_SCALARS = (int, float, str)


def _flag(name: str, prefix: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def _unwrap(tp: Any) -> tuple[Any, bool, bool]:
    """(scalar type, optional?, tuple?) of a field annotation such as ``float | None`` or ``tuple[int, ...]``."""
    optional, many = False, False
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        optional = type(None) in args
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    if typing.get_origin(tp) in (tuple, list):
        many, tp = True, args[0]
    return tp, optional, many


def add_dataclass_arguments(parser: argparse.ArgumentParser | Any, cls: type, prefix: str = "",
                            exclude: tuple[str, ...] = (), group: str | None = None, *, unset: bool = False,
                            defaults: dict[str, Any] | None = None, notes: dict[str, str] | None = None) -> None:
    """One flag per field of ``cls`` (``--field-name``; tuples take several values; bools become switches),
    with the field's default, ``metadata["help"]`` and ``metadata["choices"]``.

    ``defaults`` replace fields' defaults. ``unset``: flags the user does not give are None (the caller fills
    them in later, e.g. from a recipe); the help still shows the dataclass default, or ``notes[field]``."""
    target = parser.add_argument_group(group) if group else parser
    hints = typing.get_type_hints(cls)
    defaults, notes = defaults or {}, notes or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = defaults.get(f.name, default)
        tp, _, many = _unwrap(hints[f.name])
        help_text = f.metadata.get("help", "")
        shown = notes.get(f.name, " ".join(map(str, default)) if many else default)
        if "default" not in help_text and (f.name in notes or default not in (None, ())):
            help_text = f"{help_text} (default: {shown})"
        value = defaults.get(f.name) if unset else default
        if tp is bool:
            target.add_argument(_flag(f.name, prefix), dest=prefix + f.name, action=argparse.BooleanOptionalAction,
                                default=value, help=help_text)
            continue
        if tp not in _SCALARS:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {tp}")
        target.add_argument(_flag(f.name, prefix), dest=prefix + f.name, type=tp, nargs="+" if many else None,
                            default=value, choices=f.metadata.get("choices"),
                            metavar=None if "choices" in f.metadata else f.name.upper(), help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", **extra: Any) -> Any:
    """Build ``cls`` from the flags :func:`add_dataclass_arguments` added (plus ``extra`` fields); flags left
    None under ``unset`` keep the field's default."""
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls)
              if f.init and getattr(args, prefix + f.name, None) is not None}
    return cls(**{**values, **extra})
