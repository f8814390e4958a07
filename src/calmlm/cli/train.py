"""`calm train`: train a CALM next-vector model on top of a trained autoencoder (paper §3)."""

from __future__ import annotations

import argparse

from ..config import preset_names
from ..train import workflows as wf
from . import training as tr


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a CALM model (energy, flow or diffusion head) on a frozen autoencoder",
                       description="Train CALM: the backbone reads chunks of K tokens, the generative head (--head: "
                                   "energy by default, flow or diffusion) predicts the next chunk's latent. Periodic "
                                   "evaluation reports BrierLM.")
    p.add_argument("--autoencoder", required=True, help="trained autoencoder (run folder, checkpoint or Hub id)")
    p.add_argument("--preset", default="small", help=f"CALM preset: {', '.join(preset_names('calm'))}")
    p.add_argument("--config", default=None, help="CALMConfig JSON (overrides --preset)")
    p.add_argument("--brier-tokens", type=int, default=8192, help="tokens scored by BrierLM at each evaluation")
    tr.add_head_args(p)
    tr.add_aid_args(p)
    tr.add_data_args(p)
    tr.add_train_args(p, "calm")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    final = wf.train_calm(tr.data_options(args), tr.train_config(args), args.autoencoder, args.preset, args.config,
                          args.resume, args.device, args.brier_tokens,
                          {**tr.head_options(args), **tr.aid_options(args)})
    return tr.print_result(final)
