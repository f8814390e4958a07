"""`calm train-ae`: train the robust chunk autoencoder (paper §2)."""

from __future__ import annotations

import argparse

from ..config import preset_names
from ..train import workflows as wf
from . import training as tr


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-ae", help="train the chunk autoencoder (K tokens <-> one latent vector)",
                       description="Train the VAE autoencoder with KL clipping and token/latent dropout. Trains a "
                                   "byte-level BPE tokenizer first unless --tokenizer is given.")
    p.add_argument("--preset", default="default",
                   help=f"autoencoder preset: {', '.join(preset_names('autoencoder'))} (default: the paper shape)")
    p.add_argument("--config", default=None, help="AutoencoderConfig JSON (overrides --preset)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / tokenizer.model / folder (default: train one)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of a newly trained tokenizer")
    tr.add_data_args(p)
    tr.add_train_args(p, "autoencoder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    final = wf.train_autoencoder(tr.data_options(args), tr.train_config(args), args.preset, args.config,
                                 args.tokenizer, args.vocab_size, args.resume, args.device)
    return tr.print_result(final)
