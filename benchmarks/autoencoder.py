"""Autoencoder benchmark: train on the default corpus for a fixed wall-clock budget, then report training
tokens/s and held-out token accuracy at latent noise sigma = 0 and 0.3.

    python benchmarks/autoencoder.py [--minutes 10] [--preset small] [--out bench_out/autoencoder.json]
Targets: 2-core CPU within 10 minutes >= 99.5 % (sigma 0) and >= 99 % (sigma 0.3); GPU: >= 99.9 % at both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import device_name, write_json  # noqa: E402
from calmlm.train import workflows as wf  # noqa: E402
from calmlm.evaluation.autoencoder import evaluate_autoencoder  # noqa: E402
from calmlm.io.loading import load  # noqa: E402
from calmlm.train.trainer import TrainConfig  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--eval-blocks", type=int, default=200)
    ap.add_argument("--run-dir", default="bench_out/ae_run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench_out/autoencoder.json")
    args = ap.parse_args(argv)

    opts = wf.DataOptions(block_size=args.block_size, cache_dir=str(Path(args.run_dir) / "token_cache"))
    cfg = TrainConfig(lr=args.lr, schedule="constant", warmup_steps=100, batch_size=args.batch_size, max_steps=10**7,
                      eval_every=0, save_every=0, block_size=args.block_size, time_budget_s=args.minutes * 60,
                      out_dir=args.run_dir, progress=False)
    t0 = time.time()
    final = wf.train_autoencoder(opts, cfg, preset=args.preset, device=args.device)
    train_s = time.time() - t0
    records = [json.loads(x) for x in Path(args.run_dir, "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r.get("type") == "train"]
    steps = train_recs[-1]["step"] if train_recs else 0
    tokens = train_recs[-1].get("tokens", steps * args.batch_size * args.block_size) if train_recs else 0
    ae = load(args.run_dir, device=args.device, kind="autoencoder")
    _, val, _ = wf.prepare_data(opts, ae.tokenizer)
    r = evaluate_autoencoder(ae, val, sigmas=(0.0, 0.1, 0.2, 0.3, 0.5), max_blocks=args.eval_blocks)
    acc0, acc3 = r["token_accuracy"]["0.0"], r["token_accuracy"]["0.3"]
    on_gpu = args.device.startswith("cuda")
    target = (0.999, 0.999) if on_gpu else (0.995, 0.99)
    report = {
        "benchmark": "autoencoder", "device": device_name(args.device), "preset": args.preset,
        "config": ae.config.to_dict(), "budget_minutes": args.minutes, "wall_s": round(train_s, 1),
        "steps": steps, "train_tokens": tokens,
        "train_tokens_per_s": round(tokens / max(train_s, 1e-9), 1),
        "token_accuracy": r["token_accuracy"], "chunk_accuracy": r["chunk_accuracy"],
        "active_dims": r["active_dims"], "eval_tokens": r["num_tokens"],
        "target": {"sigma0": target[0], "sigma0.3": target[1]},
        "met": {"sigma0": acc0 >= target[0], "sigma0.3": acc3 >= target[1]},
        "final_train_metrics": {k: v for k, v in final.items() if isinstance(v, (int, float))},
    }
    write_json(args.out, report, args.device)
    print(json.dumps({k: report[k] for k in ("device", "steps", "train_tokens_per_s", "token_accuracy", "met")},
                     indent=2))
    return report


if __name__ == "__main__":
    main()
