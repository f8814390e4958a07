"""Which process this is and sums over processes, under ``torch.distributed``: the basics that training,
BrierLM and comparisons share. In a single process (no process group) rank 0 of 1 and the identity.
Joining the process group, DDP and FSDP are the trainer's business (:mod:`calmlm.train.distributed`)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def all_reduce(vec: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """Sum (or average) ``vec`` over the ranks, in place; the identity in a single process."""
    if is_distributed():
        dist.all_reduce(vec)
        if mean:
            vec /= dist.get_world_size()
    return vec
