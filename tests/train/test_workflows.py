"""train/workflows.py: the pieces the training commands share."""

from __future__ import annotations

import torch

import calmlm.evaluation.autoencoder as ae_eval
from calmlm.train.workflows import autoencoder_eval_fn


def test_autoencoder_accuracy_checks_read_blocks_spread_over_the_split(monkeypatch):
    """The accuracy a target-stopped run checks is read on blocks spread over the whole validation split, not its
    first ones (one document, which read 0.6 points above the final evaluation)."""
    seen = {}

    def fake_evaluate(model, blocks, sigmas, **kw):
        seen["rows"] = blocks[:, 0].tolist()
        return {"token_accuracy": {"0.0": 1.0, "0.3": 1.0}, "active_dims": 1}

    monkeypatch.setattr(ae_eval, "evaluate_autoencoder", fake_evaluate)
    val = torch.arange(100).repeat_interleave(8).view(100, 8)  # block i holds i
    autoencoder_eval_fn(max_blocks=10)(None, val)
    assert seen["rows"] == list(range(0, 100, 10))
    autoencoder_eval_fn(max_blocks=32)(None, val[:5])  # a split smaller than max_blocks: every block once
    assert seen["rows"] == [0, 1, 2, 3, 4]
