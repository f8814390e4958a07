"""The typed records of `calm compare`: reading a run's points, the cost to reach the baseline, and the
compare.json layout they serialise to (the layout earlier versions wrote, key for key)."""

import json
import math
from pathlib import Path

from calmlm.config import baseline_preset, calm_preset
from calmlm.train.compare_records import Cost, Point, Reach, RunPlan, RunRecord, cost_to_reach, read_points


def _point(step: int, flops: float, seconds: float, brierlm: float) -> Point:
    return Point(step, 32 * step, flops, seconds, {"brierlm": brierlm})


def test_cost_to_reach_interpolates():
    pts = [_point(4, 4e9, 40.0, 6.0), _point(1, 1e9, 10.0, 2.0)]  # in any order
    base = _point(9, 8e9, 50.0, 4.0)
    r = cost_to_reach(pts, base)
    assert r.reached and not r.at_or_before_first_point
    assert math.isclose(r.train_flops, 2e9) and math.isclose(r.train_seconds, 25.0)  # log-linear, linear
    assert math.isclose(r.flops_ratio, 0.25) and math.isclose(r.seconds_ratio, 0.5)
    assert cost_to_reach(pts, _point(9, 8e9, 50.0, 7.0)) == Reach(False)
    first = cost_to_reach(pts, _point(9, 8e9, 50.0, 1.0))
    assert first.at_or_before_first_point and first.train_flops == 1e9
    # a point without a BrierLM (only a validation loss) never counts as reaching it
    assert not cost_to_reach([Point(1, 32, 1e9, 1.0, {"val_loss": 2.0})], base).reached


def test_read_points_keeps_the_last_of_each_step_and_charges_the_offset(tmp_path: Path):
    recs = [{"type": "train", "step": 1, "tokens": 64},
            {"type": "eval", "step": 2, "tokens": 128, "train_seconds": 3.0, "brierlm": 1.0, "other": 5},
            {"type": "eval", "step": 2, "tokens": 128, "train_seconds": 3.5, "brierlm": 1.5},  # logged again on resume
            {"type": "eval", "step": 4, "tokens": 256, "train_seconds": 7.0, "val_loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    pts = read_points(tmp_path, 10.0, Cost(train_flops=100.0, train_seconds=1.0))
    assert pts == [Point(2, 128, 1380.0, 4.5, {"brierlm": 1.5}), Point(4, 256, 2660.0, 8.0, {"val_loss": 3.0})]


def test_records_keep_the_compare_json_layout():
    calm_cfg, base_cfg = calm_preset("debug"), baseline_preset("debug")
    pts = [Point(2, 128, 1e9, 3.0, {"brierlm": 1.5, "brier_1": 20.0, "val_loss": 2.5})]
    assert pts[0].to_dict() == {"step": 2, "tokens": 128, "train_flops": 1e9, "train_seconds": 3.0,
                                "brierlm": 1.5, "brier_1": 20.0, "val_loss": 2.5}
    calm = RunRecord(RunPlan(kind="calm", chunk_size=4, autoencoder="runs/ae", flops_per_token=5.0,
                             autoencoder_cost=Cost(2.0, 3.0, 64), autoencoder_flops_per_token=1.0, config=calm_cfg,
                             budget=7.0), pts, Reach(True, 1e9, 3.0, True, 0.5, 0.25))
    out = calm.to_dict()
    assert list(out) == ["kind", "chunk_size", "autoencoder", "flops_per_token", "autoencoder_cost",
                         "autoencoder_flops_per_token", "config", "budget", "points", "to_reach_baseline"]
    assert out["autoencoder_cost"] == {"train_flops": 2.0, "train_seconds": 3.0, "tokens": 64}
    assert out["config"] == calm_cfg.to_dict() and out["points"] == [pts[0].to_dict()]
    assert out["to_reach_baseline"] == {"reached": True, "train_flops": 1e9, "train_seconds": 3.0,
                                        "at_or_before_first_point": True, "flops_ratio": 0.5, "seconds_ratio": 0.25}
    assert Reach(False).to_dict() == {"reached": False, "train_flops": None, "train_seconds": None}
    base = RunRecord(RunPlan(kind="baseline", flops_per_token=6.0, config=base_cfg, budget=9.0), pts)
    assert list(base.to_dict()) == ["kind", "flops_per_token", "config", "budget", "points"]
    assert base.to_dict()["config"]["kind"] == "baseline" and base.final is pts[0]
