"""The flags the training commands share (data, generative head, training), and their values as configs.

Training flags are generated from :class:`calmlm.train.trainer.TrainConfig`; a flag left out is filled at run time
from the preset's recipe (:func:`calmlm.train.recipes.recipe`), so the library, the CLI and the quickstart start from
the same numbers."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..config import AID_OPTIONS, HEAD_SAMPLING_OPTIONS, CALMConfig
from ..train.recipes import RECIPES, recipe
from ..train.trainer import TrainConfig
from ..train.workflows import DataOptions
from .options import DEVICE_HELP, add_dataclass_arguments, dataclass_from_args

# TrainConfig fields with a flag of their own (the data's --block-size, --out, --minutes, --no-progress)
_NOT_FLAGS = ("block_size", "out_dir", "time_budget_s", "progress")
_FROM_RECIPE = sorted({k for values in RECIPES.values() for k in values})
_HEAD_OPTIONS = ("head", "flow_steps", "flow_solver", "diffusion_steps", "diffusion_sample_steps")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """One flag per DataOptions field but --seed (the training flags' seed is the data's too)."""
    add_dataclass_arguments(p.add_argument_group("data"), DataOptions, exclude=("seed",))


def data_options(args: argparse.Namespace) -> DataOptions:
    """The flags of :func:`add_data_args`, plus --seed when the command has one and it is given."""
    return dataclass_from_args(DataOptions, args)


def add_head_args(p: argparse.ArgumentParser, sampling_only: bool = False) -> None:
    """The generative head's options (CALMConfig fields; ``sampling_only``: those a trained model can change);
    None keeps the preset's / checkpoint's value."""
    names = HEAD_SAMPLING_OPTIONS if sampling_only else _HEAD_OPTIONS
    others = tuple(f.name for f in dataclasses.fields(CALMConfig) if f.name not in names)
    add_dataclass_arguments(p.add_argument_group("generative head (CALM)"), CALMConfig, exclude=others, unset=True)


def head_options(args: argparse.Namespace) -> dict[str, Any]:
    """The head options given on the command line, as CALMConfig fields."""
    return {n: getattr(args, n) for n in _HEAD_OPTIONS if getattr(args, n, None) is not None}


def add_aid_args(p: argparse.ArgumentParser) -> None:
    """The training aids' options (CALMConfig fields, models/aids.py); None keeps the preset's value."""
    others = tuple(f.name for f in dataclasses.fields(CALMConfig) if f.name not in AID_OPTIONS)
    add_dataclass_arguments(p.add_argument_group("training aids (CALM; off in the paper presets)"), CALMConfig,
                            exclude=others, unset=True)


def aid_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training-aid options given on the command line, as CALMConfig fields."""
    return {n: getattr(args, n) for n in AID_OPTIONS if getattr(args, n, None) is not None}


def apply_head_options(model: Any, args: argparse.Namespace) -> None:
    """Apply --flow-steps / --flow-solver / --diffusion-sample-steps to a loaded CALM model."""
    options = head_options(args)
    if options and getattr(model.config, "kind", None) == "calm":
        model.set_head_options(**options)


def add_train_args(p: argparse.ArgumentParser, kind: str | None = None, **defaults: Any) -> None:
    """The training flags: one per TrainConfig field, plus --out, --minutes, --resume, --device, --no-progress.
    ``kind`` ("autoencoder" | "calm" | "baseline"): flags left out come from the recipe of (kind, --preset);
    without it (fine-tuning) from ``defaults``, then TrainConfig's."""
    g = p.add_argument_group("training")
    g.add_argument("--out", required=True, help="run folder")
    notes = {name: "the --preset's recipe (calmlm.train.recipes)" for name in _FROM_RECIPE} if kind else {}
    add_dataclass_arguments(g, TrainConfig, exclude=_NOT_FLAGS, unset=True, defaults=defaults, notes=notes)
    g.add_argument("--minutes", type=float, default=None,
                   help="stop cleanly (eval + save) after this many minutes of training, counted across --resume")
    g.add_argument("--resume", action="store_true", help="continue exactly from the run folder's checkpoint")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(kind=kind)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the parsed flags: the ones given, the rest from the recipe (see add_train_args)."""
    given = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__
             if name not in _NOT_FLAGS and getattr(args, name, None) is not None}
    given.update(block_size=args.block_size, out_dir=args.out, progress=not args.no_progress,
                 time_budget_s=args.minutes * 60 if args.minutes else None)
    return TrainConfig(**given) if args.kind is None else recipe(args.kind, args.preset, **given)


def print_result(final: dict[str, Any]) -> int:
    """Print a training job's final metrics as JSON; the command's exit status."""
    print(json.dumps(final, indent=2, default=str))
    return 0
