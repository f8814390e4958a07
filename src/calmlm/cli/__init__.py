"""The ``calm`` command line. Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the parsed args)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

from ..errors import CalmError, CalmWarning

# Module names in calmlm.cli, in the order `calm --help` lists them.
COMMANDS = [
    "quickstart", "tokenizer", "train_ae", "eval_ae", "train", "train_baseline", "generate", "serve", "eval",
    "compare", "finetune", "push", "plot", "convert", "flops",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calm", description="Continuous Autoregressive Language Models: train, "
                                                              "evaluate, sample and measure CALM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            return int(args.func(args) or 0)
    except CalmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints calmlm's own warnings as one line, like its errors, and passes
    other libraries' to ``show``."""
    def show_warning(message: Warning | str, category: type[Warning], *rest: Any) -> None:
        if issubclass(category, CalmWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, *rest)
    return show_warning
