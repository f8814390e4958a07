"""Cost of exact temperature sampling relative to the batch approximation, on a trained CALM model.

Generates the same number of tokens from the same prompts with ``sampler="batch"`` (pool N) and
``sampler="exact"`` at T=0.5, side by side, and reports tokens/s and their ratio, plus the mean number of
head draws per chunk the exact sampler needed.

    python benchmarks/sampling_model.py --model runs/quickstart/calm [--temperature 0.5] [--pool-size 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from calmlm.sampling import temperature as sampling  # noqa: E402
from calmlm.sampling.generation import generate  # noqa: E402
from calmlm.io.loading import load  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--pool-size", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench_out/sampling_model.json")
    args = ap.parse_args(argv)

    model = load(args.model, device=args.device).eval()
    prompt = model.tokenizer.encode(args.prompt)
    draws: list[torch.Tensor] = []
    original = sampling.exact_temperature_sample_batch

    def counting(*a, **kw):  # record the draws the exact sampler used per chunk
        samples, n = original(*a, **kw)
        draws.append(n.float())
        return samples, n

    results = {}
    for sampler in ("batch", "exact"):
        sampling.exact_temperature_sample_batch = counting if sampler == "exact" else original
        kw = dict(max_new_tokens=args.new_tokens, temperature=args.temperature, sampler=sampler,
                  pool_size=args.pool_size, num_samples=args.batch)
        generate(model, prompt, **{**kw, "max_new_tokens": 8}, seed=0)  # warm-up
        draws.clear()
        t0 = time.perf_counter()
        generate(model, prompt, seed=1, **kw)
        dt = time.perf_counter() - t0
        results[sampler] = {"seconds": round(dt, 3), "tokens_per_s": round(args.batch * args.new_tokens / dt, 1)}
        if sampler == "exact" and draws:
            results[sampler]["mean_draws_per_chunk"] = round(float(torch.cat(draws).mean()), 2)
    sampling.exact_temperature_sample_batch = original
    report = {"benchmark": "exact vs batch temperature sampling on a trained CALM", "model": args.model,
              "temperature": args.temperature, "pool_size": args.pool_size, "batch": args.batch,
              "new_tokens": args.new_tokens, "results": results,
              "exact_cost_relative_to_batch": round(results["exact"]["seconds"] / results["batch"]["seconds"], 2)}
    write_json(args.out, report, args.device)
    print(report)
    return report


if __name__ == "__main__":
    main()
