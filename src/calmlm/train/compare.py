"""`calm compare`: the paper's performance-compute comparison at the user's scale.

CALM (one run per chunk size K) and the discrete baseline, with the same backbone preset, are trained on the
same corpus and tokenizer to the same budget — training FLOPs as ``calm flops`` counts them, or wall-clock
training seconds — and scored with BrierLM on the same validation tokens at points spaced log-uniformly in
training FLOPs (budget/2^(n-1), ..., budget/2, budget). A CALM run is charged its autoencoder's training
cost too, as the paper does: the autoencoder is trained first (once per K) on a share of the budget, or given,
and its FLOPs and seconds are added to every CALM point. The result (``compare.json``, two PNGs) says, for
each CALM run, the FLOPs and seconds it needed to reach the baseline's final BrierLM, or that it did not.

Every run is an ordinary run folder (checkpoint, metrics.jsonl) saved at each evaluation point, so an
interrupted comparison continues with ``resume=True``: finished runs are kept, the others resume exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import workflows as wf
from ..errors import ConfigError
from ..evaluation.flops import autoencoder_training_flops_per_token, training_flops_per_token
from ..distributed import is_distributed, rank_and_world
from ..io.metrics import METRICS_FILE, read_metrics
from .compare_records import Cost, Point, RunPlan, RunRecord, cost_to_reach, read_points
from .distributed import setup_distributed
from .trainer import Control, TrainConfig

RESULT_FILE = "compare.json"


@dataclass
class CompareConfig:
    out: str = field(default="runs/compare", metadata={"help": "comparison folder (one run folder per model)"})
    preset: str = field(default="small", metadata={"help": "backbone preset of CALM and the baseline"})
    ae_preset: str = field(default="small", metadata={"help": "autoencoder preset (when it is trained here)"})
    chunk_sizes: tuple[int, ...] = field(default=(4,), metadata={"help": "CALM chunk sizes K, one run each "
                                                                        "(the paper's sweep: 1 2 4)"})
    flops: float | None = field(default=None, metadata={"help": "training FLOPs per model (CALM: with its "
                                                                "autoencoder), as `calm flops` counts them"})
    minutes: float | None = field(default=None, metadata={"help": "training wall-clock minutes per model "
                                                                  "(CALM: with its autoencoder)"})
    autoencoder: tuple[str, ...] = field(default=(), metadata={"help": "trained autoencoders to use (one per K; "
                                                                       "their recorded cost is charged to CALM)"})
    ae_share: float = field(default=0.35, metadata={"help": "share of CALM's budget spent training its "
                                                            "autoencoder when none is given"})
    points: int = field(default=6, metadata={"help": "BrierLM evaluations per run, log-spaced in training FLOPs"})
    vocab_size: int = field(default=8192, metadata={"help": "vocabulary of the BPE trained here"})
    brier_tokens: int = field(default=16384, metadata={"help": "validation tokens scored by BrierLM"})
    lr: float | None = field(default=None, metadata={"help": "learning rate of CALM and the baseline "
                                                             "(default: each model's recipe)"})
    warmup_steps: int | None = field(default=None, metadata={"help": "warm-up steps (default: recipe)"})
    batch_size: int | None = field(default=None, metadata={"help": "blocks per step (default: recipe)"})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA and AMX CPUs) | fp32 | bf16"})
    seed: int = field(default=0, metadata={"help": "seed of every run"})

    def __post_init__(self) -> None:
        self.chunk_sizes = tuple(int(k) for k in self.chunk_sizes)
        self.autoencoder = tuple(self.autoencoder)
        if (self.flops is None) == (self.minutes is None):
            raise ConfigError("give exactly one budget: --flops (training FLOPs per model) or --minutes")
        if (self.flops is not None and self.flops <= 0) or (self.minutes is not None and self.minutes <= 0):
            raise ConfigError("the budget must be positive")
        if not self.chunk_sizes or any(k < 1 for k in self.chunk_sizes):
            raise ConfigError(f"--chunk-sizes must be positive integers, got {self.chunk_sizes}")
        if self.points < 2:
            raise ConfigError(f"--points must be at least 2, got {self.points}")
        if not 0.0 < self.ae_share < 1.0:
            raise ConfigError(f"--ae-share must be in (0, 1), got {self.ae_share}")

    @property
    def unit(self) -> str:
        return "flops" if self.flops is not None else "seconds"

    @property
    def budget(self) -> float:
        return float(self.flops) if self.flops is not None else float(self.minutes) * 60  # type: ignore[arg-type]


def eval_fractions(points: int) -> list[float]:
    """Budget fractions of the evaluation points: 2^-(n-1), ..., 1/2, 1 (log-uniform)."""
    return [2.0 ** (i - (points - 1)) for i in range(points)]


def eval_steps(total_steps: int, points: int) -> list[int]:
    """Steps of the evaluation points for a run of ``total_steps`` (distinct, at least 1)."""
    return sorted({max(1, round(total_steps * f)) for f in eval_fractions(points)})


def budget_control(unit: str, budget: float, flops_per_step: float, points: int,
                   on_point: Any = None) -> tuple[Control, int]:
    """The trainer control of one run: evaluate at the log-spaced points, stop at the budget. Returns the
    control and the step cap. ``unit`` "flops": points and stop are steps (budget / FLOPs per step); "seconds":
    training seconds (the steps that fit are not known in advance)."""
    if unit == "flops":
        total = int(budget // flops_per_step)
        if total < points:
            raise ConfigError(f"the budget of {budget:.3g} FLOPs buys only {total} training steps of "
                              f"{flops_per_step:.3g} FLOPs, fewer than --points {points}; raise --flops")
        steps = set(eval_steps(total, points))

        def control(step: int, seconds: float) -> tuple[bool, bool]:
            hit = step in steps
            if hit and on_point is not None:
                on_point(step * flops_per_step)
            return hit, step >= total
        return control, total

    marks = [budget * f for f in eval_fractions(points)]

    def timed(step: int, seconds: float) -> tuple[bool, bool]:
        due = [m for m in marks if m <= seconds]
        for m in due:  # several marks passed in one step count as one evaluation
            marks.remove(m)
        if due and on_point is not None:
            on_point(seconds)
        return bool(due), not marks
    return timed, 10**9


@dataclass
class ComparisonResult:
    """What ``compare.json`` holds: the settings, every finished run's record and the baseline's final point."""

    config: CompareConfig
    data: dict[str, Any]
    block_size: int
    runs: dict[str, RunRecord] = field(default_factory=dict)
    baseline_final: Point | None = None  # once every run has finished
    elapsed_minutes: float | None = None
    plots: list[str] | None = None
    machine: dict[str, Any] | None = None  # a --minutes comparison's measured plan (train/plan.py)

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        out = {"config": asdict(c), "data": self.data, "block_size": self.block_size, "budget_unit": c.unit,
               "budget": c.budget, "runs": {name: run.to_dict() for name, run in self.runs.items()}}
        if self.baseline_final is not None:
            out["baseline_final"] = self.baseline_final.to_dict()
        return out | {k: v for k, v in (("elapsed_minutes", self.elapsed_minutes), ("plots", self.plots),
                                        ("machine", self.machine)) if v is not None}


class Comparison:
    """Runs the comparison described by a :class:`CompareConfig`; see the module docstring."""

    def __init__(self, config: CompareConfig, data: wf.DataOptions, device: str | None = None,
                 resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.data, self.device, self.resume, self.progress = config, data, device, resume, progress
        self.out = Path(config.out).expanduser()
        bad = [k for k in config.chunk_sizes if data.block_size % k]
        if bad:
            raise ConfigError(f"--block-size {data.block_size} is not a multiple of K={bad}; use a multiple of "
                              f"{math.lcm(*config.chunk_sizes)}")
        self.started = time.perf_counter()
        self.done_units = 0.0
        self.total_units = config.budget * (1 + len(config.chunk_sizes))
        self._autoencoders: dict[str, Any] = {}
        self.machine: Any = None  # the measured plan of a --minutes comparison (train/plan.py)

    def _load_autoencoder(self, path: str) -> Any:
        """Each autoencoder is read once: its K, tokenizer, config and cost are all needed."""
        if path not in self._autoencoders:
            self._autoencoders[path] = wf.load_autoencoder(path)
        return self._autoencoders[path]

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if _is_rank0():
            print(f"[compare] {msg}", flush=True)

    def _point_reporter(self, run: str, base_units: float) -> Any:
        def report(units: float) -> None:
            done = self.done_units + base_units + units
            elapsed = time.perf_counter() - self.started
            eta = max(0.0, elapsed * (self.total_units - done) / max(done, 1e-9))
            self._say(f"{run}: evaluating at {units:.3g} {self.cfg.unit}; comparison "
                      f"{100 * done / self.total_units:.0f}% done, {elapsed / 60:.1f} min elapsed, "
                      f"about {eta / 60:.1f} min left")
        return report

    def _train_config(self, kind: str, name: str) -> TrainConfig:
        from .recipes import recipe

        c = self.cfg
        is_ae = kind == "autoencoder"
        names = ("batch_size",) if is_ae else ("lr", "warmup_steps", "batch_size")  # the autoencoder keeps its recipe
        over: dict[str, Any] = {n: getattr(c, n) for n in names if getattr(c, n) is not None}
        precision = c.precision
        if self.machine is not None:  # a --minutes budget: the measured precision and (on a GPU) batch
            precision = self.machine.precision
            if c.batch_size is None:
                over["batch_size"] = self.machine.stages[kind].batch_size
        return recipe(kind, c.ae_preset if is_ae else c.preset).replace(
            **over, eval_every=0, save_every=0, seed=c.seed, precision=precision, block_size=self.data.block_size,
            out_dir=str(self.out / name), progress=self.progress)

    # -- the runs --------------------------------------------------------------------------------------
    def run(self) -> ComparisonResult:
        c = self.cfg
        setup_distributed()  # under torchrun every rank takes part in every run
        self.out.mkdir(parents=True, exist_ok=True)
        if c.unit == "seconds" and not is_distributed():  # time budgets depend on the machine: measure it first
            from ..devices import resolve_device
            from .plan import plan_run

            self.machine = plan_run(c.budget, c.budget, resolve_device(self.device), size=c.preset,
                                    precision=c.precision, vocab_size=c.vocab_size, block_size=self.data.block_size)
            m = self.machine
            self._say(f"measured on {m.device_name}: precision {m.precision}, {m.threads} threads, batches "
                      + ", ".join(f"{k} {s.batch_size} ({s.tokens_per_s:,.0f} tokens/s)" for k, s in m.stages.items()))
        tok = self._tokenizer()
        result = ComparisonResult(c, self.data.record(), self.data.block_size,
                                  machine=self.machine.to_dict() if self.machine is not None else None)
        for name, plan in self._plans(tok).items():
            self._train(name, plan)
            points = read_points(self.out / name, plan.flops_per_token, plan.autoencoder_cost or Cost())
            result.runs[name] = RunRecord(plan, points)
            self.done_units += c.budget
            self._write(result)

        result.baseline_final = final = result.runs["baseline"].final
        for run in result.runs.values():
            if run.plan.kind == "calm":
                run.to_reach_baseline = cost_to_reach(run.points, final)
        result.elapsed_minutes = (time.perf_counter() - self.started) / 60
        self._write(result)
        if _is_rank0():
            self._plots(result)
            print(format_summary(result), flush=True)
        return result

    def _plans(self, tok: Any) -> dict[str, RunPlan]:
        """What each run trains: one CALM run per K (its autoencoder trained first, if not given), then the
        baseline; a CALM run's own budget is what its autoencoder left."""
        c, block = self.cfg, self.data.block_size
        plans = {}
        for k in c.chunk_sizes:
            ae_path, ae_cost = self._autoencoder(k, tok)
            ae = self._load_autoencoder(ae_path)
            calm_cfg = wf.calm_config(ae.config, tok, block, c.preset)
            spent = ae_cost.train_flops if c.unit == "flops" else ae_cost.train_seconds
            if spent >= c.budget:
                raise ConfigError(f"the K={k} autoencoder already cost {spent:.3g} {c.unit}, the whole budget; raise "
                                  "the budget or give a cheaper --autoencoder / lower --ae-share")
            plans[f"calm_k{k}"] = RunPlan(
                kind="calm", chunk_size=k, autoencoder=ae_path, autoencoder_cost=ae_cost, config=calm_cfg,
                flops_per_token=training_flops_per_token(calm_cfg, block).total, budget=c.budget - spent,
                autoencoder_flops_per_token=autoencoder_training_flops_per_token(ae.config))
        base_cfg = wf.baseline_config(tok, block, c.preset)
        plans["baseline"] = RunPlan(kind="baseline", flops_per_token=training_flops_per_token(base_cfg, block).total,
                                    config=base_cfg, budget=c.budget)
        return plans

    def _tokenizer(self) -> Any:
        from ..data.tokenizer import Tokenizer

        if self.cfg.autoencoder:  # the autoencoders' tokenizer (they must share one)
            return self._load_autoencoder(self.cfg.autoencoder[0]).tokenizer
        path = self.out / "tokenizer"
        if _is_rank0() and not (path / "tokenizer.json").exists():
            self._say("training the tokenizer")
            wf.get_tokenizer(None, self.data, self.cfg.vocab_size, self.out)
        _barrier()
        return Tokenizer.load(path)

    def _autoencoder(self, k: int, tok: Any) -> tuple[str, Cost]:
        """Path of the K autoencoder and its training cost."""
        given = [p for p in self.cfg.autoencoder if self._load_autoencoder(p).config.chunk_size == k]
        if given:
            path = given[0]
            cost = autoencoder_cost(path, self._load_autoencoder(path).config)
            self._say(f"K={k}: using the autoencoder {path} (cost {cost.train_flops:.3g} FLOPs, "
                      f"{cost.train_seconds / 60:.1f} min)")
            return path, cost
        if self.cfg.autoencoder:
            raise ConfigError(f"none of the --autoencoder folders has K={k}; give one per chunk size")
        name = f"autoencoder_k{k}"
        run_dir = self.out / name
        budget = self.cfg.ae_share * self.cfg.budget
        ae_cfg = wf.autoencoder_config(tok, self.cfg.ae_preset, chunk_size=k)
        fpt = autoencoder_training_flops_per_token(ae_cfg)
        if not _finished(run_dir):
            tcfg = self._train_config("autoencoder", name)
            control, cap = budget_control(self.cfg.unit, budget, fpt * tcfg.batch_size * self.data.block_size, 1)
            self._say(f"K={k}: training the autoencoder on {budget:.3g} {self.cfg.unit}")
            wf.train_autoencoder(self.data, tcfg.replace(max_steps=cap), self.cfg.ae_preset,
                                 tokenizer=str(self.out / "tokenizer"), resume=self._resumable(run_dir),
                                 device=self.device, control=control, chunk_size=k)
            _mark_finished(run_dir)
        return str(run_dir), autoencoder_cost(str(run_dir), ae_cfg)

    def _train(self, name: str, plan: RunPlan) -> None:
        """Train one CALM or baseline run on its own share of the budget, ``plan.budget``."""
        run_dir, budget = self.out / name, plan.budget
        if _finished(run_dir):
            self._say(f"{name}: finished earlier, kept")
            return
        tcfg = self._train_config(plan.kind, name)
        per_step = plan.flops_per_token * tcfg.batch_size * self.data.block_size
        report = self._point_reporter(name, self.cfg.budget - budget)
        control, cap = budget_control(self.cfg.unit, budget, per_step, self.cfg.points, on_point=report)
        tcfg = tcfg.replace(max_steps=cap)
        self._say(f"{name}: training on {budget:.3g} {self.cfg.unit}")
        common = dict(resume=self._resumable(run_dir), device=self.device, brier_tokens=self.cfg.brier_tokens,
                      control=control)
        if plan.kind == "calm":
            wf.train_calm(self.data, tcfg, plan.autoencoder, self.cfg.preset, **common)  # type: ignore[arg-type]
        else:
            # the autoencoders' tokenizer (train_baseline finds it in their run folder) or the one trained here
            tokenizer = self.cfg.autoencoder[0] if self.cfg.autoencoder else str(self.out / "tokenizer")
            wf.train_baseline(self.data, tcfg, tokenizer=tokenizer, preset=self.cfg.preset, **common)
        _mark_finished(run_dir)

    def _resumable(self, run_dir: Path) -> bool:
        from ..io.checkpoint import is_checkpoint

        if is_checkpoint(run_dir / "checkpoint"):
            if not self.resume:
                raise ConfigError(f"{run_dir} holds an unfinished run; continue with --resume or use a new --out")
            return True
        return False

    def _write(self, result: ComparisonResult) -> None:
        if _is_rank0():
            tmp = self.out / (RESULT_FILE + ".tmp")
            tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
            os.replace(tmp, self.out / RESULT_FILE)

    def _plots(self, result: ComparisonResult) -> None:
        from ..evaluation.plotting import plot_compare

        try:
            data = result.to_dict()
            result.plots = [str(plot_compare(data, self.out / f"compare_{x}.png", x)) for x in ("flops", "time")]
        except Exception as e:  # a missing font or backend must not lose the measurements
            result.plots = []
            self._say(f"(no plots: {e})")
        self._write(result)


def autoencoder_cost(path: str, config: Any) -> Cost:
    """Training FLOPs and seconds of the autoencoder (of ``config``) trained in the run folder ``path``, from
    its last training record."""
    run = Path(path).parent if Path(path).name == "checkpoint" else Path(path)
    last = next((rec for rec in reversed(read_metrics(run / METRICS_FILE)) if rec.get("type") == "train"), None)
    if not last:
        raise ConfigError(f"{path} has no metrics.jsonl training record, so its training cost is unknown; "
                          "pass the run folder written by `calm train-ae`")
    tokens = last.get("tokens", 0)
    return Cost(autoencoder_training_flops_per_token(config) * tokens,
                last.get("train_seconds", last.get("elapsed_s", 0.0)), tokens)


def _finished(run_dir: Path) -> bool:
    return (run_dir / "FINISHED").exists()


def _mark_finished(run_dir: Path) -> None:
    if _is_rank0():
        (run_dir / "FINISHED").write_text("")
    _barrier()


def _is_rank0() -> bool:
    """Whether this process writes the results and reports (rank 0 under torchrun, or a lone process)."""
    return rank_and_world()[0] == 0


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def format_summary(result: ComparisonResult) -> str:
    """The comparison as a small table: final BrierLM, cost, and the cost to reach the baseline."""
    assert result.baseline_final is not None, "the comparison has not finished"
    lines = [f"{'run':<10} {'final BrierLM':>13} {'train FLOPs':>12} {'train min':>9}  to reach the baseline's "
             f"{result.baseline_final.brierlm:.2f}"]
    for name, run in result.runs.items():
        last, reach = run.final, run.to_reach_baseline
        if reach is None:
            note = "-"
        elif reach.reached:
            flops, secs = reach.train_flops or 0.0, reach.train_seconds or 0.0
            note = (f"{flops:.3g} FLOPs ({100 * (reach.flops_ratio or 0.0):.0f} % of the baseline's), "
                    f"{secs / 60:.1f} min ({100 * (reach.seconds_ratio or 0.0):.0f} %)")
        else:
            note = "not reached within the budget"
        lines.append(f"{name:<10} {last.brierlm:>13.2f} {last.train_flops:>12.3g} "
                     f"{last.train_seconds / 60:>9.1f}  {note}")
    lines.append(f"(BrierLM on {result.config.brier_tokens} validation tokens in blocks of "
                 f"{result.block_size}; CALM's FLOPs and minutes include its autoencoder's training)")
    return "\n".join(lines)
