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
    autoencoder_eval_fn(max_blocks=32)(None, val[:63])  # between 1x and 2x max_blocks: still spread to the end
    assert seen["rows"] == list(range(0, 63, 2))


def test_split_seed_keeps_the_validation_split_of_another_training_seed(tmp_path):
    """--seed also picks the validation documents; --split-seed fixes them, so replicates with other training
    seeds are scored on the same tokens (and the run's record rebuilds that split for `calm eval`)."""
    from calmlm.cli import build_parser
    from calmlm.cli.training import data_options
    from calmlm.data.tokenizer import train_tokenizer
    from calmlm.train.workflows import DataOptions, prepare_data

    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i in range(60):
        (corpus / f"d{i}.txt").write_text(f"document {i}: " + " ".join(f"w{(i * j) % 50}" for j in range(80)))
    tok = train_tokenizer([f"document {i}: w{i}" for i in range(60)], vocab_size=300)

    def val_tokens(**kw):
        opts = DataOptions(data=str(corpus), block_size=16, val_fraction=0.2, cache_dir=str(tmp_path / "c"), **kw)
        return prepare_data(opts, tok)[1].tokens.tolist()

    assert val_tokens(seed=1) != val_tokens(seed=0)  # the training seed moves the split...
    assert val_tokens(seed=1, split_seed=0) == val_tokens(seed=0)  # ...unless it is fixed
    args = build_parser().parse_args(["train-baseline", "--out", "x", "--seed", "3", "--split-seed", "0"])
    assert (data_options(args).seed, data_options(args).record()["seed"]) == (3, 0)
    args = build_parser().parse_args(["train-baseline", "--out", "x", "--seed", "3"])
    assert data_options(args).record()["seed"] == 3
