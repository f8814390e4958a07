"""``calm eval``: BrierLM (paper §4) of a CALM or baseline checkpoint.

Evaluation data, in this order:

* ``--data SPEC`` (any spec of :func:`calmlm.data.corpus.open_corpus`, e.g. the paper's set
  ``../shared/data/wikitext103_test_documents.jsonl``): every document is tokenised with the model's own
  tokenizer (EOS after each), concatenated and cut into ``--block-size`` blocks, the remainder dropped.
* otherwise the model's own validation split, when the checkpoint records its training data: a ``data``
  entry in config.json's metadata, ``{"spec", "val_data", "val_fraction", "seed", "text_field",
  "cache_dir"}`` as passed to :func:`calmlm.data.corpus.prepare_corpus` (the same call rebuilds, or reuses from
  the cache, the identical split);
* otherwise an error asking for ``--data``.

The report always states the block size and the number of tokens evaluated: BrierLM moves by about 30 %
with the context length, so a score without them cannot be compared.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import CalmError
from ..train.workflows import DEFAULT_CACHE
from . import training as tr
from ..io.loading import load_model_and_tokenizer
from .common import evaluation_data
from .options import DEVICE_HELP

DEFAULT_BLOCK_SIZE = 1024  # the reference's evaluation default (train_calm.py --block_size)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``calm eval`` and ``calm plot``."""
    p.add_argument("--data", metavar="SPEC",
                   help="evaluation text: a .jsonl/.txt file, folder, glob or hf:NAME (default: the model's "
                        "validation split, when its checkpoint records its data)")
    p.add_argument("--text-field", default="text", help="JSON/dataset field holding the text (default: text)")
    p.add_argument("--block-size", type=int, metavar="L",
                   help=f"tokens per evaluation block (default: {DEFAULT_BLOCK_SIZE}, capped at the model's "
                        "context); BrierLM depends on it, so keep it fixed when comparing models")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="blocks per forward pass (default 8)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="evaluate only the first N tokens' blocks")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's draws (default 0)")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer file/folder, if the checkpoint has none")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help=f"where tokenised data is cached (default: {DEFAULT_CACHE})")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="BrierLM of a CALM or baseline model (paper §4)",
        description="Estimate Brier-1..4 and BrierLM = 100·(Brier-1·...·Brier-4)^(1/4) from two samples per "
                    "position (CALM: whole chunks, continued across chunk boundaries for K < 4; baseline: exact "
                    "probabilities for accuracy, sampled continuations for the collision term). The paper's "
                    "evaluation set is WikiText-103 test: --data wikitext103_test_documents.jsonl.")
    p.add_argument("--model", required=True, metavar="PATH", help="checkpoint folder (or anything calm can load)")
    add_data_arguments(p)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true", help="CALM: torch.compile the head and decoder that draw the "
                   "samples (the same draws; compiling takes a while)")
    tr.add_head_args(p, sampling_only=True)
    p.set_defaults(func=run)


def default_block_size(model: Any, requested: int | None) -> int:
    """--block-size, checked, or else DEFAULT_BLOCK_SIZE capped at the model's context (also for `calm plot`)."""
    if requested is None:
        cfg = model.config
        return min(DEFAULT_BLOCK_SIZE, cfg.max_position_embeddings * (cfg.chunk_size if cfg.kind == "calm" else 1))
    if requested <= 0:
        raise CalmError(f"--block-size must be positive, got {requested}")
    return requested


def format_report(r: dict[str, Any], model: str, source: str) -> str:
    unit = f"chunks of K={r['chunk_size']}" if r["kind"] == "calm" else "tokens"
    lines = [f"BrierLM of {model} ({r['kind']})",
             f"data: {source}",
             f"block size {r['block_size']} tokens, {r['num_tokens']:,} tokens evaluated "
             f"(of {r['available_tokens']:,}) ({r['num_blocks']} blocks, {r['num_positions']:,} positions over "
             f"{unit}), seed {r['seed']}",
             "",
             f"{'n':>3}  {'Brier-n':>9}  {'accuracy':>9}  {'collision':>9}  {'positions':>10}"]
    for n in range(1, 5):
        lines.append(f"{n:>3}  {r[f'brier_{n}']:>9.4f}  {r[f'accuracy_{n}']:>9.4f}  {r[f'collision_{n}']:>9.4f}  "
                     f"{r[f'count_{n}']:>10,}")
    if r["kind"] == "calm":
        lines.append(f"chunk accuracy {r['chunk_accuracy']:.4f}, chunk collision rate {r['chunk_collision']:.4f}")
    lines += ["", f"BrierLM {r['brierlm']:.3f}"]
    if "brierlm_note" in r:
        lines.append(f"  ({r['brierlm_note']})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.brierlm import evaluate_brierlm

    model, tok = load_model_and_tokenizer(args.model, args.device, args.tokenizer, "stored", purpose="BrierLM")
    tr.apply_head_options(model, args)
    block_size = default_block_size(model, args.block_size)
    data, source = evaluation_data(args.model, model, tok, block_size, args.data, args.text_field, args.cache_dir)
    r = evaluate_brierlm(model, data, block_size, args.batch_size, args.max_tokens, seed=args.seed,
                         progress=not args.no_progress and not args.json, compile=args.compile)
    print(json.dumps({"model": args.model, "data": source, **r}, indent=2) if args.json
          else format_report(r, args.model, source))
    return 0
