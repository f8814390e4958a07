"""`calm finetune`: supervised fine-tuning of a CALM or baseline model on prompt/completion data."""

from __future__ import annotations

import argparse

from . import training as tr


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="supervised fine-tuning on prompt/completion or chat data (CALM and baseline)",
        description="Fine-tune a CALM or baseline checkpoint (calmlm or reference format, or a Hub id such as "
                    "cccczshao/CALM-M) on JSON Lines rows {\"prompt\", \"completion\"} or {\"messages\": [...]}. "
                    "Only the completion is learned: CALM left-pads the prompt with EOS to a multiple of K (as "
                    "generation does) and the head's loss scores only the completion's chunks; the baseline masks "
                    "the prompt out of the cross-entropy. Writes a normal run folder (checkpoint/, metrics.jsonl).")
    p.add_argument("--model", required=True, help="checkpoint to start from: run folder, checkpoint, or Hub repo id")
    p.add_argument("--data", required=True, help="training examples: .jsonl (or .json array) of prompt/completion "
                                                 "or messages rows")
    p.add_argument("--val-data", default=None, help="validation examples (default: hold out --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of --data held out for validation")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per padded example (default: the longest example; CALM: a multiple of K)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the training examples (overrides "
                                                              "--max-steps)")
    p.add_argument("--eval-examples", type=int, default=0,
                   help="at each evaluation also generate the first N validation completions and report their "
                        "exact match (default 0: validation loss only)")
    p.add_argument("--eval-temperature", type=float, default=1.0, help="temperature of those generations")
    p.add_argument("--tokenizer", default=None, help="tokenizer file/folder, if the checkpoint has none")
    p.add_argument("--autoencoder", default=None, help="reference-format CALM only: its autoencoder folder")
    tr.add_train_args(p, lr=1e-4, batch_size=8, warmup_steps=20, schedule="constant")  # fine-tuning's recipe
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.finetune import finetune

    final = finetune(args.model, args.data, tr.train_config(args), val_data=args.val_data,
                     val_fraction=args.val_fraction, tokenizer=args.tokenizer, autoencoder=args.autoencoder,
                     epochs=args.epochs, eval_examples=args.eval_examples, eval_temperature=args.eval_temperature,
                     resume=args.resume, device=args.device)
    return tr.print_result(final)
