"""`calm generate`: stream text from a CALM model or the baseline."""

from __future__ import annotations

import argparse

from . import training as tr
from ..io.loading import load_model_and_tokenizer
from .options import DEVICE_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a CALM or baseline checkpoint",
                       description="Generate text, streaming it as chunks are produced. CALM prompts whose length "
                                   "is not a multiple of K are left-padded with EOS.")
    p.add_argument("--model", required=True, help="checkpoint folder (native or reference format) or Hub repo id")
    p.add_argument("--prompt", default="", help="prompt text (default: empty)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="CALM: in (0, 1], likelihood-free; baseline: softmax temperature, 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="baseline only")
    p.add_argument("--sampler", choices=["batch", "exact"], default="batch", help="CALM temperature sampler (T<1)")
    p.add_argument("--pool-size", type=int, default=200, help="CALM batch sampler: draws per step")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tokenizer", default=None, help="tokenizer file/folder if the checkpoint has none")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto = bfloat16 on GPUs, the stored dtype on CPU; bfloat16 is also ~3x faster on "
                        "CPUs with AMX (e.g. Sapphire Rapids) for T<1, where hundreds of latents are decoded per step")
    p.add_argument("--compile", action="store_true",
                   help="decode on a static KV cache with the step compiled by torch.compile and, on GPUs, "
                        "replayed as a CUDA graph (compiling takes a while: pays off on long generations)")
    tr.add_head_args(p, sampling_only=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..sampling.generation import iter_generate

    model, tok = load_model_and_tokenizer(args.model, args.device, args.tokenizer, args.dtype, purpose="generation")
    tr.apply_head_options(model, args)
    stream = args.num_samples == 1  # several samples are printed one after another at the end
    rows: list[list[int]] = [[] for _ in range(args.num_samples)]
    printed = ""
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tok.eos_id
    if stream:
        print(args.prompt, end="")
    for new in iter_generate(model, tok.encode(args.prompt), args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, sampler=args.sampler, pool_size=args.pool_size,
                             num_samples=args.num_samples, eos_token_id=eos, seed=args.seed, compile=args.compile):
        for row, toks in zip(rows, new.tolist()):
            row.extend(toks)
        if stream:
            text = tok.decode(_until_eos(rows[0], eos))
            print(text[len(printed):], end="", flush=True)
            printed = text
    if stream:
        print()
    else:
        for i, row in enumerate(rows):
            print(f"--- sample {i + 1} ---")
            print(args.prompt + tok.decode(_until_eos(row, eos)))
    return 0


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids
