"""Generation speed: CALM (K=4) against the baseline with the same backbone, side by side in one run.

Random weights (speed does not depend on them). Reports generated tokens/s at batch 1 and 8, T=1
(and optionally T<1 with the batch approximation). Usage:
    python benchmarks/generation.py [--preset base] [--new-tokens 256] [--out bench_out/generation.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from calmlm.baseline import BaselineLM
from calmlm.calm import CALM  # noqa: E402
from calmlm.config import baseline_preset, calm_preset  # noqa: E402
from calmlm.generation import generate  # noqa: E402


def time_generation(model, batch: int, new_tokens: int, prompt_len: int, repeats: int, **kw) -> float:
    device = next(model.parameters()).device
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=device)
    generate(model, prompt, max_new_tokens=min(new_tokens, 16), seed=0, **kw)  # warm-up
    best = float("inf")
    for r in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(model, prompt, max_new_tokens=new_tokens, seed=r, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        assert out.shape[1] == prompt_len + new_tokens
    return batch * new_tokens / best


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
    ap.add_argument("--out", default="bench_out/generation.json")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    calm = CALM(calm_preset(args.calm_preset)).to(device, dtype).eval()
    torch.nn.init.normal_(calm.head.final_layer.linears[2].weight, std=0.1)  # non-degenerate latents
    base = BaselineLM(baseline_preset(args.baseline_preset)).to(device, dtype).eval()
    results = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for t in [float(x) for x in args.temperatures.split(",")]:
            kw = dict(temperature=t, pool_size=args.pool_size)
            calm_tps = time_generation(calm, batch, args.new_tokens, args.prompt_len, args.repeats, **kw)
            base_tps = time_generation(base, batch, args.new_tokens, args.prompt_len, args.repeats, temperature=t)
            row = dict(batch=batch, temperature=t, pool_size=args.pool_size if t < 1 else None,
                       calm_tokens_per_s=round(calm_tps, 1), baseline_tokens_per_s=round(base_tps, 1),
                       speedup=round(calm_tps / base_tps, 2))
            print(json.dumps(row), flush=True)
            results.append(row)
    report = dict(benchmark="generation", dtype=str(dtype).replace("torch.", ""), calm_preset=args.calm_preset, baseline_preset=args.baseline_preset,
                  calm_config=calm.config.to_dict(), new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                  results=results)
    write_json(args.out, report, device)
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
