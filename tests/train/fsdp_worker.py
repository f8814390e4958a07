"""Launched by tests/train/test_fsdp.py under torchrun (2 ranks, gloo): the FSDP2 runs the test compares.

``python fsdp_worker.py OUT SINGLE_HALF`` writes under OUT:
  fsdp/          the tied-embedding debug baseline (built differently on rank 1), 4 steps, grad accumulation 2,
                 clipping at every step
  half/          the same run stopped after 2 steps
  resumed/       ``half`` resumed under FSDP to step 4
  from_single/   SINGLE_HALF (a step-2 checkpoint written without FSDP) resumed under FSDP to step 4
  {calm,ae}_{ddp,fsdp}/   CALM (frozen autoencoder, BrierLM evaluation) and the autoencoder under DDP and FSDP
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from calmlm.config import autoencoder_preset, baseline_preset, calm_preset
from calmlm.models import build_model
from calmlm.train.distributed import cleanup_distributed
from calmlm.train.trainer import Trainer, TrainConfig
from calmlm.train.workflows import autoencoder_eval_fn, brier_eval_fn

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import Blocks  # noqa: E402


def config(out_dir: str | Path, batch_size: int, **overrides: Any) -> TrainConfig:
    # grad_clip far below the gradient norm: every step clips, so a wrong (per-shard) norm changes the weights
    return TrainConfig(**{**dict(lr=1e-3, warmup_steps=1, max_steps=4, batch_size=batch_size, grad_accum=2,
                                 grad_clip=0.05, eval_every=2, eval_batches=2, save_every=0, log_every=1,
                                 out_dir=str(out_dir), progress=False, eps=1e-4, precision="fp32"),  # exact: fp32
                          **overrides})


def baseline(rank: int = 0) -> torch.nn.Module:
    """The debug baseline with tied embeddings; rank > 0 builds other initial weights (rank 0's must win)."""
    torch.manual_seed(rank)
    return build_model(baseline_preset("debug", tie_word_embeddings=True))


def train_data() -> Blocks:
    return Blocks(32)


def val_data() -> Blocks:
    return Blocks(4, seed=1)


def other_models(out: Path) -> None:
    """CALM and the autoencoder draw noise per rank, so FSDP is compared with DDP (same per-rank streams).
    Five validation blocks over two ranks: the ranks run different numbers of evaluation forwards."""
    calm_eval, ae_eval = brier_eval_fn(16, max_tokens=48), autoencoder_eval_fn(max_blocks=5)
    for mode in ("ddp", "fsdp"):
        torch.manual_seed(0)
        calm = build_model(calm_preset("debug"))
        Trainer(calm, train_data(), Blocks(5, seed=1),
                config(out / f"calm_{mode}", 2, distributed=mode, eval_batches=3), evaluate_fn=calm_eval).fit()
        torch.manual_seed(0)
        ae = build_model(autoencoder_preset("debug"))
        Trainer(ae, train_data(), Blocks(5, seed=1), config(out / f"ae_{mode}", 2, distributed=mode, eval_batches=3),
                evaluate_fn=ae_eval).fit()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, single_half = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ["RANK"])
    try:
        Trainer(baseline(rank), train_data(), val_data(), config(out / "fsdp", 2, distributed="fsdp")).fit()
        Trainer(baseline(), train_data(), val_data(), config(out / "half", 2, distributed="fsdp")).fit(stop_at=2)
        Trainer(baseline(), train_data(), val_data(), config(out / "resumed", 2, distributed="fsdp")).fit(
            resume_from=out / "half" / "checkpoint")
        Trainer(baseline(), train_data(), val_data(), config(out / "from_single", 2, distributed="fsdp")).fit(
            resume_from=single_half)
        other_models(out)
    finally:
        cleanup_distributed()
