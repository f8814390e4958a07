"""``calm tokenizer``: train a byte-level BPE tokenizer on a corpus, encode and decode text."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..data.corpus import open_corpus
from ..data.tokenizer import Tokenizer, train_tokenizer
from ..errors import TokenizerError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train a BPE tokenizer, encode or decode text",
                              description="Train a byte-level BPE tokenizer (<pad>=0, <bos>=1, <eos>=2) or use "
                                          "one (a tokenizer.json or Llama 3 tiktoken tokenizer.model) on text.")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train a byte-level BPE tokenizer and save it to a directory")
    t.add_argument("--data", metavar="SPEC", help="corpus: a text/JSONL file, a directory, a glob, a saved `datasets` "
                                                  "folder or hf:NAME[:CONFIG][@SPLIT] (default: the Python standard "
                                                  "library source)")
    t.add_argument("--text-field", default="text", metavar="NAME",
                   help="text field of JSONL/dataset rows (default: text)")
    t.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                   help="vocabulary size incl. specials (default 8192)")
    t.add_argument("--min-frequency", type=int, default=2, metavar="N", help="least count of a merged pair (default 2)")
    t.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write tokenizer.json into")
    t.set_defaults(func=run_train)

    e = sub.add_parser("encode", help="print the token ids of TEXT")
    e.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer directory or file")
    e.add_argument("text", metavar="TEXT")
    e.set_defaults(func=run_encode)

    d = sub.add_parser("decode", help="print the text of token IDS")
    d.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer directory or file")
    d.add_argument("ids", nargs="+", type=int, metavar="ID")
    d.set_defaults(func=run_decode)


def run_train(args: argparse.Namespace) -> int:
    corpus = open_corpus(args.data, args.text_field)
    print(f"training a {args.vocab_size}-token BPE on {corpus.description}")
    start = time.perf_counter()
    tok = train_tokenizer(corpus, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    tok.save(args.out)
    print(f"saved {tok.vocab_size} tokens to {args.out / 'tokenizer.json'} in {time.perf_counter() - start:.1f} s")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    print(" ".join(map(str, Tokenizer.load(args.tokenizer).encode(args.text))))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    tok = Tokenizer.load(args.tokenizer)
    bad = [i for i in args.ids if not 0 <= i < tok.vocab_size]
    if bad:
        raise TokenizerError(f"ids {bad} are outside the tokenizer's vocabulary [0, {tok.vocab_size}); "
                             "pass ids produced by this tokenizer")
    print(tok.decode(args.ids))
    return 0
