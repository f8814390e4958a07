"""``calm convert SRC DST``: any checkpoint calmlm can read (reference or native format, local folder or
Hugging Face repo id) -> a native calmlm checkpoint (config.json + safetensors, sharded when large, + tokenizer)."""

from __future__ import annotations

import argparse
import re

import torch

from ..data.tokenizer import Tokenizer, check_vocab
from ..errors import CheckpointError
from ..io.checkpoint import save_model
from ..io.loading import load

DTYPES = ("keep", "float32", "bfloat16", "float16")
# a number, then an optional K/M/G/T prefix (binary with "i": KiB = 2^10) and an optional B
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i)?)?B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GB' -> 2e9 bytes, '500MiB' -> 500*2^20, '2G' = '2GB', '1048576' -> bytes."""
    m = _SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise CheckpointError(f"--max-shard-size {text!r} is not a size; write e.g. 2GB, 500MB or 1GiB")
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint (reference format or repo id) to calmlm's safetensors format",
        description="Read SRC (a calmlm or CALM-reference checkpoint folder, or a Hugging Face repo id such as "
                    "cccczshao/CALM-M) and write DST in calmlm's native format: config.json, model.safetensors "
                    "(sharded above --max-shard-size) and the tokenizer when one is available.")
    p.add_argument("src", metavar="SRC", help="checkpoint folder or Hugging Face repo id")
    p.add_argument("dst", metavar="DST", help="output folder (replaced atomically if it exists)")
    p.add_argument("--dtype", choices=DTYPES, default="keep",
                   help="weight dtype to write (default: keep the stored dtype)")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="largest weight file before sharding, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json / tokenizer.model (or its folder) to bundle; default: SRC's own")
    p.add_argument("--autoencoder", metavar="PATH",
                   help="reference CALM only: the autoencoder folder whose config to use (default: inferred "
                        "from the ae_model.* weights in SRC)")
    p.add_argument("--revision", metavar="REV", help="Hub branch, tag or commit of SRC")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    max_shard = parse_size(args.max_shard_size)  # before the (slow) load
    dtype = None if args.dtype == "keep" else getattr(torch, args.dtype)
    model = load(args.src, dtype=dtype, autoencoder=args.autoencoder, revision=args.revision)
    tokenizer = model.tokenizer
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
        check_vocab(tokenizer, model.config.vocab_size)
    save_model(model, args.dst, tokenizer=tokenizer, metadata={"converted_from": str(args.src)},
               max_shard_size=max_shard)
    n = sum(p.numel() for p in model.parameters())  # parameters() counts tied weights once
    print(f"wrote {args.dst}: {model.config.kind}, {n:,} parameters, dtype "
          f"{next(model.parameters()).dtype}, tokenizer {'included' if tokenizer is not None else 'none'}")
    return 0
