"""The records of ``calm compare``, one per run: what it trains (:class:`RunPlan`), its evaluation points
(:class:`Point`) and, for CALM, the cost at which it reaches the baseline's final BrierLM (:class:`Reach`).
``to_dict`` gives each its layout in ``compare.json``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import BaselineConfig, CALMConfig
from ..io.metrics import METRICS_FILE, read_metrics

# the evaluation scores a point keeps
SCORES = ("brierlm", "brier_1", "brier_2", "brier_3", "brier_4", "val_loss", "token_acc_sigma0", "token_acc_sigma0.3")


@dataclass
class Cost:
    """Training FLOPs, seconds and tokens spent (an autoencoder's, charged to the CALM run that uses it)."""

    train_flops: float = 0.0
    train_seconds: float = 0.0
    tokens: int = 0


@dataclass
class Point:
    """One evaluation point of a run: its cost so far (CALM: with its autoencoder's) and the scores logged there."""

    step: int
    tokens: int
    train_flops: float
    train_seconds: float
    scores: dict[str, float] = field(default_factory=dict)  # those of SCORES the evaluation gave

    @property
    def brierlm(self) -> float:
        return self.scores["brierlm"]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "train_flops": self.train_flops,
                "train_seconds": self.train_seconds, **self.scores}


@dataclass
class Reach:
    """The training FLOPs and seconds at which a CALM run first reaches the baseline's final BrierLM, and their
    ratios to the baseline's; all None when it never does."""

    reached: bool
    train_flops: float | None = None
    train_seconds: float | None = None
    at_or_before_first_point: bool = False  # reached at its first point: the crossing lies at or before it
    flops_ratio: float | None = None
    seconds_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return out if self.reached else {k: out[k] for k in ("reached", "train_flops", "train_seconds")}


@dataclass(kw_only=True)
class RunPlan:
    """What one run trains: its model and that model's training FLOPs per token, on its own share of the budget;
    a CALM run also names its chunk size and autoencoder, whose cost is charged to every point."""

    kind: str  # "calm" | "baseline"
    chunk_size: int | None = None
    autoencoder: str | None = None
    flops_per_token: float
    autoencoder_cost: Cost | None = None
    autoencoder_flops_per_token: float | None = None
    config: CALMConfig | BaselineConfig
    budget: float  # in the comparison's unit: its budget less the autoencoder's cost

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        out["config"] = self.config.to_dict()
        if self.autoencoder_cost is not None:
            out["autoencoder_cost"] = asdict(self.autoencoder_cost)
        return out


@dataclass
class RunRecord:
    """One run of the comparison: its plan, its evaluation points and (CALM) its cost to reach the baseline."""

    plan: RunPlan
    points: list[Point]
    to_reach_baseline: Reach | None = None  # set once the baseline has finished

    @property
    def final(self) -> Point:
        return max(self.points, key=lambda p: p.step)

    def to_dict(self) -> dict[str, Any]:
        out = {**self.plan.to_dict(), "points": [p.to_dict() for p in self.points]}
        if self.to_reach_baseline is not None:
            out["to_reach_baseline"] = self.to_reach_baseline.to_dict()
        return out



def read_points(run_dir: Path, flops_per_token: float, offset: Cost) -> list[Point]:
    """The evaluation points in a run folder's metrics.jsonl, charged ``offset`` (the autoencoder's cost)."""
    points = {}  # on resume a point can be logged twice (once before the interruption): keep the last of each step
    for rec in read_metrics(run_dir / METRICS_FILE):
        if rec.get("type") != "eval" or "brierlm" not in rec and "val_loss" not in rec:
            continue
        tokens = rec.get("tokens", 0)
        points[rec["step"]] = Point(rec["step"], tokens, offset.train_flops + flops_per_token * tokens,
                                    offset.train_seconds + rec.get("train_seconds", 0.0),
                                    {k: rec[k] for k in SCORES if k in rec})
    return list(points.values())


def cost_to_reach(points: list[Point], baseline: Point) -> Reach:
    """FLOPs and seconds at which a run's BrierLM first reaches the ``baseline`` point's: interpolated between the
    two evaluation points around the crossing (log-linear in FLOPs, linear in seconds)."""
    prev = None
    for p in sorted((p for p in points if "brierlm" in p.scores), key=lambda p: p.train_flops):
        if p.brierlm >= baseline.brierlm:
            flops, secs = p.train_flops, p.train_seconds
            if prev is not None:
                w = (baseline.brierlm - prev.brierlm) / (p.brierlm - prev.brierlm)
                flops = math.exp(math.log(prev.train_flops) + w * (math.log(flops) - math.log(prev.train_flops)))
                secs = prev.train_seconds + w * (secs - prev.train_seconds)
            return Reach(True, flops, secs, prev is None, flops / baseline.train_flops,
                         secs / max(baseline.train_seconds, 1e-9))
        prev = p
    return Reach(False)
