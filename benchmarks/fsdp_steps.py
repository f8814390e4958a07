"""A few FSDP2 training steps of CALM and the baseline under torchrun: the distributed path end to end.

    torchrun --nproc_per_node 1 benchmarks/fsdp_steps.py --preset base --steps 6 --out bench_out/fsdp.json

NCCL on a GPU, gloo on a CPU; with one process FSDP2 shards over a one-rank mesh, so the launch, the process
group, sharding, the all-gathers and reduce-scatters, the full-state checkpoint and evaluation all run as they
do on several GPUs. Random weights and blocks. Each model trains ``--steps`` steps (evaluation and checkpoint at
the end, as ``Trainer.fit`` does); the checkpoint is then loaded without FSDP and compared with the live model.
Rank 0 writes the JSON: per model the backend, world size, losses, the last step's tokens/s and the check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from calmlm.train.plan import RandomBlocks  # noqa: E402
from calmlm.config import baseline_preset, calm_preset  # noqa: E402
from calmlm.io.loading import load_model  # noqa: E402
from calmlm.models import build_model  # noqa: E402
from calmlm.train.distributed import cleanup_distributed  # noqa: E402
from calmlm.train.trainer import CHECKPOINT_DIR, TrainConfig, Trainer  # noqa: E402

PRESETS = {"calm": calm_preset, "baseline": baseline_preset}


def run_one(kind: str, args: argparse.Namespace, out_dir: str) -> dict[str, Any]:
    torch.manual_seed(0)
    config = PRESETS[kind](args.preset)
    model = build_model(config)
    data = RandomBlocks(args.batch * 4, args.block_size, config.vocab_size)
    val = RandomBlocks(args.batch, args.block_size, config.vocab_size, seed=1)
    cfg = TrainConfig(batch_size=args.batch, max_steps=args.steps, warmup_steps=1, eval_every=0, eval_batches=1,
                      save_every=0, log_every=1, distributed="fsdp", compile=args.compile, out_dir=out_dir,
                      progress=False)
    trainer = Trainer(model, data, val, cfg)
    final = trainer.fit()
    row: dict[str, Any] = dict(model=f"{kind}:{args.preset}", fsdp=trainer.parallel.fsdp,
                               backend=dist.get_backend() if dist.is_initialized() else None,
                               world_size=trainer.dist.world_size, precision=trainer.precision,
                               compiled=trainer.compiled, steps=final["step"], loss=final.get("loss"),
                               val_loss=final.get("val_loss"), tokens_per_s=final.get("tokens_per_s"))
    # the live weights, gathered (a collective: every rank), against the checkpoint loaded without FSDP
    live = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trainer.model.state_dict().items()}
    if trainer.dist.is_main:
        records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
        row["losses"] = [r["loss"] for r in records if r.get("type") == "train"]
        saved = load_model(Path(out_dir) / CHECKPOINT_DIR).state_dict()
        row["checkpoint_matches"] = all(torch.equal(v.cpu(), saved[k].cpu()) for k, v in live.items() if k in saved)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--kinds", default="calm,baseline")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=2048)
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward (default: eager)")
    ap.add_argument("--out", default="bench_out/fsdp_steps.json")
    args = ap.parse_args(argv)
    rows = []
    try:
        for kind in args.kinds.split(","):
            with tempfile.TemporaryDirectory() as tmp:  # every rank names the same folder: rank 0's
                obj = [tmp]
                if dist.is_initialized():
                    dist.broadcast_object_list(obj, 0)
                rows.append(run_one(kind, args, obj[0]))
                if dist.is_initialized():
                    dist.barrier()  # rank 0 has loaded the checkpoint before the folder goes
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"fsdp {rows[-1]['model']}: {rows[-1]}", flush=True)
        result = dict(preset=args.preset, steps=args.steps, batch=args.batch, block_size=args.block_size, rows=rows)
        if not dist.is_initialized() or dist.get_rank() == 0:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            write_json(args.out, result, device)
        return result
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
