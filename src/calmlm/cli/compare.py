"""`calm compare`: CALM (K = --chunk-sizes) against the baseline with the same backbone, to the same training
budget (--flops or --minutes), BrierLM at log-spaced points; writes compare.json and two PNGs."""

from __future__ import annotations

import argparse

from ..train.compare import CompareConfig, Comparison, __doc__ as compare_doc
from . import training as tr
from .options import DEVICE_HELP, add_dataclass_arguments, dataclass_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="performance against training compute: CALM vs the baseline, same budget",
                       description=compare_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_arguments(p.add_argument_group("comparison"), CompareConfig)
    tr.add_data_args(p)
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue an interrupted comparison in --out")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    Comparison(dataclass_from_args(CompareConfig, args), tr.data_options(args), device=args.device,
               resume=args.resume, progress=not args.no_progress).run()
    return 0
