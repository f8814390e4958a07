"""Launched by tests/train/test_ddp.py under torchrun: trains the debug baseline with 2 blocks per rank."""

from __future__ import annotations

import sys
from typing import Any

import torch

from calmlm.config import baseline_preset
from calmlm.models import build_model
from calmlm.train.distributed import cleanup_distributed
from calmlm.train.trainer import Trainer, TrainConfig


class Blocks:
    """Deterministic in-memory blocks: every rank (and the single-process reference) sees the same data."""

    def __init__(self, n: int = 16, block_size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 512, (n, block_size), generator=g)
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def config(out_dir: str, batch_size: int, **overrides: Any) -> TrainConfig:
    return TrainConfig(**{**dict(lr=1e-3, warmup_steps=1, max_steps=4, batch_size=batch_size, eval_every=2,
                                 eval_batches=2, save_every=0, log_every=1, out_dir=out_dir, progress=False, eps=1e-4,
                                 precision="fp32"),  # exact comparisons need fp32
                          **overrides})


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(baseline_preset("debug"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    try:
        Trainer(model(), Blocks(), Blocks(4, seed=1), config(sys.argv[1], batch_size=2)).fit()
    finally:
        cleanup_distributed()
