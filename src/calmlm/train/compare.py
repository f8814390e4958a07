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
from .distributed import setup_distributed
from ..io.metrics import METRICS_FILE, read_metrics
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


def _read_points(run_dir: Path, flops_per_token: float, offset_flops: float, offset_seconds: float) -> list[dict]:
    points = {}  # on resume a point can be logged twice (once before the interruption): keep the last of each step
    for rec in read_metrics(run_dir / METRICS_FILE):
        if rec.get("type") != "eval" or "brierlm" not in rec and "val_loss" not in rec:
            continue
        tokens = rec.get("tokens", 0)
        points[rec["step"]] = {"step": rec["step"], "tokens": tokens,
                               "train_flops": offset_flops + flops_per_token * tokens,
                               "train_seconds": offset_seconds + rec.get("train_seconds", 0.0),
                               **{k: rec[k] for k in ("brierlm", "brier_1", "brier_2", "brier_3", "brier_4", "val_loss",
                                                      "token_acc_sigma0", "token_acc_sigma0.3") if k in rec}}
    return list(points.values())


def cost_to_reach(points: list[dict], target: float) -> dict[str, Any]:
    """FLOPs and seconds at which a run's BrierLM first reaches ``target``: interpolated between the two
    evaluation points around the crossing (log-linear in FLOPs, linear in seconds). None when it never does."""
    prev = None
    for p in sorted(points, key=lambda p: p["train_flops"]):
        if p.get("brierlm", -1.0) >= target:
            if prev is None or prev["brierlm"] >= target:
                return {"reached": True, "train_flops": p["train_flops"], "train_seconds": p["train_seconds"],
                        "at_or_before_first_point": True}
            w = (target - prev["brierlm"]) / (p["brierlm"] - prev["brierlm"])
            lf = math.log(prev["train_flops"]) + w * (math.log(p["train_flops"]) - math.log(prev["train_flops"]))
            secs = prev["train_seconds"] + w * (p["train_seconds"] - prev["train_seconds"])
            return {"reached": True, "train_flops": math.exp(lf), "train_seconds": secs,
                    "at_or_before_first_point": False}
        prev = p
    return {"reached": False, "train_flops": None, "train_seconds": None}


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
        if c.unit == "seconds":  # the number of steps is unknown in advance: no schedule can decay towards it
            over["schedule"] = "constant"
        return recipe(kind, c.ae_preset if is_ae else c.preset).replace(
            **over, eval_every=0, save_every=0, seed=c.seed, precision=c.precision, block_size=self.data.block_size,
            out_dir=str(self.out / name), progress=self.progress)

    # -- the runs --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        c = self.cfg
        setup_distributed()  # under torchrun every rank takes part in every run
        self.out.mkdir(parents=True, exist_ok=True)
        tok = self._tokenizer()
        block = self.data.block_size
        result: dict[str, Any] = {"config": asdict(c), "data": self.data.record(), "block_size": block,
                                  "budget_unit": c.unit, "budget": c.budget, "runs": {}}

        base_cfg = wf.baseline_config(tok, block, c.preset)
        base_fpt = training_flops_per_token(base_cfg, block).total
        runs: list[tuple[str, dict[str, Any]]] = []
        for k in c.chunk_sizes:
            ae_path, ae_cost = self._autoencoder(k, tok)
            ae = self._load_autoencoder(ae_path)
            calm_cfg = wf.calm_config(ae.config, tok, block, c.preset)
            fpt = training_flops_per_token(calm_cfg, block).total
            runs.append((f"calm_k{k}", {"kind": "calm", "chunk_size": k, "autoencoder": ae_path,
                                        "flops_per_token": fpt, "autoencoder_cost": ae_cost,
                                        "autoencoder_flops_per_token": autoencoder_training_flops_per_token(ae.config),
                                        "config": calm_cfg.to_dict()}))
        runs.append(("baseline", {"kind": "baseline", "flops_per_token": base_fpt, "config": base_cfg.to_dict()}))

        for name, info in runs:
            offset = info.get("autoencoder_cost", {"train_flops": 0.0, "train_seconds": 0.0})
            spent = offset["train_flops"] if c.unit == "flops" else offset["train_seconds"]
            own = c.budget - spent
            if own <= 0:
                raise ConfigError(f"the K={info['chunk_size']} autoencoder already cost {spent:.3g} {c.unit}, the "
                                  "whole budget; raise the budget or give a cheaper --autoencoder / lower --ae-share")
            info["budget"] = own
            self._train(name, info)
            info["points"] = _read_points(self.out / name, info["flops_per_token"], offset["train_flops"],
                                          offset["train_seconds"])
            result["runs"][name] = info
            self.done_units += c.budget
            self._write(result)

        final = max(result["runs"]["baseline"]["points"], key=lambda p: p["step"])
        result["baseline_final"] = final
        for name, info in result["runs"].items():
            if info["kind"] == "calm":
                reach = cost_to_reach(info["points"], final["brierlm"])
                if reach["reached"]:
                    reach["flops_ratio"] = reach["train_flops"] / final["train_flops"]
                    reach["seconds_ratio"] = reach["train_seconds"] / max(final["train_seconds"], 1e-9)
                info["to_reach_baseline"] = reach
        result["elapsed_minutes"] = (time.perf_counter() - self.started) / 60
        self._write(result)
        if _is_rank0():
            self._plots(result)
            print(format_summary(result), flush=True)
        return result

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

    def _autoencoder(self, k: int, tok: Any) -> tuple[str, dict[str, float]]:
        """Path of the K autoencoder and its training cost {"train_flops", "train_seconds"}."""
        given = [p for p in self.cfg.autoencoder if self._load_autoencoder(p).config.chunk_size == k]
        if given:
            path = given[0]
            cost = autoencoder_cost(path, self._load_autoencoder(path).config)
            self._say(f"K={k}: using the autoencoder {path} (cost {cost['train_flops']:.3g} FLOPs, "
                      f"{cost['train_seconds'] / 60:.1f} min)")
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

    def _train(self, name: str, info: dict[str, Any]) -> None:
        """Train one CALM or baseline run on its own share of the budget, ``info["budget"]``."""
        run_dir, budget = self.out / name, info["budget"]
        if _finished(run_dir):
            self._say(f"{name}: finished earlier, kept")
            return
        tcfg = self._train_config(info["kind"], name)
        per_step = info["flops_per_token"] * tcfg.batch_size * self.data.block_size
        report = self._point_reporter(name, self.cfg.budget - budget)
        control, cap = budget_control(self.cfg.unit, budget, per_step, self.cfg.points, on_point=report)
        tcfg = tcfg.replace(max_steps=cap)
        self._say(f"{name}: training on {budget:.3g} {self.cfg.unit}")
        common = dict(resume=self._resumable(run_dir), device=self.device, brier_tokens=self.cfg.brier_tokens,
                      control=control)
        if info["kind"] == "calm":
            wf.train_calm(self.data, tcfg, info["autoencoder"], self.cfg.preset, **common)
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

    def _write(self, result: dict[str, Any]) -> None:
        if _is_rank0():
            tmp = self.out / (RESULT_FILE + ".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, self.out / RESULT_FILE)

    def _plots(self, result: dict[str, Any]) -> None:
        from ..evaluation.plotting import plot_compare

        try:
            result["plots"] = [str(plot_compare(result, self.out / f"compare_{x}.png", x)) for x in ("flops", "time")]
        except Exception as e:  # a missing font or backend must not lose the measurements
            result["plots"] = []
            self._say(f"(no plots: {e})")
        self._write(result)


def autoencoder_cost(path: str, config: Any) -> dict[str, float]:
    """Training FLOPs and seconds of the autoencoder (of ``config``) trained in the run folder ``path``, from
    its last training record."""
    run = Path(path).parent if Path(path).name == "checkpoint" else Path(path)
    last = next((rec for rec in reversed(read_metrics(run / METRICS_FILE)) if rec.get("type") == "train"), None)
    if not last:
        raise ConfigError(f"{path} has no metrics.jsonl training record, so its training cost is unknown; "
                          "pass the run folder written by `calm train-ae`")
    tokens = last.get("tokens", 0)
    return {"train_flops": autoencoder_training_flops_per_token(config) * tokens,
            "train_seconds": last.get("train_seconds", last.get("elapsed_s", 0.0)), "tokens": tokens}


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


def format_summary(result: dict[str, Any]) -> str:
    """The comparison as a small table: final BrierLM, cost, and the cost to reach the baseline."""
    base = result["baseline_final"]
    lines = [f"{'run':<10} {'final BrierLM':>13} {'train FLOPs':>12} {'train min':>9}  to reach the baseline's "
             f"{base['brierlm']:.2f}"]
    for name, info in result["runs"].items():
        last = max(info["points"], key=lambda p: p["step"])
        reach = info.get("to_reach_baseline")
        if reach is None:
            note = "-"
        elif reach["reached"]:
            note = (f"{reach['train_flops']:.3g} FLOPs ({100 * reach['flops_ratio']:.0f} % of the baseline's), "
                    f"{reach['train_seconds'] / 60:.1f} min ({100 * reach['seconds_ratio']:.0f} %)")
        else:
            note = "not reached within the budget"
        lines.append(f"{name:<10} {last['brierlm']:>13.2f} {last['train_flops']:>12.3g} "
                     f"{last['train_seconds'] / 60:>9.1f}  {note}")
    lines.append(f"(BrierLM on {result['config']['brier_tokens']} validation tokens in blocks of "
                 f"{result['block_size']}; CALM's FLOPs and minutes include its autoencoder's training)")
    return "\n".join(lines)
