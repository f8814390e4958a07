"""Launched by tests/train/test_finetune.py under torchrun: fine-tunes the debug baseline on SFT batches, 2 per rank."""

from __future__ import annotations

import sys

import torch

from calmlm.models.baseline import BaselineLM
from calmlm.config import baseline_preset
from calmlm.train.finetune import SFTDataset, TokenizedExample
from calmlm.train.distributed import cleanup_distributed
from calmlm.train.trainer import Trainer, TrainConfig

EOS = 2


def data() -> tuple[SFTDataset, SFTDataset]:
    cfg = baseline_preset("debug")
    # Every example has the same number of completion tokens: a micro-batch's loss is the mean over its own
    # completion tokens, so ranks (like accumulation steps) weigh equally and only equal counts match one process.
    train = [TokenizedExample([5 + i, 6 + i % 3][: 1 + i % 2], [7 + i, 8, EOS]) for i in range(16)]
    return SFTDataset(train, cfg, EOS, 8), SFTDataset(train[:4], cfg, EOS, 8)


def config(out_dir: str, batch_size: int) -> TrainConfig:
    return TrainConfig(lr=1e-3, warmup_steps=1, max_steps=4, batch_size=batch_size, eval_every=2, eval_batches=2,
                       save_every=0, log_every=1, out_dir=out_dir, progress=False, eps=1e-4,
                       precision="fp32")  # compared with one process at 1e-5


def model() -> BaselineLM:
    torch.manual_seed(0)
    return BaselineLM(baseline_preset("debug"))


if __name__ == "__main__":
    torch.set_num_threads(1)
    try:
        Trainer(model(), *data(), config(sys.argv[1], batch_size=2)).fit()
    finally:
        cleanup_distributed()
