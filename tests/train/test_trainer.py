"""The training engine: LR schedule, weight-decay groups, grad accumulation, exact resume, metrics, errors."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch

import calmlm

from calmlm.io.loading import load_model
from calmlm.config import autoencoder_preset, baseline_preset, calm_preset
from calmlm.errors import CalmError, CheckpointError, ConfigError, DataError
from calmlm.models import build_model
from calmlm.io.metrics import read_metrics
from calmlm.train.trainer import Trainer, TrainConfig, lr_multiplier, param_groups, train


class Blocks:
    """A tiny in-memory dataset of fixed blocks (the TokenDataset interface the trainer uses)."""

    def __init__(self, n: int, block_size: int, vocab: int = 512, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, block_size), generator=g)
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(lr=1e-3, warmup_steps=2, max_steps=6, batch_size=2, eval_every=3, eval_batches=2, save_every=0,
                log_every=1, block_size=16, out_dir=str(tmp_path / "run"), progress=False, precision="fp32")  # exact comparisons need fp32
    return TrainConfig(**{**base, **kw})


def _model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = {"autoencoder": autoencoder_preset("debug"), "calm": calm_preset("debug"),
           "baseline": baseline_preset("debug")}[kind]
    return build_model(cfg)


def test_lr_schedule_warmup_and_cosine_end():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=20, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_multiplier(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, cfg) == pytest.approx(1.0)
    assert lr_multiplier(12, cfg) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_multiplier(20, cfg) == pytest.approx(0.1)
    assert lr_multiplier(19, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    const = cfg.replace(schedule="constant")
    assert lr_multiplier(2, const) == 0.75 and lr_multiplier(19, const) == 1.0


def test_lr_schedule_follows_the_time_budget():
    """A time-budgeted run (max_steps out of reach) anneals by the end of its budget; the step count still ends
    the cosine when it comes first; warm-up stays in steps; a constant schedule ignores the clock."""
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=10**7, min_lr_ratio=0.1, schedule="cosine",
                      time_budget_s=100.0)
    assert lr_multiplier(2, cfg, train_seconds=90.0) == 0.75
    assert lr_multiplier(50, cfg, train_seconds=0.0) == pytest.approx(1.0, abs=1e-9)
    # 50 steps in 52 s: warm-up took ~4.16 s, the cosine is halfway at (100 + 4.16) / 2 s
    assert lr_multiplier(50, cfg, train_seconds=(100 + 52 * 4 / 50) / 2) == pytest.approx(0.55, abs=0.01)
    assert lr_multiplier(50, cfg, train_seconds=150.0) == pytest.approx(0.1)
    by_steps = cfg.replace(max_steps=20)
    assert lr_multiplier(20, by_steps, train_seconds=1.0) == pytest.approx(0.1)
    assert lr_multiplier(50, cfg.replace(schedule="constant"), train_seconds=99.0) == 1.0


def test_time_budgeted_cosine_is_continuous_after_a_long_warm_up():
    """Warm-up that takes a third of a short budget: the cosine starts from the peak where warm-up ends (the
    clock used to count warm-up's seconds as cosine progress, so the LR jumped down by a fifth)."""
    cfg = TrainConfig(lr=1.0, warmup_steps=100, max_steps=10**7, min_lr_ratio=0.0, schedule="cosine",
                      time_budget_s=150.0)
    step_s = 0.5  # 100 warm-up steps take 50 s of the 150
    factors = [lr_multiplier(s, cfg, train_seconds=(s + 1) * step_s) for s in range(99, 300)]
    assert factors[0] == 1.0 and factors[1] == pytest.approx(1.0, abs=1e-3)
    assert max(abs(a - b) for a, b in zip(factors, factors[1:])) < 0.02  # no jump anywhere
    assert factors[100] == pytest.approx(0.5, abs=0.01)  # halfway between warm-up's end and the budget
    assert factors[-1] == pytest.approx(0.0, abs=1e-6)


def test_weight_decay_groups_exclude_norms_biases_and_frozen():
    model = _model("calm")
    groups = param_groups(model, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = {id(p) for g in groups for p in g["params"]}
    assert not ids & {id(p) for p in model.autoencoder.parameters()}
    assert ids == {id(p) for p in model.parameters() if p.requires_grad}
    tied = build_model(baseline_preset("debug", tie_word_embeddings=True))
    assert sum(len(g["params"]) for g in param_groups(tied, 0.1)) == len(list(tied.parameters()))


def test_grad_accum_equivalence(tmp_path):
    data = Blocks(16, 16)
    finals = []
    for bs, acc in ((4, 1), (2, 2)):
        model = _model("baseline")
        # eps=1e-4: Adam's g/(sqrt(v)+eps) would otherwise blow float rounding of near-zero gradients up to ~lr
        cfg = _cfg(tmp_path / f"{bs}", batch_size=bs, grad_accum=acc, max_steps=3, eps=1e-4)
        Trainer(model, data, None, cfg).fit()
        finals.append(model.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["autoencoder", "calm", "baseline"])
def test_exact_resume_bit_identical(tmp_path, kind):
    data, val = Blocks(12, 16), Blocks(4, 16, seed=1)
    full = _model(kind)
    Trainer(full, data, val, _cfg(tmp_path / "full")).fit()

    half = _model(kind)
    cfg = _cfg(tmp_path / "half")
    Trainer(half, data, val, cfg).fit(stop_at=3)
    resumed = _model(kind, seed=123)  # different init: everything must come from the checkpoint
    Trainer(resumed, data, val, cfg, resume=True).fit()
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run's metrics continue the log without duplicates
    steps = [r["step"] for r in map(json.loads, (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_metrics_jsonl_and_checkpoint(tmp_path):
    data, val = Blocks(8, 16), Blocks(4, 16, seed=1)
    calls = []

    def hook(model, val_data):
        calls.append(model.training)
        return {"brier": 0.5}

    cfg = _cfg(tmp_path, max_steps=4, log_every=2, eval_every=2, save_every=2)
    result = train(_model("autoencoder"), data, val, cfg, evaluate_fn=hook)
    records = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train_recs] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for key in ("loss", "ce", "kl", "token_acc", "lr", "tokens_per_s", "elapsed_s", "grad_norm", "tokens"):
        assert key in train_recs[0]
    assert train_recs[1]["tokens"] == 4 * 2 * 16
    assert {"val_loss", "val_ce", "brier"} <= set(evals[0])
    assert calls == [False, False]  # the hook runs in eval mode
    assert result["step"] == 4 and "val_loss" in result and "loss" in result
    ck = Path(cfg.out_dir) / "checkpoint"
    assert {"config.json", "model.safetensors", "trainer_state.json", "optimizer.pt", "rng_state.pt"} <= {
        p.name for p in ck.iterdir()}
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 4
    assert load_model(ck, expect="autoencoder").config == autoencoder_preset("debug")


def test_run_record_has_code_version_and_resolved_configs(tmp_path):
    cfg = _cfg(tmp_path, max_steps=1, eval_every=0)
    model = _model("calm")
    Trainer(model, Blocks(4, 16), None, cfg, metadata={"data": {"spec": "x.txt"}}).fit()
    run = json.loads((Path(cfg.out_dir) / "run.json").read_text())
    assert run["code"]["calmlm"] == calmlm.__version__ and run["code"]["torch"] == torch.__version__
    if (Path(calmlm.__file__).parents[2] / ".git").exists():  # a checkout (as in CI): the commit is recorded
        assert len(run["code"]["git_commit"]) == 40 and isinstance(run["code"]["dirty"], bool)
    assert run["train_config"] == cfg.to_dict() and run["model_config"] == model.config.to_dict()
    assert run["data"] == {"spec": "x.txt"} and run["world_size"] == 1


def test_time_budget_stops_cleanly(tmp_path):
    cfg = _cfg(tmp_path, max_steps=10_000, time_budget_s=0.5, eval_every=0)
    result = Trainer(_model("baseline"), Blocks(8, 16), Blocks(2, 16), cfg).fit()
    assert 0 < result["step"] < 10_000 and "val_loss" in result
    assert json.loads((Path(cfg.out_dir) / "checkpoint" / "trainer_state.json").read_text())["step"] == result["step"]


def test_time_budgeted_cosine_anneals_by_the_end(tmp_path):
    """With max_steps out of reach, the LR of a time-budgeted cosine run still falls from its peak to near the
    floor by the last step (the schedule follows the training clock)."""
    cfg = _cfg(tmp_path, max_steps=10**7, time_budget_s=1.5, eval_every=0, warmup_steps=0, schedule="cosine",
               min_lr_ratio=0.0)
    Trainer(_model("baseline"), Blocks(8, 16), Blocks(2, 16), cfg).fit()
    lrs = [r["lr"] for r in map(json.loads, (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines())
           if r["type"] == "train"]
    assert len(lrs) > 10 and lrs[0] == pytest.approx(1e-3, rel=0.05)
    assert lrs[-1] < 0.35e-3 and all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_time_budget_counts_the_whole_run_across_resumes(tmp_path):
    """The budget's clock (which the time-aware cosine follows too) is saved with the checkpoint: a resumed run
    whose earlier invocations already used the budget stops after one step instead of starting a fresh budget."""
    first = _cfg(tmp_path, max_steps=10**7, time_budget_s=3600.0, eval_every=0, schedule="cosine")
    Trainer(_model("baseline"), Blocks(8, 16), Blocks(2, 16), first).fit(control=lambda step, s: (False, step >= 5))
    state_file = Path(first.out_dir) / "checkpoint" / "trainer_state.json"
    used = json.loads(state_file.read_text())["extra"]["budget_seconds"]
    assert used > 0
    resumed = Trainer(_model("baseline"), Blocks(8, 16), Blocks(2, 16), first.replace(time_budget_s=used * 1.01),
                      resume=True)
    assert resumed.fit()["step"] == 6  # a fresh 1.01x budget would have allowed several more steps
    assert json.loads(state_file.read_text())["extra"]["budget_seconds"] > used


def test_errors(tmp_path):
    with pytest.raises(DataError, match="empty"):
        Trainer(_model("baseline"), Blocks(0, 16), None, _cfg(tmp_path))
    with pytest.raises(ConfigError, match="multiple of the chunk size K=4"):
        Trainer(_model("autoencoder"), Blocks(4, 18), None, _cfg(tmp_path, block_size=None))
    with pytest.raises(ConfigError, match="block_size=32"):
        Trainer(_model("baseline"), Blocks(4, 16), None, _cfg(tmp_path, block_size=32))
    with pytest.raises(CheckpointError, match="no checkpoint at .*run/checkpoint"):
        Trainer(_model("baseline"), Blocks(4, 16), None, _cfg(tmp_path), resume=True).fit()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not writable"):
        Trainer(_model("baseline"), Blocks(4, 16), None, _cfg(tmp_path, out_dir=str(blocker / "sub")))
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="linear")
    assert issubclass(ConfigError, CalmError)


def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch):
    """A save that fails mid-way (the optimizer state hits ENOSPC after the weights were written) raises one
    CheckpointError naming the folder, the step and the last good checkpoint; that checkpoint loads, and resuming
    from it gives what an uninterrupted run gives."""
    import calmlm.io.checkpoint as ckpt

    data, val = Blocks(12, 16), Blocks(4, 16, seed=1)
    full = _model("baseline")
    Trainer(full, data, val, _cfg(tmp_path / "full", save_every=2)).fit()

    cfg = _cfg(tmp_path / "broken", save_every=2)
    write_state = ckpt.save_training_state

    def disk_full(directory, **state):
        if state["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_state(directory, **state)

    monkeypatch.setattr(ckpt, "save_training_state", disk_full)
    checkpoint = Path(cfg.out_dir) / "checkpoint"
    with pytest.raises(CheckpointError) as failed:
        Trainer(_model("baseline"), data, val, cfg).fit()
    monkeypatch.undo()
    assert str(failed.value) == (
        f"saving the checkpoint of step 4 to {checkpoint} failed (No space left on device); the last good checkpoint "
        f"(step 2) is still at {checkpoint}; free some disk space or choose another output folder, then resume from "
        "it (--resume)")
    assert sorted(p.name for p in Path(cfg.out_dir).iterdir() if p.name.startswith(".")) == []  # no temporary folder
    assert load_model(checkpoint) is not None and ckpt.read_metadata(checkpoint)["step"] == 2

    resumed = _model("baseline", seed=123)
    assert Trainer(resumed, data, val, cfg, resume=True).fit()["step"] == 6
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_train_config_json_round_trip():
    cfg = TrainConfig(betas=(0.8, 0.9), time_budget_s=3.0)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"lrr": 1})


def test_bf16_autocast_on_cpu(tmp_path):
    cfg = _cfg(tmp_path, precision="bf16", max_steps=2, eval_every=0)
    result = Trainer(_model("calm"), Blocks(8, 16), Blocks(2, 16), cfg).fit()
    assert math.isfinite(result["loss"]) and math.isfinite(result["val_loss"])


def test_training_aids_are_kept_out_of_the_checkpoint_and_resume_exactly(tmp_path):
    """CALM's training-only aid heads are saved with the training state, not with the model's weights: the
    checkpoint loads as a plain CALM, and a resumed run (aid schedule included) matches an uninterrupted one."""
    data, val = Blocks(12, 16), Blocks(4, 16, seed=1)
    aids = dict(aux_token_weight=1.0, aux_latent_weight=0.5, aid_until=0.7)

    def aided(seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        model = build_model(calm_preset("debug", **aids))
        model.attach_aids()
        return model

    full = aided()
    Trainer(full, data, val, _cfg(tmp_path / "full")).fit()
    cfg = _cfg(tmp_path / "half")
    Trainer(aided(), data, val, cfg).fit(stop_at=3)
    resumed = aided(seed=123)
    Trainer(resumed, data, val, cfg, resume=True).fit()
    a, b = full.state_dict(), resumed.state_dict()
    assert any(k.startswith("aids.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    records = read_metrics(Path(cfg.out_dir) / "metrics.jsonl")
    factors = [r["aid_factor"] for r in records if r["type"] == "train"]
    assert factors[0] == 1.0 and factors[-1] == 0.0  # linear to 0 at 70 % of the 6 steps, then off
    plain = load_model(Path(cfg.out_dir) / "checkpoint")  # a plain CALM: no aid module, every weight present
    assert plain.aids is None and plain.config.aux_token_weight == 1.0
    from safetensors import safe_open
    with safe_open(str(Path(cfg.out_dir) / "checkpoint" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("aids.")]
    for k, v in plain.state_dict().items():
        assert torch.equal(v, b[k]), k


def test_resume_reads_an_older_flow_checkpoint(tmp_path):
    """A flow run saved by an older calmlm (num_samples=8 meaning its targets, num_targets=100 unused) resumes:
    its config.json is read in today's fields, so it is the same model."""
    data, val, cfg = Blocks(12, 16), Blocks(4, 16, seed=1), _cfg(tmp_path)

    def flow(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(calm_preset("debug", head="flow"))
    Trainer(flow(0), data, val, cfg).fit(stop_at=3)
    path = Path(cfg.out_dir) / "checkpoint" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_samples": 8, "num_targets": 100}))
    assert Trainer(flow(123), data, val, cfg, resume=True).fit()["step"] == 6


def test_wsd_schedule_holds_the_peak_then_decays_linearly():
    """wsd: the peak LR until the last decay_fraction of the run (by steps or by the budget's clock), then a
    straight line to min_lr_ratio; a decay_fraction outside (0, 1] is a one-line config error."""
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_multiplier(4, cfg) == 0.5
    assert [lr_multiplier(s, cfg) for s in (10, 50, 90)] == pytest.approx([1.0, 1.0, 1.0])
    assert lr_multiplier(100, cfg) == pytest.approx(0.5) and lr_multiplier(110, cfg) == pytest.approx(0.0)
    timed = cfg.replace(max_steps=10**7, time_budget_s=110.0)  # one second per step: the same line by the clock
    assert lr_multiplier(100, timed, train_seconds=100.0) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="decay_fraction"):
        TrainConfig(decay_fraction=0.0)
