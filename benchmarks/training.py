"""Training throughput of the autoencoder, CALM and the baseline: variants of the training step side by side.

    python benchmarks/training.py [--preset small] [--batch 16] [--block-size 256] [--repeats 5]
    python benchmarks/training.py --preset base --models calm,baseline --variants "fp32,fp32 compiled"

For each model (random weights, optimizer steps through calmlm's Trainer) the variants are timed side by side,
interleaved step by step so a busy machine slows them alike:
- ``fp32 + logits``: float32 with the (tokens, V) logits materialised and fed to ``F.cross_entropy`` (calmlm
  before issue 10; CALM has no V-way output layer, so for it this is plain fp32);
- ``fp32``: float32 with :func:`calmlm.models.losses.linear_cross_entropy` (chunked output projection + CE);
- ``bf16``: bf16 autocast with the same fused loss (``precision="auto"`` on CPUs with AMX);
- ``fp32 compiled``: ``fp32`` with ``TrainConfig.compile=True`` (torch.compile of the training forward and loss).
The first step of each variant is timed apart (``first_step_s``: it holds the compilation). Writes
``bench_out/training_<device>.json`` and prints a markdown table; ratios are against the first variant.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import device_name, write_json  # noqa: E402
from benchmarks.suite import RandomBlocks  # noqa: E402
from calmlm.models import autoencoder as ae_module  # noqa: E402
from calmlm.models import baseline as baseline_module  # noqa: E402
from calmlm.config import autoencoder_preset, baseline_preset, calm_preset  # noqa: E402
from calmlm.models import build_model  # noqa: E402
from calmlm.devices import cpu_has_fast_bf16  # noqa: E402
from calmlm.train.trainer import TrainConfig, Trainer  # noqa: E402


def materialised_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, max_logits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The old path: full logits, a float32 copy, log_softmax + NLL, and an argmax for the accuracy."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    loss = F.cross_entropy(logits.float(), targets.flatten(), ignore_index=ignore_index)
    acc = (logits.argmax(-1) == targets.flatten()).float().mean()
    return loss, acc


@contextlib.contextmanager
def old_loss() -> Any:
    saved = ae_module.linear_cross_entropy, baseline_module.linear_cross_entropy
    ae_module.linear_cross_entropy = baseline_module.linear_cross_entropy = materialised_cross_entropy
    try:
        yield
    finally:
        ae_module.linear_cross_entropy, baseline_module.linear_cross_entropy = saved


# name -> (precision, compile, materialised logits)
VARIANTS = {"fp32 + logits": ("fp32", False, True), "fp32": ("fp32", False, False), "bf16": ("bf16", False, False),
            "fp32 compiled": ("fp32", True, False)}
PRESETS = {"autoencoder": autoencoder_preset, "calm": calm_preset, "baseline": baseline_preset}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="model presets (the autoencoder's of the same name)")
    ap.add_argument("--models", default="autoencoder,calm,baseline")
    ap.add_argument("--variants", default="fp32 + logits,fp32,bf16", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            config = PRESETS[kind](args.preset)
            data = RandomBlocks(max(64, 4 * args.batch), args.block_size, config.vocab_size)
            trainers = {}
            for name in variants:
                precision, compile, _ = VARIANTS[name]
                torch.manual_seed(0)
                tcfg = TrainConfig(batch_size=args.batch, schedule="constant", max_steps=10**9, eval_every=0,
                                   save_every=0, precision=precision, compile=compile,
                                   out_dir=f"{tmp}/{kind}_{len(trainers)}", progress=False)
                trainers[name] = Trainer(build_model(config), data, None, tcfg)
            times: dict[str, list[float]] = {name: [] for name in variants}
            first: dict[str, float] = {}
            for r in range(args.repeats + 1):  # interleaved; the first round is warm-up (and compilation)
                for name in variants:
                    with old_loss() if VARIANTS[name][2] else contextlib.nullcontext():
                        t = time.perf_counter()
                        trainers[name].train_step()
                        elapsed = time.perf_counter() - t
                    if r:
                        times[name].append(elapsed)
                    else:
                        first[name] = elapsed
            tokens = args.batch * args.block_size
            tps = {name: tokens / statistics.median(ts) for name, ts in times.items()}
            rows.append({"model": kind, "preset": args.preset, "tokens_per_step": tokens, "tokens_per_s": tps,
                         "first_step_s": first, "over_first": {n: tps[n] / tps[variants[0]] for n in variants}})
            print(f"{kind}: " + ", ".join(f"{n} {v:,.0f}" for n, v in tps.items()) + " tokens/s", flush=True)
    device = device_name("cpu")
    lines = [f"Training tokens/s on {device}, preset {args.preset}, batch {args.batch} x {args.block_size}, "
             f"median of {args.repeats} interleaved steps; AMX: {cpu_has_fast_bf16()}", "",
             "| model | " + " | ".join(variants) + " | " + " | ".join(f"{v} / {variants[0]}" for v in variants[1:])
             + " | first step s |",
             "|---|" + "---|" * (2 * len(variants))]
    for r in rows:
        t = r["tokens_per_s"]
        lines.append(f"| {r['model']} | " + " | ".join(f"{t[v]:,.0f}" for v in variants) + " | "
                     + " | ".join(f"{r['over_first'][v]:.2f}×" for v in variants[1:]) + " | "
                     + " / ".join(f"{r['first_step_s'][v]:.1f}" for v in variants) + " |")
    table = "\n".join(lines)
    print(table)
    result = {"rows": rows, "variants": variants, "amx": cpu_has_fast_bf16(), "batch": args.batch,
              "block_size": args.block_size, "table": table}
    write_json(args.out or f"bench_out/training_{'cpu' if not torch.cuda.is_available() else 'cuda'}.json", result)
    return result


if __name__ == "__main__":
    main()
