"""Generative-head comparison (paper §3 and its head ablation): the energy, flow-matching and diffusion heads
with the same backbone preset and the same trained autoencoder, trained on the same data for the same
wall-clock budget each, then measured side by side: BrierLM reached, generation tokens/s at batch 1 and 32
(T = 1), and training tokens/s.

    python benchmarks/heads.py --autoencoder runs/ae [--preset small] [--minutes 10] [--heads energy,flow,diffusion]

The paper's claim to check: the energy head is best or on par in BrierLM at a fraction of the generation
cost (one network call per chunk against 20 for flow and 100 for diffusion). Writes ``--out`` (JSON) and the
same path with ``.md`` (a markdown table, also printed). Each head's run folder is ``--run-dir``/HEAD.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import device_name, write_json  # noqa: E402
from benchmarks.generation import time_generation  # noqa: E402
from calmlm.train import workflows as wf  # noqa: E402
from calmlm.config import HEAD_TYPES  # noqa: E402
from calmlm.evaluation.flops import head_network_calls, inference_flops_per_token  # noqa: E402
from calmlm.io.loading import load  # noqa: E402
from calmlm.evaluation.brierlm import evaluate_brierlm  # noqa: E402
from calmlm.train.trainer import TrainConfig  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--autoencoder", required=True, help="trained autoencoder with its tokenizer (e.g. runs/ae)")
    ap.add_argument("--preset", default="small", help="CALM preset shared by the three heads")
    ap.add_argument("--heads", default=",".join(HEAD_TYPES), help="comma-separated heads to compare")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per head")
    ap.add_argument("--max-steps", type=int, default=10**7, help="also stop after this many steps")
    ap.add_argument("--data", default=None, help="corpus (default: the autoencoder's default, the Python stdlib)")
    ap.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out for BrierLM")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--brier-tokens", type=int, default=32768, help="validation tokens scored by BrierLM")
    ap.add_argument("--gen-batches", default="1,32", help="generation batch sizes")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed generation runs (best is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=wf.DEFAULT_CACHE)
    ap.add_argument("--run-dir", default="bench_out/heads_runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench_out/heads.json")
    args = ap.parse_args(argv)
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    unknown = sorted(set(args.heads) - set(HEAD_TYPES))
    if unknown:
        ap.error(f"unknown heads {unknown}; available: {', '.join(HEAD_TYPES)}")
    args.gen_batches = [int(b) for b in args.gen_batches.split(",")]
    return args


def bench_head(head: str, args: argparse.Namespace, opts: wf.DataOptions) -> dict[str, Any]:
    run_dir = Path(args.run_dir) / head
    tcfg = TrainConfig(lr=args.lr, schedule="constant", warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                       max_steps=args.max_steps, eval_every=0, save_every=0, block_size=args.block_size,
                       time_budget_s=args.minutes * 60, seed=args.seed, out_dir=str(run_dir), progress=False)
    t0 = time.time()
    # the trainer's own final evaluation is kept to one block: BrierLM is measured below, the same for all heads
    wf.train_calm(opts, tcfg, args.autoencoder, args.preset, device=args.device, brier_tokens=args.block_size,
                  head_options={"head": head})
    train_wall = time.time() - t0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r.get("type") == "train"]
    last = train_recs[-1] if train_recs else {}
    steps, tokens, elapsed = last.get("step", 0), last.get("tokens", 0), last.get("elapsed_s", 0.0)

    model = load(run_dir, device=args.device, kind="calm").eval()
    _, val, _ = wf.prepare_data(opts, model.tokenizer)
    t0 = time.time()
    brier = evaluate_brierlm(model, val, args.block_size, batch_size=8, max_tokens=args.brier_tokens, seed=args.seed,
                             progress=False)
    eval_s = time.time() - t0
    gen = {b: time_generation(model, b, args.new_tokens, args.prompt_len, args.repeats) for b in args.gen_batches}
    cfg = model.config
    return {
        "head": head, "network_calls_per_chunk": head_network_calls(cfg),
        "params": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("autoencoder.")),
        "head_params": sum(p.numel() for p in model.head.parameters()),
        "train_steps": steps, "train_tokens": tokens, "train_s": elapsed, "train_wall_s": round(train_wall, 1),
        "train_tokens_per_s": tokens / elapsed if elapsed else None,
        "final_train_loss": last.get("loss"),
        "brierlm": brier["brierlm"], **{f"brier_{n}": brier[f"brier_{n}"] for n in range(1, 5)},
        "brier_tokens": brier["num_tokens"], "brier_eval_s": round(eval_s, 1),
        "gen_tokens_per_s": {str(b): v for b, v in gen.items()},
        "inference_flops_per_token": inference_flops_per_token(cfg, args.block_size).total,
        "config": cfg.to_dict(),
    }


def to_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, device: str) -> str:
    batches = args.gen_batches
    lines = [f"## Generative heads on {device}: preset {args.preset}, {args.minutes:g} min of training each", "",
             "| head | calls/chunk | head params | train steps | train tok/s | BrierLM | "
             + " | ".join(f"gen tok/s b={b}" for b in batches) + " | inference FLOPs/token |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(batches) + "---:|"]
    for r in rows:
        gen = " | ".join(f"{r['gen_tokens_per_s'][str(b)]:.1f}" for b in batches)
        lines.append(f"| {r['head']} | {r['network_calls_per_chunk']} | {r['head_params']:,} | {r['train_steps']} | "
                     f"{(r['train_tokens_per_s'] or 0):.0f} | {r['brierlm']:.2f} | {gen} | "
                     f"{r['inference_flops_per_token']:.3g} |")
    note = (f"Same backbone preset, autoencoder ({args.autoencoder}), data, seed and budget for every head; "
            f"BrierLM on {rows[0]['brier_tokens'] if rows else 0} validation tokens in blocks of "
            f"{args.block_size}; generation at T = 1 with a {args.prompt_len}-token prompt, "
            f"{args.new_tokens} new tokens, best of {args.repeats}.")
    lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    opts = wf.DataOptions(data=args.data, val_fraction=args.val_fraction, block_size=args.block_size, seed=args.seed,
                          cache_dir=args.cache_dir)
    rows = [bench_head(head, args, opts) for head in args.heads]
    report = {"benchmark": "heads", "preset": args.preset, "autoencoder": args.autoencoder,
              "budget_minutes": args.minutes, "block_size": args.block_size, "batch_size": args.batch_size,
              "lr": args.lr, "rows": rows}
    write_json(args.out, report, args.device)
    md = to_markdown(rows, args, device_name(args.device))
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
