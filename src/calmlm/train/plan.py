"""Plan a time-budgeted run on the machine at hand (``calm quickstart``, ``calm compare --minutes``).

A few optimizer steps of each candidate configuration are timed on the actual device, on random tokens (a step
costs the same whatever the tokens are). From those timings the plan chooses threads, precision, vocabulary,
model size and batch, and splits the budget: the autoencoder gets the time its accuracy target needs (from
its measured learning curve, ``recipes.AE_LEARNING_CURVES``), capped at a share of the budget; CALM and the
baseline then split what is left equally. When the targets do not fit the budget the plan says so up front,
with the minutes they would need.

The measuring function is a parameter, so the choices are tested with fake machines (tests/train/test_plan.py).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import preset
from ..devices import cpu_model, cpu_threads, device_name, peak_bf16_tflops
from ..evaluation.flops import autoencoder_training_flops_per_token, training_flops_per_token
from .recipes import AE_LEARNING_CURVES, recipe
from .trainer import TrainConfig, Trainer

KINDS = ("autoencoder", "calm", "baseline")
VOCAB_SIZES = (8192, 4096)  # the quickstart's BPE sizes, largest first: a smaller one is cheaper to learn and run
LM_SIZES = ("small", "base")  # the sizes `--size auto` chooses from, smallest first
GPU_BATCHES = (16, 32, 64, 128)  # blocks of 256 tokens per step tried on an accelerator (fewer, longer blocks alike)
BLOCK_SIZE = 256  # tokens per block, the BrierLM context the quickstart reports (docs/small_scale.md)
GPU_BLOCKS = (256, 1024)  # tried on an accelerator when the block size is left to the plan
BLOCK_MARGIN = 1.1  # a longer block must train this much faster (it also changes what BrierLM measures)
AE_TARGET = 0.995  # token accuracy (sigma 0) the autoencoder trains for; it stops when it gets there
AE_FLOOR = 0.99  # below this the plan warns up front: the README's promise
AE_MAX_SHARE = 0.5  # most of the training time the autoencoder may take
SIZE_UP_STEPS = 1000  # `--size auto` takes a larger model only when both LMs still get this many steps
MIN_LM_STEPS = 300  # fewer steps than this and the plan warns: the samples will hardly look like the corpus
BF16_MARGIN = 1.15  # bf16 must be this much faster than fp32 to be chosen (it costs a little accuracy)
BATCH_SATURATION = 0.9  # on an accelerator: the smallest batch within 90 % of the best tokens/s
AE_EVAL_OVERHEAD = 1.1  # the autoencoder's accuracy checks while it trains
CPU_TIMING_BATCH = 4  # blocks per timed step on a CPU
MeasureFn = Callable[..., float]  # (kind, size, vocab_size, precision, batch_size, block_size) -> tokens/s


class RandomBlocks:
    """Fixed random token blocks with the interface the Trainer reads (len, block_size, [i])."""

    def __init__(self, num_blocks: int, block_size: int, vocab_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        gen = torch.Generator().manual_seed(seed)
        self.blocks = torch.randint(3, vocab_size, (num_blocks, block_size), generator=gen)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


def model_config(kind: str, size: str, vocab_size: int, block_size: int) -> Any:
    """The config the quickstart trains for ``kind`` at ``size`` (the autoencoder: the one CALM's preset uses)."""
    from ..config import CALM_PRESETS

    ae = preset("autoencoder", CALM_PRESETS[size]["autoencoder"], vocab_size=vocab_size)
    if kind == "autoencoder":
        return ae
    if kind == "calm":
        cfg = preset("calm", size, autoencoder=ae, vocab_size=vocab_size)
        return cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, block_size // cfg.chunk_size))
    cfg = preset("baseline", size, vocab_size=vocab_size)
    return cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, block_size))


def time_training_steps(config: Any, batch_size: int, block_size: int, precision: str, device: torch.device,
                        steps: int = 2, warmup: int = 1, compile: bool = False) -> float:
    """Seconds of one optimizer step of a random-weight model (median of ``steps`` after ``warmup``), through the
    Trainer's own step (autocast, backward, clipping, AdamW), on random tokens."""
    from ..models import build_model

    torch.manual_seed(0)
    model = build_model(config)
    if hasattr(model, "attach_aids"):
        model.attach_aids()  # the aids cost time too
    data = RandomBlocks(batch_size, block_size, config.vocab_size)
    with tempfile.TemporaryDirectory() as out_dir:  # the Trainer wants a writable folder; nothing is saved
        tcfg = TrainConfig(batch_size=batch_size, schedule="constant", max_steps=10**9, eval_every=0, save_every=0,
                           precision=precision, compile=compile, out_dir=out_dir, progress=False)
        trainer = Trainer(model, data, None, tcfg, device=device)
        trainer.model.train()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        for i in range(warmup + steps):
            sync()
            t0 = time.perf_counter()
            trainer.train_step()
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    del trainer, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def measure_on(device: torch.device, steps: int = 2) -> MeasureFn:
    """The real measuring function: tokens/s of a few training steps on ``device``. On a CPU, where tokens/s
    hardly depend on the batch, steps of at most CPU_TIMING_BATCH blocks are timed, to keep planning short."""
    def measure(kind: str, size: str, vocab_size: int, precision: str, batch_size: int, block_size: int) -> float:
        cfg = model_config(kind, size, vocab_size, block_size)
        if device.type == "cpu":
            batch_size = min(batch_size, CPU_TIMING_BATCH)
        return batch_size * block_size / time_training_steps(cfg, batch_size, block_size, precision, device, steps)
    return measure


def expected_accuracy(size: str, vocab_size: int, tokens: float) -> float:
    """The autoencoder's token accuracy (sigma 0) after ``tokens`` training tokens, interpolated (log-linear in
    tokens) on its measured learning curve on the default corpus; other corpora may differ."""
    curve = _curve(size, vocab_size)
    if tokens <= curve[0][0]:
        return curve[0][1] * max(tokens, 0.0) / curve[0][0]
    for (t0, a0), (t1, a1) in zip(curve, curve[1:]):
        if tokens <= t1:
            return a0 + (a1 - a0) * math.log(tokens / t0) / math.log(t1 / t0)
    return curve[-1][1]


def tokens_to_reach(size: str, vocab_size: int, accuracy: float) -> float | None:
    """Training tokens the autoencoder needs for ``accuracy`` (the inverse of :func:`expected_accuracy`), or None
    when the measured curve never gets there."""
    curve = _curve(size, vocab_size)
    for (t0, a0), (t1, a1) in zip([(0.0, 0.0), *curve], curve):
        if a1 >= accuracy:
            if t0 == 0.0:
                return t1 * accuracy / a1
            return t0 * math.exp(math.log(t1 / t0) * (accuracy - a0) / (a1 - a0))
    return None


def _curve(size: str, vocab_size: int) -> list[tuple[float, float]]:
    from ..config import CALM_PRESETS

    ae_preset = CALM_PRESETS[size]["autoencoder"]
    known = sorted((v, c) for (p, v), c in AE_LEARNING_CURVES.items() if p == ae_preset)
    if not known:
        known = sorted((v, c) for (p, v), c in AE_LEARNING_CURVES.items() if p == "small")
    # the curve measured at the nearest vocabulary (a larger vocabulary is harder: err on its side)
    return min(known, key=lambda vc: (abs(math.log(vc[0] / vocab_size)), -vc[0]))[1]


@dataclass
class Measurement:
    kind: str
    size: str
    vocab_size: int
    precision: str
    threads: int
    batch_size: int
    block_size: int
    tokens_per_s: float


@dataclass
class Stage:
    """One training stage of the plan."""

    kind: str
    preset: str
    batch_size: int
    tokens_per_step: int
    tokens_per_s: float
    flops_per_token: float
    mfu: float | None = None  # model FLOPs utilisation, where the device's peak is known
    minutes: float = 0.0
    target: float | None = None  # autoencoder: the token accuracy it stops at
    expected_accuracy: float | None = None  # autoencoder: at the end of its minutes (from its learning curve)

    @property
    def expected_steps(self) -> int:
        return int(self.minutes * 60 * self.tokens_per_s / self.tokens_per_step)


@dataclass
class Plan:
    device: str  # torch device type
    device_name: str
    cpu: str
    precision: str
    threads: int
    vocab_size: int
    size: str
    block_size: int
    budget_minutes: float
    stages: dict[str, Stage] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    minutes_needed: float | None = None  # set when the targets do not fit the budget
    planning_seconds: float = 0.0
    measurements: list[Measurement] = field(default_factory=list)

    def split(self, train_s: float) -> None:
        """Give the stages their minutes out of ``train_s`` seconds of training: the autoencoder what its target
        needs (at most AE_MAX_SHARE), CALM and the baseline half of the rest each; warn when a target does not fit."""
        ae = self.stages["autoencoder"]
        train_s = max(train_s, 0.0)  # planning and the tokenizer may already have used a tiny budget
        cap_s = AE_MAX_SHARE * train_s
        need_target = tokens_to_reach(self.size, self.vocab_size, AE_TARGET)
        need_floor = tokens_to_reach(self.size, self.vocab_size, AE_FLOOR)
        ae_s = min(cap_s, AE_EVAL_OVERHEAD * need_target / ae.tokens_per_s) if need_target else cap_s
        ae.minutes = ae_s / 60
        ae.expected_accuracy = expected_accuracy(self.size, self.vocab_size, ae_s * ae.tokens_per_s / AE_EVAL_OVERHEAD)
        lms = [s for k, s in self.stages.items() if k != "autoencoder"]
        for s in lms:
            s.minutes = (train_s - ae_s) / 2 / 60
        self.warnings, self.minutes_needed = [], None
        need_ae_s = AE_EVAL_OVERHEAD * need_floor / ae.tokens_per_s if need_floor else None
        if need_ae_s is None or need_ae_s > cap_s:
            self.warnings.append(
                f"the autoencoder needs about {need_ae_s / 60:.1f} min to reach {100 * AE_FLOOR:.0f} % token accuracy "
                f"on this machine; it gets {ae.minutes:.1f} min and should reach about "
                f"{100 * ae.expected_accuracy:.1f} %" if need_ae_s else
                f"the autoencoder's measured learning curve never reaches {100 * AE_FLOOR:.0f} %")
        few = [k for k, s in self.stages.items() if k != "autoencoder" and s.expected_steps < MIN_LM_STEPS]
        if few:
            steps = " and ".join(f"{self.stages[k].expected_steps:,}" for k in few)
            self.warnings.append(f"{' and '.join(few)} {'get' if len(few) > 1 else 'gets'} about {steps} steps, "
                                 f"fewer than {MIN_LM_STEPS:,}: expect samples that hardly look like the corpus")
        if self.warnings:
            # the least training time T in which the floor fits the autoencoder's share (T >= 2 t_floor) and each
            # LM gets its steps though the autoencoder takes min(T / 2, t_target) (T - that >= 2 t_lm)
            lm_need_s = max(MIN_LM_STEPS * s.tokens_per_step / s.tokens_per_s for s in lms)
            t_target = AE_EVAL_OVERHEAD * need_target / ae.tokens_per_s if need_target else math.inf
            needed_s = max(2 * (need_ae_s or train_s / AE_MAX_SHARE), min(4 * lm_need_s, t_target + 2 * lm_need_s))
            self.minutes_needed = self.budget_minutes + 1.02 * (needed_s - train_s) / 60
            self.warnings.append(f"these targets need a budget of about {math.ceil(self.minutes_needed)} minutes on "
                                 f"this machine (--minutes); running anyway within {self.budget_minutes:g}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name, stage in self.stages.items():
            out["stages"][name]["expected_steps"] = stage.expected_steps
        return out

    def format(self) -> str:
        lines = [f"plan for {self.budget_minutes:g} minutes on {self.device_name} (measured in "
                 f"{self.planning_seconds:.0f} s)",
                 f"  precision {self.precision}, {self.threads} threads, vocabulary {self.vocab_size}, size {self.size}, "
                 f"blocks of {self.block_size} tokens"]
        for name, s in self.stages.items():
            extra = (f"; stops at {100 * s.target:.1f} % token accuracy, expects {100 * s.expected_accuracy:.2f} %"
                     if s.target is not None and s.expected_accuracy is not None else "")
            mfu = f", MFU {100 * s.mfu:.1f} %" if s.mfu is not None else ""
            lines.append(f"  {name:<11} {s.preset:<6} batch {s.batch_size:>3}  {s.tokens_per_s:>9,.0f} tokens/s{mfu}  "
                         f"{s.minutes:5.1f} min (~{s.expected_steps:,} steps){extra}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _mfu(plan: Plan, tokens_per_s: float, flops_per_token: float) -> float | None:
    """Model FLOPs utilisation against the dense bf16 peak of a known GPU (None elsewhere)."""
    peak = peak_bf16_tflops(plan.device_name) if plan.device == "cuda" and plan.precision == "bf16" else None
    return tokens_per_s * flops_per_token / (peak[1] * 1e12) if peak else None


def _ae_preset(size: str) -> str:
    from ..config import CALM_PRESETS
    return CALM_PRESETS[size]["autoencoder"]


def plan_run(budget_s: float, train_s: float, device: torch.device, *, size: str = "auto", precision: str = "auto",
             vocab_size: int | None = None, block_size: int | None = None, measure: MeasureFn | None = None,
             threads: tuple[int, ...] | None = None, set_threads: Callable[[int], None] = torch.set_num_threads,
             name: str | None = None) -> Plan:
    """Measure the candidates on ``device`` and plan ``train_s`` seconds of training (of a ``budget_s`` run)
    for the autoencoder, CALM and the baseline. ``size``/``precision``/``vocab_size`` fix a choice instead of
    measuring it; ``block_size`` None: 256 tokens, or on an accelerator a longer block where it trains at least
    BLOCK_MARGIN faster; ``threads`` are the CPU thread counts to try (default: what PyTorch uses and every logical CPU);
    ``measure`` and ``name`` stand in for the device in tests."""
    start = time.perf_counter()
    measure = measure or measure_on(device)
    plan = Plan(device=device.type, device_name=name or device_name(device), cpu=cpu_model(), precision="fp32", threads=0,
                vocab_size=vocab_size or VOCAB_SIZES[0], size=LM_SIZES[0] if size == "auto" else size,
                block_size=block_size or BLOCK_SIZE, budget_minutes=budget_s / 60)
    memo: dict[tuple[Any, ...], float] = {}

    def tps(kind: str, size_: str, prec: str, batch: int) -> float:
        key = (kind, size_, plan.vocab_size, prec, batch, plan.block_size, plan.threads)
        if key not in memo:
            memo[key] = measure(kind, size_, plan.vocab_size, prec, batch, plan.block_size)
            plan.measurements.append(Measurement(kind, size_, plan.vocab_size, prec, plan.threads, batch,
                                                 plan.block_size, memo[key]))
        return memo[key]

    def batch_for(kind: str, size_: str) -> int:
        """The recipe's batch on a CPU; on an accelerator the smallest batch within 90 % of the best tokens/s."""
        if device.type == "cpu":
            return recipe(kind, _ae_preset(size_) if kind == "autoencoder" else size_).batch_size
        blocks = sorted({max(1, b * 256 // plan.block_size) for b in GPU_BATCHES})
        speeds = {b: tps(kind, size_, plan.precision, b) for b in blocks}
        return min(b for b, s in speeds.items() if s >= BATCH_SATURATION * max(speeds.values()))

    # 1. threads (CPU): what PyTorch chose and every logical CPU, if they differ
    now, logical = cpu_threads()
    best: tuple[float, int] | None = None
    for n in dict.fromkeys(threads or ((now, logical) if device.type == "cpu" else (now,))):
        set_threads(n)
        plan.threads = n
        speed = tps("autoencoder", plan.size, "fp32", batch_for("autoencoder", plan.size))
        best = max(best or (speed, n), (speed, n))
    assert best is not None
    plan.threads = best[1]
    set_threads(plan.threads)
    # 2. precision: bf16 autocast where it is measurably faster (MPS: fp32)
    if precision != "auto" or device.type == "mps":
        plan.precision = "fp32" if precision == "auto" else precision
    else:
        b = batch_for("autoencoder", plan.size)
        faster = tps("autoencoder", plan.size, "bf16", b) >= BF16_MARGIN * tps("autoencoder", plan.size, "fp32", b)
        plan.precision = "bf16" if faster else "fp32"
    # 3. block size on an accelerator: a longer block where the baseline (whose attention grows most with it) trains
    #    measurably faster at the same tokens per step
    if block_size is None and device.type != "cpu":
        batch = batch_for("baseline", plan.size)
        short, tokens = tps("baseline", plan.size, plan.precision, batch), batch * plan.block_size
        for longer in GPU_BLOCKS[1:]:
            plan.block_size = longer
            if tps("baseline", plan.size, plan.precision, max(1, tokens // longer)) < BLOCK_MARGIN * short:
                plan.block_size = BLOCK_SIZE
                break

    def stages_at(size_: str) -> Plan:
        """The plan at ``size_`` (and the current vocabulary), split."""
        trial = Plan(**{**asdict(plan), "stages": {}, "measurements": []})
        trial.size = size_
        for kind in KINDS:
            b = batch_for(kind, size_)
            speed = tps(kind, size_, plan.precision, b)
            cfg = model_config(kind, size_, plan.vocab_size, plan.block_size)
            fpt = (autoencoder_training_flops_per_token(cfg) if kind == "autoencoder"
                   else training_flops_per_token(cfg, plan.block_size).total)
            trial.stages[kind] = Stage(kind, _ae_preset(size_) if kind == "autoencoder" else size_, b,
                                       b * plan.block_size,
                                       speed, fpt, _mfu(plan, speed, fpt),
                                       target=AE_TARGET if kind == "autoencoder" else None)
        trial.split(train_s)
        return trial

    sizes = LM_SIZES if size == "auto" else (size,)
    # 4. vocabulary: the largest with which the smallest size meets every target (else the smallest vocabulary)
    for vocab in (vocab_size,) if vocab_size else VOCAB_SIZES:
        plan.vocab_size = vocab
        if not stages_at(sizes[0]).warnings:
            break
    # 5. size: the largest whose LMs both still get SIZE_UP_STEPS steps
    for size_ in sizes:
        trial = stages_at(size_)
        enough = min(s.expected_steps for k, s in trial.stages.items() if k != "autoencoder") >= SIZE_UP_STEPS
        if plan.stages and not enough:
            break  # a larger size would get too few steps: keep the previous one
        plan.size, plan.stages = size_, trial.stages
        if not enough:
            break
    plan.split(train_s)
    plan.planning_seconds = time.perf_counter() - start
    return plan
