"""`calm eval-ae`: reconstruction accuracy of an autoencoder under latent noise, plus a PNG plot."""

from __future__ import annotations

import argparse
import json

from ..errors import CalmError
from ..io.loading import load_model_and_tokenizer
from .common import evaluation_data
from .options import DEVICE_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-ae", help="evaluate an autoencoder: accuracy vs latent noise, active dimensions",
                       description="Token and whole-chunk accuracy with Gaussian noise sigma added to the posterior "
                                   "mean, on held-out data (default: the validation split it was trained with).")
    p.add_argument("--model", required=True, help="autoencoder run folder / checkpoint / Hub id")
    p.add_argument("--data", default=None, help="evaluation corpus (default: the model's validation split)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--sigmas", default="0,0.1,0.2,0.3,0.5")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--max-blocks", type=int, default=200)
    p.add_argument("--plot", default=None, help="write a PNG of accuracy against sigma here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.autoencoder import evaluate_autoencoder, format_autoencoder_report

    model, tok = load_model_and_tokenizer(args.model, args.device, None, "stored", kind="autoencoder")
    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
    except ValueError:
        raise CalmError(f"--sigmas must be comma-separated numbers, got {args.sigmas!r}") from None
    blocks, _ = evaluation_data(args.model, model, tok, args.block_size, args.data, args.text_field)
    r = evaluate_autoencoder(model, blocks, sigmas=sigmas, max_blocks=args.max_blocks)
    if args.plot:
        from ..evaluation.plotting import plot_accuracy_vs_noise
        plot_accuracy_vs_noise(r, args.plot)
        r["plot"] = args.plot
    print(json.dumps(r, indent=2) if args.json else format_autoencoder_report(r))
    return 0
