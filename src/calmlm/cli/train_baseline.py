"""`calm train-baseline`: train the discrete Transformer baseline with the same backbone."""

from __future__ import annotations

import argparse

from ..config import preset_names
from ..train import workflows as wf
from . import training as tr


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-baseline", help="train the next-token Transformer baseline (cross-entropy)",
                       description="Train the standard autoregressive baseline; evaluated by BrierLM like CALM.")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer, or an autoencoder run folder to share its tokenizer (default: train one)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--preset", default="small", help=f"baseline preset: {', '.join(preset_names('baseline'))}")
    p.add_argument("--config", default=None, help="BaselineConfig JSON (overrides --preset)")
    p.add_argument("--brier-tokens", type=int, default=8192)
    tr.add_data_args(p)
    tr.add_train_args(p, "baseline")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    final = wf.train_baseline(tr.data_options(args), tr.train_config(args), args.tokenizer, args.preset, args.config,
                              args.vocab_size, args.resume, args.device, args.brier_tokens)
    return tr.print_result(final)
