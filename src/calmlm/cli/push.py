"""`calm push`: upload a calmlm checkpoint with a generated model card to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import CalmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a checkpoint with a generated model card to the Hugging Face Hub",
                       description="Upload a calmlm checkpoint (config, safetensors weights, tokenizer; not the "
                                   "optimizer or RNG state) and a model card (config, K, parameters, training data, "
                                   "BrierLM with its protocol when known) in one commit. Read it back with "
                                   "calmlm.load(REPO_ID) or any --model REPO_ID. Needs `huggingface-cli login` "
                                   "or HF_TOKEN.")
    p.add_argument("path", metavar="PATH", help="checkpoint or training run folder (calmlm format)")
    p.add_argument("repo_id", metavar="REPO_ID", help="NAMESPACE/NAME of the model repository (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--eval", metavar="JSON", default=None,
                   help="a `calm eval --json` report to quote in the card (default: the run's last training-time "
                        "BrierLM, if any)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one or HF_TOKEN)")
    p.add_argument("--card-only", action="store_true", help="print the model card and upload nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.hub import model_card, push

    evaluation = None
    if args.eval:
        try:
            evaluation = json.loads(Path(args.eval).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CalmError(f"cannot read the evaluation report {args.eval} ({e}); pass the output of "
                            "`calm eval --json`") from None
    if args.card_only:
        print(model_card(args.path, args.repo_id, evaluation), end="")
        return 0
    url = push(args.path, args.repo_id, private=args.private, token=args.token, commit_message=args.message,
               evaluation=evaluation)
    print(f"pushed {args.path} to https://huggingface.co/{args.repo_id} ({url})")
    return 0
