"""Running a model for scoring: evaluation mode without gradients, its previous mode restored afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Evaluation mode (no dropout) and no gradients inside the block; the training mode is restored after, even
    on an error. Stand-in models without ``eval``/``train`` are left alone."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()
