"""`calm compare` on the debug presets: the JSON it writes, the FLOPs spacing of its points, exact resume."""

import json
from pathlib import Path

import pytest

from calmlm.train import compare as cmp
from calmlm.train import workflows as wf
from calmlm.cli import main
from calmlm.errors import ConfigError


def _corpus(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    for i in range(60):
        (d / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" * 12)
    return d


def _config(out: Path, **kw) -> cmp.CompareConfig:
    base = dict(out=str(out), preset="debug", ae_preset="debug", chunk_sizes=(2, 4), flops=3e9, points=4,
                brier_tokens=256, vocab_size=300, precision="fp32", batch_size=4)
    return cmp.CompareConfig(**{**base, **kw})


def _data(tmp_path: Path) -> wf.DataOptions:
    return wf.DataOptions(data=str(_corpus(tmp_path)), block_size=32, val_fraction=0.2,
                          cache_dir=str(tmp_path / "cache"))


def test_eval_points_are_log_uniform():
    assert cmp.eval_fractions(6) == [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    assert cmp.eval_steps(320, 6) == [10, 20, 40, 80, 160, 320]
    assert cmp.eval_steps(3, 4) == [1, 2, 3]  # distinct, at least one step


def test_budget_control_stops_and_evaluates():
    control, cap = cmp.budget_control("flops", 100.0, 10.0, 2)
    assert cap == 10 and [control(s, 0.0) for s in (4, 5, 10)] == [(False, False), (True, False), (True, True)]
    timed, _ = cmp.budget_control("seconds", 8.0, 1.0, 3)
    assert timed(1, 1.0) == (False, False) and timed(2, 2.5) == (True, False)
    assert timed(3, 9.0) == (True, True)  # the 4 s and 8 s marks passed in one step: one evaluation, then stop
    with pytest.raises(ConfigError, match="raise --flops"):
        cmp.budget_control("flops", 10.0, 10.0, 6)


def test_config_errors():
    with pytest.raises(ConfigError, match="exactly one budget"):
        cmp.CompareConfig()
    with pytest.raises(ConfigError, match="exactly one budget"):
        cmp.CompareConfig(flops=1e9, minutes=1.0)
    with pytest.raises(ConfigError, match="ae-share"):
        cmp.CompareConfig(flops=1e9, ae_share=1.0)


def _tiny_autoencoder(tmp_path: Path, data: wf.DataOptions) -> str:
    from calmlm.train.trainer import TrainConfig

    out = tmp_path / "ae"
    wf.train_autoencoder(data, TrainConfig(max_steps=3, batch_size=4, eval_every=0, save_every=0, progress=False,
                                           precision="fp32", out_dir=str(out)), "debug", vocab_size=300)
    return str(out)


def _check_result(out: dict, n_points: int) -> None:
    assert out["budget_unit"] == "flops" and out["block_size"] == 32
    for name, run in out["runs"].items():
        pts = sorted(run["points"], key=lambda p: p["step"])
        assert len(pts) == n_points and all(0.0 <= p["brierlm"] <= 100.0 for p in pts)
        own = [p["train_flops"] - (run.get("autoencoder_cost") or {}).get("train_flops", 0.0) for p in pts]
        ratios = [b / a for a, b in zip(own, own[1:])]
        assert all(1.7 < r < 2.3 for r in ratios), ratios  # log-uniform: each point doubles the FLOPs
        assert 0.8 * run["budget"] < own[-1] <= run["budget"]
        if run["kind"] == "calm":  # the autoencoder's cost is charged: the whole run fits the same budget
            assert run["autoencoder_cost"]["train_flops"] > 0
            assert pts[-1]["train_flops"] <= out["budget"]
            assert "reached" in run["to_reach_baseline"]
    final = max(out["runs"]["baseline"]["points"], key=lambda p: p["step"])
    assert out["baseline_final"]["brierlm"] == final["brierlm"]


def test_tiny_compare_json_spacing_and_exact_resume(tmp_path, monkeypatch):
    data = _data(tmp_path)
    ae = _tiny_autoencoder(tmp_path, data)
    config = lambda out: _config(out, chunk_sizes=(4,), autoencoder=(ae,), flops=2e9, points=3)  # noqa: E731
    full = cmp.Comparison(config(tmp_path / "full"), data, progress=False).run()
    out = json.loads((tmp_path / "full" / cmp.RESULT_FILE).read_text())
    assert out == json.loads(json.dumps(full.to_dict())) and set(out["runs"]) == {"calm_k4", "baseline"}
    _check_result(out, 3)
    for p in ("compare_flops.png", "compare_time.png"):
        assert (tmp_path / "full" / p).stat().st_size > 0

    # interrupt the baseline after its second evaluation point, then resume: every point equals the full run's
    real = cmp.budget_control

    def interrupting(unit, budget, per_step, points, on_point=None):
        control, cap = real(unit, budget, per_step, points, on_point)
        hits = []

        def wrapped(step, seconds):
            ev, stop = control(step, seconds)
            if hits.count(True) == 2:
                raise KeyboardInterrupt
            hits.append(ev)
            return ev, stop
        return wrapped, cap

    monkeypatch.setattr(cmp, "budget_control", interrupting)
    with pytest.raises(KeyboardInterrupt):
        cmp.Comparison(config(tmp_path / "cut"), data, progress=False).run()
    monkeypatch.setattr(cmp, "budget_control", real)
    with pytest.raises(ConfigError, match="--resume"):
        cmp.Comparison(config(tmp_path / "cut"), data, progress=False).run()
    resumed = cmp.Comparison(config(tmp_path / "cut"), data, progress=False, resume=True).run()
    for name in full.runs:
        a = [(p.step, p.brierlm) for p in sorted(full.runs[name].points, key=lambda p: p.step)]
        b = [(p.step, p.brierlm) for p in sorted(resumed.runs[name].points, key=lambda p: p.step)]
        assert a == b, name


@pytest.mark.slow
def test_k_sweep_trains_one_autoencoder_per_chunk_size(tmp_path):
    out = cmp.Comparison(_config(tmp_path / "sweep", chunk_sizes=(2, 4)), _data(tmp_path), progress=False).run()
    out = out.to_dict()
    assert set(out["runs"]) == {"calm_k2", "calm_k4", "baseline"}
    assert {out["runs"][n]["autoencoder"] for n in ("calm_k2", "calm_k4")} == {
        str(tmp_path / "sweep" / "autoencoder_k2"), str(tmp_path / "sweep" / "autoencoder_k4")}
    _check_result(out, 4)


@pytest.mark.slow
def test_cli_compare_given_autoencoder_and_minutes(tmp_path, capsys):
    data = _corpus(tmp_path)
    ae = tmp_path / "ae"
    assert main(["train-ae", "--preset", "debug", "--data", str(data), "--block-size", "32", "--max-steps", "3",
                 "--vocab-size", "300", "--val-fraction", "0.2", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(ae), "--no-progress", "--eval-every", "0"]) == 0
    capsys.readouterr()
    assert main(["compare", "--out", str(tmp_path / "cmp"), "--preset", "debug", "--autoencoder", str(ae),
                 "--minutes", "0.15", "--points", "2", "--brier-tokens", "128", "--data", str(data),
                 "--block-size", "32", "--val-fraction", "0.2", "--cache-dir", str(tmp_path / "cache"),
                 "--batch-size", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "to reach the baseline's" in printed and "calm_k4" in printed
    assert "measured on CPU" in printed  # a time budget is planned on the machine first (threads, precision)
    out = json.loads((tmp_path / "cmp" / cmp.RESULT_FILE).read_text())
    assert out["budget_unit"] == "seconds" and set(out["runs"]) == {"calm_k4", "baseline"}
    assert out["machine"]["precision"] in ("fp32", "bf16") and out["machine"]["size"] == "debug"
    calm = out["runs"]["calm_k4"]
    assert calm["autoencoder"] == str(ae) and calm["autoencoder_cost"]["tokens"] == 3 * 16 * 32
    assert all(p["train_seconds"] >= calm["autoencoder_cost"]["train_seconds"] for p in calm["points"])
