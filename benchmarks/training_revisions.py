"""Training tokens/s of two git revisions of calmlm, side by side on this machine.

Each revision's ``src/`` is exported with ``git archive`` (the working tree stands for "new"), and a fresh
process per (revision, model, round) times optimizer steps of a random-weight model through that revision's own
``Trainer.train_step`` on random tokens. Rounds alternate between the revisions, so a busy machine slows both
alike; the figure is the median over rounds of each round's median step. Usage:
    python benchmarks/training_revisions.py --base d09cc12 [--models autoencoder calm baseline] [--preset small]
        [--precision fp32] [--vocab-size 8192] [--batch 16] [--block-size 256] [--rounds 3] [--steps 4]
Set ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` to emulate a CPU without AVX-512 / AMX.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.common import REPO, write_json  # noqa: E402

# What one timing process runs: the model of the preset, the revision's Trainer, median step time.
CHILD = r"""
import json, statistics, sys, tempfile, time, torch
kind, preset, precision, vocab, batch, block, steps = sys.argv[1:8]
vocab, batch, block, steps = int(vocab), int(batch), int(block), int(steps)
from calmlm.config import autoencoder_preset, baseline_preset, calm_preset
from calmlm.models import build_model
from calmlm.train.trainer import TrainConfig, Trainer
ae = autoencoder_preset({"small": "small", "base": "default"}.get(preset, preset), vocab_size=vocab)
cfg = {"autoencoder": lambda: ae,
       "calm": lambda: calm_preset(preset, autoencoder=ae, vocab_size=vocab, max_position_embeddings=block // 4),
       "baseline": lambda: baseline_preset(preset, vocab_size=vocab, max_position_embeddings=block)}[kind]()
torch.manual_seed(0)
model = build_model(cfg)
blocks = torch.randint(3, vocab, (batch, block))
class Data:
    block_size = block
    def __len__(self): return batch
    def __getitem__(self, i): return blocks[i]
with tempfile.TemporaryDirectory() as out:
    trainer = Trainer(model, Data(), None, TrainConfig(batch_size=batch, schedule="constant", max_steps=10**9,
                      eval_every=0, save_every=0, precision=precision, out_dir=out, progress=False), device="cpu")
    trainer.model.train()
    trainer.train_step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter(); trainer.train_step(); times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": statistics.median(times), "threads": torch.get_num_threads()}))
"""


def export(rev: str, folder: Path) -> Path:
    """``src/`` of ``rev`` under ``folder``; the working tree's for "WORKTREE"."""
    if rev == "WORKTREE":
        return REPO / "src"
    data = subprocess.run(["git", "archive", rev, "src"], cwd=REPO, capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(data)).extractall(folder)
    return folder / "src"


def time_once(src: Path, args: argparse.Namespace, kind: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", CHILD, kind, args.preset, args.precision, str(args.vocab_size),
                          str(args.batch), str(args.block_size), str(args.steps)], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["step_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare the working tree with")
    p.add_argument("--new", default="WORKTREE", help="revision standing for 'new' (default: the working tree)")
    p.add_argument("--models", nargs="+", default=["autoencoder", "calm", "baseline"])
    p.add_argument("--preset", default="small")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="bench_out/training_revisions.json")
    args = p.parse_args()
    from calmlm.devices import device_name

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {"base": export(args.base, Path(tmp) / "base"), "new": export(args.new, Path(tmp) / "new")}
        for kind in args.models:
            times: dict[str, list[float]] = {"base": [], "new": []}
            for _ in range(args.rounds):
                for which in ("base", "new"):
                    times[which].append(time_once(srcs[which], args, kind))
            tokens = args.batch * args.block_size
            base_s, new_s = statistics.median(times["base"]), statistics.median(times["new"])
            rows.append({"model": kind, "base_tokens_per_s": tokens / base_s, "new_tokens_per_s": tokens / new_s,
                         "speedup": base_s / new_s, "base_step_s": times["base"], "new_step_s": times["new"]})
            print(f"{kind:<12} {tokens / base_s:>9,.0f} -> {tokens / new_s:>9,.0f} tokens/s  ({base_s / new_s:.2f}x)",
                  flush=True)
    result = {"benchmark": "training_revisions", "device": device_name("cpu"), "base": args.base, "new": args.new,
              "isa_env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
              **{k: getattr(args, k) for k in ("preset", "precision", "vocab_size", "batch", "block_size", "rounds",
                                                "steps")}, "rows": rows}
    print(f"written to {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
