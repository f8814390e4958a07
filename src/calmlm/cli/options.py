"""Command-line flags generated from typed config dataclasses, so a field's default and help text live in one
place (the dataclass) and the CLI cannot drift from it."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

DEVICE_HELP = "auto (default: CUDA, else Apple MPS, else the CPU), cpu, cuda, cuda:N or mps"


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(scalar type, tuple?) of a field annotation such as ``float | None`` or ``tuple[int, ...]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (tuple, list):
        return typing.get_args(tp)[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser | Any, cls: type, exclude: tuple[str, ...] = (), *,
                            unset: bool = False, defaults: dict[str, Any] | None = None,
                            notes: dict[str, str] | None = None) -> None:
    """One flag per field of ``cls`` (``--field-name``; tuples take several values; bools become switches),
    with the field's default, ``metadata["help"]``, ``metadata["choices"]`` and ``metadata["metavar"]``; the help
    ends in "(default: ...)" unless it mentions the default itself or ``metadata["show_default"]`` is False.

    ``defaults`` replace fields' defaults. ``unset``: flags the user does not give are None (the caller fills
    them in later, e.g. from a recipe); the help still shows the dataclass default, or ``notes[field]``."""
    hints = typing.get_type_hints(cls)
    defaults, notes = defaults or {}, notes or {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        default = defaults.get(f.name, default)
        tp, many = _unwrap(hints[f.name])
        help_text = f.metadata.get("help", "")
        shown = notes.get(f.name, " ".join(map(str, default)) if many else default)
        shows_default = "default" in help_text or not f.metadata.get("show_default", True)
        if not shows_default and (f.name in notes or default not in (None, ())):
            help_text = f"{help_text} (default: {shown})"
        if tp is bool:
            form: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        elif tp in (int, float, str):
            form = {"type": tp, "nargs": "+" if many else None, "choices": f.metadata.get("choices"),
                    "metavar": f.metadata.get("metavar", None if "choices" in f.metadata else f.name.upper())}
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for {tp}")
        parser.add_argument("--" + f.name.replace("_", "-"), help=help_text,
                            default=defaults.get(f.name) if unset else default, **form)


def dataclass_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build ``cls`` from the flags :func:`add_dataclass_arguments` added; flags left None keep the field's default."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if f.init and getattr(args, f.name, None) is not None})
