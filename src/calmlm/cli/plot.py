"""``calm plot``: figures. ``calm plot accuracy-diversity`` draws accuracy against collision rate as the
temperature varies (paper figures 10-11), for one or several models on the same evaluation data."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import CalmError
from ..io.loading import load_model_and_tokenizer
from .common import evaluation_data
from .eval import add_data_arguments, default_block_size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plot", help="figures: accuracy vs diversity under temperature",
                              description="Draw figures as PNG files (needs matplotlib: pip install 'calmlm[plot]').")
    sub = p.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    a = sub.add_parser(
        "accuracy-diversity", help="accuracy vs collision rate as the temperature varies (paper figs. 10-11)",
        description="For each temperature, the accuracy of next-step samples (mean 1{x=y}: next token for the "
                    "baseline, whole next chunk for CALM) against their collision rate (mean 1{x1=x2}, lower = "
                    "more diverse). Baseline: softmax temperature, exact expectations. CALM: T=1 plain draws, "
                    "T<1 the batch approximation over a pool of N head draws, for each N in --pool-sizes.")
    a.add_argument("--model", required=True, action="append", metavar="PATH",
                   help="checkpoint folder; repeat to compare models on one figure")
    add_data_arguments(a)
    a.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.5, 1 / 3], metavar="T",
                   help="temperatures (default: 1 1/2 1/3); CALM needs 0 < T <= 1")
    a.add_argument("--pool-sizes", type=int, nargs="+", default=[16, 64, 256], metavar="N",
                   help="CALM pool sizes for T < 1 (default: 16 64 256)")
    a.add_argument("--out", required=True, metavar="FILE.png", help="the PNG file to write")
    a.add_argument("--json", action="store_true", help="also print the points as JSON")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=run_accuracy_diversity)


def run_accuracy_diversity(args: argparse.Namespace) -> int:
    from ..evaluation.brierlm import accuracy_diversity
    from ..evaluation.plotting import _pyplot, plot_accuracy_diversity

    if not args.out.lower().endswith(".png"):
        raise CalmError(f"--out {args.out} should be a .png file")
    _pyplot()  # fail before the (slow) evaluation when matplotlib is missing
    report: dict[str, Any] = {}
    for path in args.model:
        model, tok = load_model_and_tokenizer(path, args.device, args.tokenizer, "stored", purpose="BrierLM")
        block_size = default_block_size(model, args.block_size)
        data, source = evaluation_data(path, model, tok, block_size, args.data, args.text_field, args.cache_dir)
        points = accuracy_diversity(model, data, args.temperatures, args.pool_sizes, block_size, args.batch_size,
                                    args.max_tokens, seed=args.seed, progress=not args.no_progress)
        label = path if path not in report else f"{path} ({len(report)})"
        report[label] = {"data": source, "block_size": block_size, "points": points}
    out = plot_accuracy_diversity({label: r["points"] for label, r in report.items()}, args.out)
    if args.json:
        print(json.dumps({"figure": str(out), "models": report}, indent=2))
    else:
        for label, r in report.items():
            print(f"{label}: block size {r['block_size']}, data {r['data']}")
            for pt in r["points"]:
                pool = f", N={pt['pool_size']}" if pt["pool_size"] else ""
                print(f"  T={pt['temperature']:.3g}{pool}: accuracy {pt['accuracy']:.4f}, "
                      f"collision {pt['collision']:.4f} ({pt['positions']} positions)")
        print(f"wrote {out}")
    return 0
