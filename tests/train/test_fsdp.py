"""A real 2-process FSDP2 job (gloo on CPU): it matches single-process training and DDP, and its checkpoints
have the usual format, resume exactly under FSDP and load or resume without it (and the other way round)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calmlm.cli import training as tr
from calmlm.io.checkpoint import read_weights
from calmlm.io.loading import load_model
from calmlm.cli import build_parser
from calmlm.config import calm_preset
from calmlm.errors import ConfigError
from calmlm.models import build_model
from calmlm.train.trainer import Trainer, TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker as w  # noqa: E402
from test_ddp import _free_port  # noqa: E402


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def _assert_same_log(a: list[dict], b: list[dict], keys: tuple[str, ...], tol: float) -> None:
    assert [(r["type"], r["step"]) for r in a] == [(r["type"], r["step"]) for r in b]
    for r, s in zip(a, b):
        for k in keys:
            if k in r or k in s:
                assert abs(r[k] - s[k]) < tol, (r["step"], k, r[k], s[k])


def test_distributed_option_is_validated_and_on_the_cli():
    assert TrainConfig(distributed="fsdp").distributed == "fsdp"
    with pytest.raises(ConfigError, match="'ddp' or 'fsdp'"):
        TrainConfig(distributed="zero3")
    for command, required in (("train", ["--autoencoder", "ae"]), ("train-ae", []), ("train-baseline", [])):
        for flag, mode in (([], "ddp"), (["--distributed", "fsdp"], "fsdp")):
            args = build_parser().parse_args([command, "--out", "run", *required, *flag])
            assert tr.train_config(args).distributed == mode
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-baseline", "--out", "run", "--distributed", "zero3"])


@pytest.mark.multiprocess
def test_two_process_fsdp_matches_single_process_and_checkpoints_interoperate(tmp_path):
    # a step-2 checkpoint written without FSDP, for the worker to resume under FSDP
    Trainer(w.baseline(), w.train_data(), w.val_data(), w.config(tmp_path / "single_half", 4)).fit(stop_at=2)
    out = tmp_path / "fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(Path(__file__).parent / "fsdp_worker.py"), str(out), str(tmp_path / "single_half" / "checkpoint")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # same global batch in one process: same weights (tied embedding, grad accumulation, clipping every step)
    single = w.baseline()
    Trainer(single, w.train_data(), w.val_data(), w.config(tmp_path / "single", 4)).fit()
    fsdp = load_model(out / "fsdp" / "checkpoint")  # a plain, non-distributed load
    _assert_same_weights(single, fsdp, atol=1e-6)
    assert not torch.equal(single.lm_head.weight, w.baseline().lm_head.weight)  # it did train
    log = _log(out / "fsdp")
    _assert_same_log(log, _log(tmp_path / "single"), ("loss", "grad_norm", "val_loss"), 1e-5)
    assert all(r["grad_norm"] > 0.05 for r in log if r["type"] == "train")  # so every step clipped

    # the checkpoint format is the usual one: same tensors (the tied weight once), same optimizer layout
    assert read_weights(out / "fsdp" / "checkpoint").keys() == read_weights(tmp_path / "single" / "checkpoint").keys()
    opt_f, opt_s = (torch.load(d / "checkpoint" / "optimizer.pt", weights_only=True)["optimizer"]
                    for d in (out / "fsdp", tmp_path / "single"))
    assert opt_f["param_groups"] == opt_s["param_groups"] and opt_f["state"].keys() == opt_s["state"].keys()
    for i, state in opt_s["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(opt_f["state"][i][k], v, atol=1e-6, rtol=0)

    # resume: FSDP -> FSDP is exact; FSDP -> one process and one process -> FSDP match the uninterrupted run
    assert all(torch.equal(a, b) for a, b in zip(fsdp.state_dict().values(),
                                                  load_model(out / "resumed" / "checkpoint").state_dict().values()))
    assert [r["step"] for r in _log(out / "resumed")] == [3, 4, 4]
    resumed_single = w.baseline()
    Trainer(resumed_single, w.train_data(), w.val_data(), w.config(tmp_path / "from_fsdp", 4)).fit(
        resume_from=out / "half" / "checkpoint")
    _assert_same_weights(single, resumed_single, atol=1e-6)
    _assert_same_weights(single, load_model(out / "from_single" / "checkpoint"), atol=1e-6)

    # CALM (frozen, unsharded autoencoder) and the autoencoder: FSDP matches DDP, evaluation included
    for kind in ("calm", "ae"):
        _assert_same_weights(load_model(out / f"{kind}_ddp" / "checkpoint"),
                             load_model(out / f"{kind}_fsdp" / "checkpoint"), atol=1e-6)
        _assert_same_log(_log(out / f"{kind}_fsdp"), _log(out / f"{kind}_ddp"),
                         ("loss", "grad_norm", "val_loss", "brierlm", "token_acc_sigma0"), 1e-4)
    assert "brierlm" in _log(out / "calm_fsdp")[-1] and "token_acc_sigma0" in _log(out / "ae_fsdp")[-1]
    torch.manual_seed(0)
    initial_ae = build_model(calm_preset("debug")).autoencoder
    _assert_same_weights(initial_ae, load_model(out / "calm_fsdp" / "checkpoint").autoencoder, atol=0)


@pytest.mark.multiprocess
def test_one_process_torchrun_shards_over_one_rank(tmp_path):
    """``torchrun --nproc_per_node 1`` joins a process group (gloo here, NCCL on a GPU) and FSDP2 shards over its
    one rank, so one GPU runs the distributed path; the checkpoint it gathers reloads without FSDP. A plain process
    has no group and trains unwrapped."""
    from calmlm.train.distributed import Parallel

    assert Parallel("fsdp").fsdp is False
    out = tmp_path / "fsdp.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fsdp_steps.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", str(script),
           "--preset", "debug", "--steps", "2", "--batch", "2", "--block-size", "32", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["calm:debug", "baseline:debug"]
    for r in rows:
        assert r["fsdp"] and r["backend"] == "gloo" and r["world_size"] == 1 and r["checkpoint_matches"]
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
