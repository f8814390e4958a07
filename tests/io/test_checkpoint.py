"""Native checkpoints: round trips (sharded, tied, CALM), atomic writes, training state and load errors."""

from __future__ import annotations

import errno
import json
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import calmlm.io.checkpoint as ckpt
from calmlm.io.checkpoint import load_training_state, rng_state, save_model, set_rng_state
from calmlm.io.loading import load_model
from calmlm.config import autoencoder_preset, baseline_preset, calm_preset
from calmlm.errors import CheckpointError
from calmlm.models import build_model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cfg", [autoencoder_preset("debug"), calm_preset("debug"), baseline_preset("debug")],
                         ids=["autoencoder", "calm", "baseline"])
def test_round_trip(tmp_path, cfg):
    model = build_model(cfg)
    save_model(model, tmp_path / "ck", metadata={"step": 7})
    loaded = load_model(tmp_path / "ck")
    _same(model, loaded)
    assert type(loaded) is type(model) and loaded.config == cfg and not loaded.training
    assert ckpt.read_metadata(tmp_path / "ck") == {"step": 7}
    x = torch.randint(0, 512, (2, 16))
    model.eval()
    torch.manual_seed(0)
    a = model(x).loss
    torch.manual_seed(0)
    assert torch.equal(a, loaded(x).loss)
    if cfg.kind == "calm":  # the autoencoder is frozen again after loading
        assert not any(p.requires_grad for p in loaded.autoencoder.parameters())
        assert any(k.startswith("autoencoder.") for k in loaded.state_dict())
        assert all(p.requires_grad for p in loaded.backbone.parameters())


def test_sharded_round_trip(tmp_path):
    model = build_model(calm_preset("debug"))
    save_model(model, tmp_path / "ck", max_shard_size=100_000)
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict()) and index["metadata"]["total_size"] > 0
    _same(model, load_model(tmp_path / "ck"))


def test_tied_weights_round_trip(tmp_path):
    model = build_model(baseline_preset("debug", tie_word_embeddings=True))
    save_model(model, tmp_path / "ck", max_shard_size=50_000)
    loaded = load_model(tmp_path / "ck", dtype=torch.bfloat16)
    assert loaded.lm_head.weight is loaded.backbone.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert loaded.backbone.rotary.inv_freq.dtype == torch.float32  # non-persistent buffer rebuilt, not cast


def test_atomic_save_survives_crash(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    first = build_model(baseline_preset("debug"))
    save_model(first, path)
    second = build_model(baseline_preset("debug"))

    def crash(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_weights", crash)
    with pytest.raises(CheckpointError, match=f"saving the checkpoint to {path} failed \\(No space left on device\\); "
                                              f"the last good checkpoint is still at {path}; free some disk space"):
        save_model(second, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind
    _same(first, load_model(path))
    save_model(second, path)  # a later save replaces it
    _same(second, load_model(path))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_failed_writes_leave_the_previous_checkpoint(tmp_path, monkeypatch):
    """What a full disk does: torch.save raises RuntimeError, safetensors its own error, and with delayed
    allocation the error may come only from fsync; a rename can fail too. Each leaves the old checkpoint."""
    path = tmp_path / "ck"
    first = build_model(baseline_preset("debug"))
    save_model(first, path, metadata={"step": 3})
    second = build_model(baseline_preset("debug"))
    fsync, rename = os.fsync, Path.rename

    def fsync_fails(fd):
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    def rename_in_fails(self, target):
        if self.name.startswith(".ck.tmp-"):
            raise OSError(errno.EIO, "Input/output error")
        return rename(self, target)

    def torch_save_fails(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    for target, name, fail, why in [(os, "fsync", fsync_fails, "No space left on device"),
                                    (Path, "rename", rename_in_fails, "Input/output error"),
                                    (ckpt.torch, "save", torch_save_fails, "unexpected pos 576")]:
        monkeypatch.setattr(target, name, fail)
        with pytest.raises(CheckpointError, match=f"step 9 to {path} failed \\(.*{why}.*\\); the last good checkpoint "
                                                  f"\\(step 3\\) is still at {path}; .* then resume from it"):
            save_model(second, path, metadata={"step": 9}, training_state={"step": 9})
        monkeypatch.undo()
        assert [p.name for p in tmp_path.iterdir()] == ["ck"]
        _same(first, load_model(path))


def test_interrupted_swap_is_recovered(tmp_path):
    """A crash between 'rename old aside' and 'rename new in' leaves only the old copy: it is found again."""
    model = build_model(baseline_preset("debug"))
    save_model(model, tmp_path / "ck")
    (tmp_path / "ck").rename(tmp_path / ".ck.old-123")
    with pytest.raises(CheckpointError, match="interrupted"):
        load_model(tmp_path / "ck")
    save_model(model, tmp_path / "ck")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope")
    run = tmp_path / "run"
    save_model(build_model(autoencoder_preset("debug")), run / "checkpoint")
    with pytest.raises(CheckpointError, match="not a calmlm checkpoint.*did you mean .*checkpoint"):
        load_model(run)
    with pytest.raises(CheckpointError, match="is an autoencoder checkpoint, expected a CALM one"):
        load_model(run / "checkpoint", expect="calm")
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="calmlm.load"):
        load_model(ref)

    ck = tmp_path / "ck"
    save_model(build_model(baseline_preset("debug")), ck)
    (ck / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_model(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is corrupt"):
        load_model(ck)


def test_key_and_shape_mismatch(tmp_path):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    save_model(build_model(baseline_preset("debug")), ck)
    weights = load_file(str(ck / "model.safetensors"))
    weights.pop("lm_head.weight")
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys 1 \(lm_head.weight\); unexpected keys 1 \(extra.weight\)"):
        load_model(ck)
    config = json.loads((ck / "config.json").read_text())
    config["intermediate_size"] = 96
    save_model(build_model(baseline_preset("debug")), ck)
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatches .*mlp.gate_proj.weight: checkpoint \(128, 64\) vs model \(96, 64\)"):
        load_model(ck)


def test_training_state_round_trip(tmp_path):
    model = build_model(baseline_preset("debug"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    model(torch.randint(0, 512, (2, 8))).loss.backward()
    opt.step()
    sched.step()
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    rng = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    save_model(model, tmp_path / "ck", training_state=dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=5, rng=rng,
                                                            data_state={"epoch": 1, "position": 4}, extra={"a": 1}))
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 ** s)
    info = load_training_state(tmp_path / "ck", opt2, sched2)
    assert info["step"] == 5 and info["data_state"] == {"epoch": 1, "position": 4} and info["extra"] == {"a": 1}
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == pytest.approx(5e-4)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    set_rng_state(info["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    with pytest.raises(CheckpointError, match="no training state"):
        save_model(model, tmp_path / "w")
        load_training_state(tmp_path / "w")


def test_tokenizer_saved_inside_checkpoint(tmp_path):
    class FakeTokenizer:
        def save(self, directory):
            (Path(directory) / "tokenizer.json").write_text("{}")

    save_model(build_model(autoencoder_preset("debug")), tmp_path / "ck", tokenizer=FakeTokenizer())
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == "{}"
