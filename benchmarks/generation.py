"""Generation speed: CALM (K=4) against the baseline with the same backbone, side by side in one run.

Random weights (speed does not depend on them). Reports generated tokens/s at batch 1 and 8, T=1
(and optionally T<1 with the batch approximation). Usage:
    python benchmarks/generation.py [--preset base] [--new-tokens 256] [--out bench_out/generation.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from calmlm.models.baseline import BaselineLM  # noqa: E402
from calmlm.models.calm import CALM  # noqa: E402
from calmlm.config import baseline_preset, calm_preset  # noqa: E402
from calmlm.sampling.generation import generate  # noqa: E402


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bfloat16 on CUDA, float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    table = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def build_pair(calm_name: str, baseline_name: str, device: torch.device, dtype: torch.dtype,
               seed: int = 0, head_std: float = 0.1) -> tuple[CALM, BaselineLM]:
    """Random-weight CALM and baseline for timing generation, in eval mode on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    calm = CALM(calm_preset(calm_name)).to(device, dtype).eval()
    # the head's output layer starts at zero (every latent identical); give it weights so the decoder and
    # the temperature sampler see varied chunks, as with a trained model (head_std=0: all draws identical,
    # the worst case for decoding a pool slot by slot)
    torch.nn.init.normal_(calm.head.final_layer.linears[2].weight, std=head_std)
    base = BaselineLM(baseline_preset(baseline_name)).to(device, dtype).eval()
    return calm, base


def time_generation(model, batch: int, new_tokens: int, prompt_len: int, repeats: int,
                    generate_fn: Callable[..., torch.Tensor] = generate, clock: Callable[[], float] = time.perf_counter,
                    **kw) -> float:
    """Generated tokens/s, best of ``repeats`` after a short warm-up, of ``generate_fn`` (default: ours), timed
    by ``clock`` (wall time; ``time.process_time`` counts only this process's CPU time)."""
    device = next(model.parameters()).device
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    generate_fn(model, prompt, max_new_tokens=min(new_tokens, 16), seed=0, **kw)  # warm-up
    best = float("inf")
    for r in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        out = generate_fn(model, prompt, max_new_tokens=new_tokens, seed=r, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, clock() - t0)
        assert out.shape[1] == prompt_len + new_tokens
    return batch * new_tokens / best


@torch.no_grad()
def reference_style_generate(model: CALM, prompt: torch.Tensor, max_new_tokens: int, temperature: float,
                             pool_size: int, seed: int = 0) -> torch.Tensor:
    """The reference implementation's T < 1 generate loop, re-created with our modules so its speed can be
    measured side by side: every step runs ``pool_size`` separate head + decoder passes over the batch, then
    a per-sequence Python loop counts the decoded chunks with a ``Counter`` and picks one with weight
    C(count, n), falling back to n-1, ... (integer 1/T = n). Same backbone, KV cache and dtype as ours."""
    rng = random.Random(seed)
    n, k = round(1 / temperature), model.config.chunk_size
    cache = model.backbone.new_cache(prompt.shape[0], prompt.shape[1] // k + max_new_tokens // k + 1)
    hidden = model.hidden_states(prompt, cache)[:, -1]
    out = [prompt]
    for _ in range(max_new_tokens // k):
        pool = torch.stack([model.sample_chunks(hidden) for _ in range(pool_size)], 1).tolist()  # (B, N, K)
        chosen = []
        for draws in pool:
            counts = Counter(map(tuple, draws))
            for m in range(n, 0, -1):
                weighted = [(chunk, math.comb(c, m)) for chunk, c in counts.items() if c >= m]
                if weighted:
                    break
            chosen.append(rng.choices([c for c, _ in weighted], weights=[w for _, w in weighted])[0])
        new = torch.tensor(chosen, device=prompt.device)
        out.append(new)
        hidden = model.hidden_states(new, cache)[:, -1]
    return torch.cat(out, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calm-preset", default="base")
    ap.add_argument("--baseline-preset", default="base")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--temperatures", default="1.0")
    ap.add_argument("--pool-size", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto = bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--head-std", type=float, default=0.1,
                    help="std of the random head's output layer: how diverse a pool of draws is (0 = identical)")
    ap.add_argument("--calm-model", help="time this trained CALM checkpoint instead of a random-weight preset")
    ap.add_argument("--compile", action="store_true", help="generate(..., compile=True) for both models")
    ap.add_argument("--reference-loop", action="store_true",
                    help="at T < 1 also time the reference implementation's loop (pool of separate decoder passes "
                         "+ per-sequence Counter), re-created with our modules")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process: CPU time of this process, robust to other processes on a busy machine (use with "
                         "one thread: with more it also counts threads waiting for each other)")
    ap.add_argument("--out", default="bench_out/generation.json")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    calm, base = build_pair(args.calm_preset, args.baseline_preset, device, dtype, head_std=args.head_std)
    if args.calm_model:
        from calmlm.io.loading import load

        calm = load(args.calm_model, device=device, dtype=dtype).eval()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for t in [float(x) for x in args.temperatures.split(",")]:
            kw = dict(temperature=t, pool_size=args.pool_size, compile=args.compile)
            calm_tps = time_generation(calm, batch, args.new_tokens, args.prompt_len, args.repeats, clock=clock, **kw)
            base_tps = time_generation(base, batch, args.new_tokens, args.prompt_len, args.repeats, clock=clock,
                                       temperature=t, compile=args.compile)
            row = dict(batch=batch, temperature=t, pool_size=args.pool_size if t < 1 else None,
                       calm_tokens_per_s=round(calm_tps, 1), baseline_tokens_per_s=round(base_tps, 1),
                       speedup=round(calm_tps / base_tps, 2))
            if args.reference_loop and t < 1:
                ref_tps = time_generation(calm, batch, args.new_tokens, args.prompt_len, 1, reference_style_generate,
                                          temperature=t, pool_size=args.pool_size)  # one run: it is slow
                row.update(reference_loop_tokens_per_s=round(ref_tps, 1), speedup_vs_reference_loop=round(calm_tps / ref_tps, 2))
            print(json.dumps(row), flush=True)
            results.append(row)
    report = dict(benchmark="generation", clock=args.clock, dtype=str(dtype).replace("torch.", ""), calm_preset=args.calm_preset,
                  calm_model=args.calm_model, compile=args.compile, head_std=None if args.calm_model else args.head_std,
                  baseline_preset=args.baseline_preset,
                  calm_config=calm.config.to_dict(), new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                  results=results)
    write_json(args.out, report, device)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
