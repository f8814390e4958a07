"""One training engine for the autoencoder, CALM and the baseline.

Every model's ``forward(input_ids)`` returns ``ModelOutput(loss, metrics)``; the engine only needs that. A
dataset whose blocks are dicts (fine-tuning: input ids + loss mask) has them passed as keyword arguments.
AdamW with warm-up then constant or cosine LR, gradient accumulation, clipping, bf16 autocast, optional
``torch.compile``, DDP or FSDP2 under ``torchrun``, periodic evaluation, JSON-lines metrics, atomic
checkpoints (one format whatever the wrapping) and exact (bit-identical on CPU) resume.

Randomness: ``fit`` seeds torch/numpy/random with ``seed + rank`` at the start of a fresh run, so each DDP
rank draws its own dropout masks / noise; resume restores every rank's generator state. Evaluation runs under
a forked, fixed-seed generator so it neither perturbs training randomness nor varies between evaluations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import upgrade_config_dict
from ..data.corpus import BlockSampler, iter_blocks, stack_blocks
from ..devices import cpu_has_fast_bf16, resolve_device
from ..errors import CheckpointError, ConfigError, DataError
from ..evaluation.mode import eval_mode
from ..io import checkpoint as ckpt
from ..io.loading import full_state_dict, unique_tensors
from ..models.aids import TRAINING_ONLY_PREFIX
from ..io.metrics import METRICS_FILE, read_metrics
from .distributed import Parallel, all_reduce, rank_and_world

EvaluateFn = Callable[[nn.Module, Any], dict[str, float]]
# control(step, training seconds) -> (evaluate now, stop now): extra evaluation points and stopping rules
# (e.g. `calm compare`'s log-spaced points and training-time budget), checked after every optimizer step.
Control = Callable[[int, float], tuple[bool, bool]]
CHECKPOINT_DIR = "checkpoint"
TRAIN_CONFIG_FILE = "train_config.json"
RUN_FILE = "run.json"  # what produced the run: code version, resolved train and model configs, data record


def _field(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    """Optimisation and run settings; the training commands' flags are generated from these fields."""

    lr: float = _field(3e-4, "peak learning rate")
    min_lr_ratio: float = _field(0.1, "the cosine and wsd schedules decay to lr * min_lr_ratio at max_steps (or "
                                      "at the end of the time budget, whichever comes first)")
    warmup_steps: int = _field(0, "linear warm-up from lr/warmup_steps to lr")
    schedule: str = _field("cosine", "LR after warm-up: constant, cosine, or wsd (constant, then linear to "
                                     "min_lr_ratio over the last decay_fraction of the run)",
                           choices=("constant", "cosine", "wsd"))
    decay_fraction: float = _field(0.2, "wsd: the share of the run (after warm-up) over which the LR decays")
    weight_decay: float = _field(0.1, "AdamW decay on >=2-D weights (matrices, embeddings); never on norms, "
                                      "biases or frozen parameters")
    betas: tuple[float, float] = _field((0.9, 0.95), "AdamW betas")
    eps: float = _field(1e-8, "AdamW epsilon")
    grad_clip: float = _field(1.0, "max global gradient norm; 0 disables clipping")
    batch_size: int = _field(8, "blocks per micro-batch per rank (GPU)")
    grad_accum: int = _field(1, "micro-batches per optimizer step")
    max_steps: int = _field(1000, "optimizer steps")
    eval_every: int = _field(200, "evaluate every N steps; 0: only at the end")
    eval_batches: int = _field(20, "validation micro-batches per evaluation (of batch_size blocks, all ranks)")
    save_every: int = _field(500, "checkpoint every N steps; 0: only at the end")
    log_every: int = _field(10, "log training metrics every N steps")
    seed: int = _field(0, "random seed (also of the validation split, unless --split-seed)")
    block_size: int | None = _field(None, "tokens per block; None: taken from the data")
    precision: str = _field("auto", "auto: bf16 autocast on CUDA and on CPUs with AMX, else fp32",
                            choices=("auto", "fp32", "bf16"))
    compile: bool | None = _field(None, "torch.compile the training forward with its loss (and so their backward); "
                                        "default: only on device types where it measured faster "
                                        "(trainer.COMPILE_BY_DEFAULT; none yet)")
    distributed: str = _field("ddp", "under torchrun: replicate the model on every GPU (ddp) or shard parameters, "
                                     "gradients and optimizer state across them (fsdp, FSDP2) for models that do "
                                     "not fit one GPU", choices=("ddp", "fsdp"))
    time_budget_s: float | None = _field(None, "stop cleanly (eval + save) before the run has trained this many "
                                               "wall-clock seconds, counted across resumes")
    out_dir: str = _field("runs/run", "run folder")
    progress: bool = _field(True, "tqdm progress bar on rank 0")

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]  # JSON gives a list
        for name in ("lr", "batch_size", "grad_accum", "max_steps", "log_every", "block_size", "time_budget_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"TrainConfig.{name} must be positive, got {value}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")
        for f in fields(self):  # the fields with a fixed set of values
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                allowed = ", ".join(map(repr, choices[:-1])) + f" or {choices[-1]!r}"
                raise ConfigError(f"unknown TrainConfig.{f.name} {getattr(self, f.name)!r}; use {allowed}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def training_progress(step: int, config: TrainConfig, train_seconds: float = 0.0) -> float:
    """Fraction of the run done after ``step`` optimizer steps: of max_steps or, with a time budget, of the
    budget's clock, whichever is further (what the training aids' schedules follow)."""
    progress = step / config.max_steps
    if config.time_budget_s:
        progress = max(progress, train_seconds / config.time_budget_s)
    return min(1.0, progress)


def lr_multiplier(step: int, config: TrainConfig, train_seconds: float = 0.0) -> float:
    """LR factor for optimizer step ``step`` (0-based): linear warm-up, then constant, cosine or wsd to min_lr_ratio,
    reached at step == max_steps or, with a time budget, when ``train_seconds`` (the budget's clock) reach it
    (whichever is first), so a time-budgeted run anneals by its end however many steps it gets."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    if config.time_budget_s and train_seconds > 0:
        # the clock's cosine starts where warm-up ended, as the step count's does (else the LR jumps down at the
        # end of a warm-up that took a large part of a short budget); warm-up's seconds are estimated from the
        # mean step time, so the factor stays a function of (step, seconds) and a resumed run follows it exactly
        warmup_s = train_seconds * config.warmup_steps / max(step, 1)
        progress = max(progress, min(1.0, (train_seconds - warmup_s) / max(config.time_budget_s - warmup_s, 1e-9)))
    if config.schedule == "wsd":  # warm-up, stable, decay: the peak LR as long as the run allows
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * min(1.0, (1.0 - progress) / config.decay_fraction)
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Whether TrainConfig.compile=None compiles, per device type: True only where a measurement says compiled training
# is faster, its compilation time included (benchmarks/gpu_check.sh times eager against compiled on a GPU). On the
# 2-core CPU a step gains 10-31 % but compiling takes 1-2 minutes per model, more than the minutes-long CPU runs
# win back (BENCHMARKS.md); CUDA is not measured yet.
COMPILE_BY_DEFAULT: dict[str, bool] = {"cpu": False, "cuda": False}


def resolve_compile(compile: bool | None, device: torch.device) -> bool:
    """``compile``, or for None the measured default of the device type (COMPILE_BY_DEFAULT)."""
    return COMPILE_BY_DEFAULT.get(device.type, False) if compile is None else compile


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on CUDA and on AMX CPUs, else 'fp32'."""
    if precision != "auto":
        return precision
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return "bf16" if fast else "fp32"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on trainable tensors with >= 2 dims (linear weights and embeddings, as in Llama /
    GPT training); no decay on 1-D ones (norm gains, biases). Frozen parameters (CALM's autoencoder) and tied
    duplicates (which ``parameters()`` already drops) are excluded."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _block_size_of(data: Any) -> int:
    return int(data.block_size) if hasattr(data, "block_size") else int(data[0].shape[-1])


def _forward(model: nn.Module, batch: torch.Tensor | dict[str, torch.Tensor], device: torch.device) -> Any:
    """``model(batch)``, or ``model(**batch)`` for a dict batch (fine-tuning's ``{"input_ids", "loss_mask"}``)."""
    if isinstance(batch, dict):
        return model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()})
    return model(batch.to(device, non_blocking=True))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def _fixed_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with freshly seeded generators and restore the previous states afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _seed_all(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def evaluate_loss(model: nn.Module, data: Any, batch_size: int, num_batches: int, device: torch.device,
                  autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Mean loss and model metrics over the first ``num_batches * batch_size`` validation blocks, in eval
    mode without gradients; under DDP each rank takes every world_size-th block and results are averaged."""
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=device, dtype=torch.float64)
    with eval_mode(model):
        for batch in iter_blocks(data, batch_size, *rank_and_world(), max_blocks=num_batches * batch_size):
            n = len(batch["input_ids"] if isinstance(batch, dict) else batch)
            with autocast():
                out = _forward(model, batch, device)
            for k, v in {"loss": out.loss, **out.metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().double() * n
            count += n
    keys = sorted(sums)
    vec = all_reduce(torch.stack([sums[k] for k in keys] + [count]))
    total = vec[-1].item()
    return {k: vec[i].item() / max(total, 1.0) for i, k in enumerate(keys)}


class _ProgressBar:
    """tqdm bar of a run: in minutes (elapsed / budget, time left) when the run has a time budget, else in
    steps; the precision, loss, LR and tokens/s ride along."""

    def __init__(self, cfg: TrainConfig, step: int, end: int, precision: str) -> None:
        from tqdm.auto import tqdm
        self.budget_min = cfg.time_budget_s / 60 if cfg.time_budget_s else None
        self.info, self.shown = {"precision": precision}, 0.0
        if self.budget_min is not None:
            self.bar = tqdm(total=round(self.budget_min, 2), desc="train", dynamic_ncols=True,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} min {postfix}")
        else:
            self.bar = tqdm(total=end, initial=step, desc="train", dynamic_ncols=True, unit="step")

    def postfix(self, loss: float, lr: float, tokens_per_s: float) -> None:
        self.info.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")

    def update(self, step: int, elapsed_s: float) -> None:
        if self.budget_min is None:
            self.bar.update(step - self.bar.n)
        else:
            self.bar.n = round(min(elapsed_s / 60, self.budget_min), 2)
            self.info.update(step=step, left=f"{max(0.0, self.budget_min - elapsed_s / 60):.1f} min")
        self.bar.set_postfix(self.info, refresh=False)
        now = time.monotonic()
        if self.budget_min is not None and now - self.shown >= 0.5:  # a time bar moves on its own: redraw at 2 Hz
            self.bar.refresh()
            self.shown = now

    def close(self) -> None:
        self.bar.close()


def code_version() -> dict[str, Any]:
    """calmlm's version, and the git commit of its source (with ``dirty`` for uncommitted changes) when it
    runs from a checkout."""
    import subprocess

    from .. import __version__

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    out: dict[str, Any] = {"calmlm": __version__, "torch": torch.__version__}
    try:
        out.update(git_commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--", ".")))
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package: the version is all there is
    return out


class Trainer:
    """Train a calmlm model. ``train_data``/``val_data``: sequences of fixed-size blocks (``TokenDataset`` or
    anything with ``len`` and ``[i] -> (T,)`` token tensors). ``evaluate_fn(model, val_data) -> dict`` adds
    metrics to each evaluation (e.g. BrierLM). ``resume=True`` continues from ``out_dir/checkpoint``."""

    def __init__(self, model: nn.Module, train_data: Any, val_data: Any, config: TrainConfig,
                 tokenizer: Any = None, evaluate_fn: EvaluateFn | None = None, resume: bool = False,
                 device: str | torch.device | None = None, metadata: dict[str, Any] | None = None,
                 parallel: Parallel | None = None) -> None:
        self.config, self.tokenizer, self.evaluate_fn = config, tokenizer, evaluate_fn
        self.train_data, self.val_data, self.resume, self.metadata = train_data, val_data, resume, metadata
        self.parallel = parallel if parallel is not None else Parallel(config.distributed)
        self.dist = self.parallel.info
        # "auto": the rank's device (CUDA under torchrun, else MPS, else the CPU)
        self.device = self.dist.device if device is None or str(device) == "auto" else resolve_device(device)
        self.out_dir = Path(config.out_dir).expanduser()
        self.checkpoint_dir = self.out_dir / CHECKPOINT_DIR
        self.block_size = self._check_data(model)
        self.precision = resolve_precision(config.precision, self.device)
        self.fsdp_bf16 = self.parallel.fsdp and self.precision == "bf16" and self.device.type == "cuda"  # CPU: fp32
        self.model, self.engine = self.parallel.wrap(model, self.device, bf16=self.fsdp_bf16)
        self._check_out_dir()
        self.step = 0
        self.train_seconds = 0.0  # wall time spent in optimizer steps (not evaluation or saving), kept on resume
        # the time budget's clock: wall time inside fit's loop (evaluations included), kept on resume, so a
        # resumed run stops when the whole run has used its budget, when its cosine also reaches the end
        self.budget_seconds = 0.0
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps,
            **({"fused": True} if self.device.type == "cuda" else {}))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda s: lr_multiplier(s, config, self.budget_seconds))
        self.sampler = BlockSampler(len(train_data), config.batch_size, seed=config.seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # modules whose training-only losses follow the run's progress (CALM's training aids)
        self.progress_hooks = [m.set_progress for m in self.model.modules() if hasattr(m, "set_progress")]
        # the whole training forward with the loss in it (CALM: autoencoder targets, head, energy score), so
        # inductor fuses across them and AOTAutograd compiles the backward too; evaluation stays eager
        self.compiled = resolve_compile(config.compile, self.device)
        if self.compiled:
            self.engine = torch.compile(self.engine)  # type: ignore[assignment]
        self.last_metrics: dict[str, Any] = {}

    def _check_data(self, model: nn.Module) -> int:
        cfg = self.config
        if self.train_data is None or len(self.train_data) == 0:
            raise DataError("the training data is empty (no full block); use more data or a smaller block size")
        block = _block_size_of(self.train_data)
        if cfg.block_size is not None and cfg.block_size != block:
            raise ConfigError(f"TrainConfig.block_size={cfg.block_size} but the training data has blocks of {block} "
                              f"tokens; rebuild the dataset with block_size={cfg.block_size} or drop the setting")
        if self.val_data is not None and len(self.val_data) and _block_size_of(self.val_data) != block:
            raise ConfigError(f"validation blocks have {_block_size_of(self.val_data)} tokens but training blocks "
                              f"{block}; build both with the same block_size")
        mcfg = getattr(model, "config", None)
        k = getattr(mcfg, "chunk_size", None)
        if k and block % k:
            raise ConfigError(f"block_size {block} is not a multiple of the chunk size K={k}; use a block size "
                              f"divisible by {k} (e.g. {block - block % k or k})")
        max_pos = getattr(mcfg, "max_position_embeddings", None)
        positions = block // k if (k and getattr(mcfg, "kind", "") == "calm") else block - 1
        if max_pos and positions > max_pos:
            raise ConfigError(f"block_size {block} needs {positions} positions but the model has "
                              f"max_position_embeddings={max_pos}; use a smaller block size or a larger model context")
        if self.dist.world_size * cfg.batch_size > len(self.train_data):
            raise DataError(f"{len(self.train_data)} training blocks cannot fill one global batch of "
                            f"{self.dist.world_size * cfg.batch_size}; use more data or a smaller batch size")
        return block

    def _check_out_dir(self) -> None:
        if not self.dist.is_main:
            return
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe = self.out_dir / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"the output directory {self.out_dir} is not writable ({e.strerror}); "
                              "pass a writable out_dir") from None

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop records written after the checkpoint (they will be produced again)."""
        path = self.out_dir / METRICS_FILE
        if not self.dist.is_main or not path.is_file():
            return
        keep = [json.dumps(r) + "\n" for r in read_metrics(path) if r.get("step", 0) <= step]  # as _log wrote them
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)

    # -- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> None:
        """Atomic checkpoint of weights + optimizer + scheduler + step + RNG (all ranks) + data position."""
        rng = self.parallel.gather(ckpt.rng_state())  # collectives: every rank takes part
        weights, optimizer = self.parallel.full_state(self.model, self.optimizer)
        if self.dist.is_main:
            for alias in unique_tensors(self.model)[1]:  # tied weights are stored once, under the first name
                weights.pop(alias, None)
            # training-only parameters (CALM's aids) go with the training state: the saved model stays plain
            training_only = {k: weights.pop(k) for k in list(weights) if k.startswith(TRAINING_ONLY_PREFIX)}
            state = {"optimizer": optimizer, "training_only": training_only or None, "scheduler": self.scheduler.state_dict(), "step": self.step, "rng": rng,
                     "data_state": self.sampler.state_dict(),
                     "extra": {"train_config": self.config.to_dict(), "world_size": self.dist.world_size,
                               "train_seconds": self.train_seconds, "budget_seconds": self.budget_seconds}}
            meta = {**(self.metadata or {}), "step": self.step}
            ckpt.save_checkpoint(self.checkpoint_dir, self.model.config, weights, self.tokenizer, meta,
                                 training_state=state)
        self.parallel.barrier()

    def load(self, directory: str | Path) -> None:
        directory = Path(directory).expanduser()
        if not ckpt.is_checkpoint(directory):
            raise CheckpointError(f"resume requested but there is no checkpoint at {directory} (looked for "
                                  f"{ckpt.CONFIG_FILE} and {ckpt.WEIGHTS_FILE} there); train without resume "
                                  "first, or point resume_from at a checkpoint directory")
        saved = upgrade_config_dict(ckpt.read_config(directory))  # an older config.json in today's fields
        mine = self.model.config.to_dict() if hasattr(self.model, "config") else {}
        diff = sorted(k for k in mine if k in saved and saved[k] != mine[k])
        if saved.get("kind") != mine.get("kind") or diff:
            raise CheckpointError(f"the checkpoint {directory} is for another model (kind {saved.get('kind')!r}, "
                                  f"differing fields {diff}); resume with the same model config")
        # every rank reads the full weights (on the CPU under FSDP) and keeps its part
        weights = ckpt.read_weights(directory, "cpu" if self.parallel.fsdp else self.device)
        info = ckpt.load_training_state(directory, functools.partial(self.parallel.load_optimizer, self.model,
                                                                     self.optimizer), self.scheduler)
        weights.update(info["training_only"] or {})
        with torch.no_grad():
            self.parallel.load_weights(self.model, full_state_dict(self.model, weights, str(directory)))
        self.step = info["step"]
        self.train_seconds = float(info["extra"].get("train_seconds", 0.0))
        self.budget_seconds = float(info["extra"].get("budget_seconds", self.train_seconds))
        if info["data_state"] is not None:
            self.sampler.load_state_dict(info["data_state"])
        rng = info["rng"]
        if isinstance(rng, list):  # one state per rank
            rng = rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0]
        if rng is not None:
            ckpt.set_rng_state(rng)

    # -- the loop ----------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.val_data is None or len(self.val_data) == 0:
            return {}
        cfg = self.config
        with _fixed_rng(cfg.seed + 10_007 + self.dist.rank, self.device), self.parallel.unsharded(self.model):
            out = evaluate_loss(self.model, self.val_data, cfg.batch_size, max(1, cfg.eval_batches), self.device,
                                self.autocast)
            result = {f"val_{k}": v for k, v in out.items()}
            if self.evaluate_fn is not None:
                # FSDP's bf16 policy gathers bf16 parameters: evaluate_fn needs autocast to mix them with fp32 tensors
                with eval_mode(self.model), (self.autocast() if self.fsdp_bf16 else contextlib.nullcontext()):
                    extra = self.evaluate_fn(self.model, self.val_data) or {}
                result.update({k: float(v) for k, v in extra.items()})
        return result

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step of :meth:`fit` (micro-batches, autocast, backward, clipping, AdamW, LR schedule)
        without its logging, evaluation and checkpointing; returns the loss, model metrics and ``grad_norm`` as
        tensors. Benchmarks time this."""
        cfg = self.config
        sums: dict[str, torch.Tensor] = {}
        progress = training_progress(self.step, cfg, self.budget_seconds)
        for set_progress in self.progress_hooks:
            set_progress(progress)
        for micro in range(cfg.grad_accum):
            batch = stack_blocks(self.train_data, next(self.sampler))
            with self.parallel.sync_gradients(self.model, micro == cfg.grad_accum - 1):  # sync on the last one
                with self.autocast():
                    out = _forward(self.engine, batch, self.device)
                (out.loss / cfg.grad_accum).backward()
            for k, v in {"loss": out.loss, **out.metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float() / cfg.grad_accum
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip) if cfg.grad_clip > 0
                     else torch.zeros((), device=self.device))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: the total norm comes back as a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**sums, "grad_norm": grad_norm.float()}

    def fit(self, resume_from: str | Path | None = None, stop_at: int | None = None,
            control: Control | None = None) -> dict[str, Any]:
        """Train to ``max_steps`` (or ``stop_at``, the time budget, or when ``control`` says stop); eval + save
        at the last step and wherever ``control`` asks. Returns the final metrics (last training record merged
        with the final evaluation)."""
        cfg = self.config
        if resume_from is not None or self.resume:
            self.load(resume_from if resume_from is not None else self.checkpoint_dir)
            self._truncate_metrics(self.step)
        else:
            _seed_all(cfg.seed + self.dist.rank)
        if self.dist.is_main:
            (self.out_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            run = {"code": code_version(), "train_config": cfg.to_dict(), "world_size": self.dist.world_size,
                   "precision": self.precision, "compile": self.compiled,
                   "model_config": getattr(getattr(self.model, "config", None), "to_dict", dict)(),
                   **(self.metadata or {})}
            (self.out_dir / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
        end = min(cfg.max_steps, stop_at) if stop_at is not None else cfg.max_steps
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size * self.block_size
        self.model.train()
        bar = _ProgressBar(cfg, self.step, end, self.precision) if cfg.progress and self.dist.is_main else None
        start, clock_at_start = time.perf_counter(), self.budget_seconds
        window_t, window_steps = start, 0
        window: dict[str, torch.Tensor] = {}  # sums of train_step's tensors since the last log
        first_step, final_eval = self.step, {}
        try:
            while self.step < end:
                lr = self.scheduler.get_last_lr()[0]
                t_step = time.perf_counter()
                for k, v in self.train_step().items():
                    window[k] = window.get(k, 0) + v
                self.step += 1
                window_steps += 1
                self.train_seconds += time.perf_counter() - t_step
                self.budget_seconds = clock_at_start + time.perf_counter() - start
                want_eval, want_stop = control(self.step, self.train_seconds) if control else (False, False)
                stop = self._out_of_time(clock_at_start, start, first_step) or want_stop
                last = self.step == end or stop
                if self.step % cfg.log_every == 0 or last:
                    keys = sorted(window)
                    vec = all_reduce(torch.stack([window[k] for k in keys]) / window_steps, mean=True)
                    means = dict(zip(keys, vec.tolist()))  # the only host sync of the loop
                    now = time.perf_counter()
                    if not math.isfinite(means["loss"]):
                        raise FloatingPointError(f"the training loss became {means['loss']} by step {self.step}; "
                                                 "lower the learning rate or raise warmup_steps")
                    record = {"type": "train", "step": self.step, **means, "lr": lr,
                              "tokens_per_s": tokens_per_step * window_steps / max(now - window_t, 1e-9),
                              "tokens": tokens_per_step * self.step, "elapsed_s": now - start,
                              "train_seconds": self.train_seconds}
                    self._log(record)
                    self.last_metrics = record
                    if bar is not None:
                        bar.postfix(means["loss"], lr, record["tokens_per_s"])
                    window_t, window_steps, window = now, 0, {}
                if bar is not None:
                    bar.update(self.step, self.budget_seconds)
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or want_eval or last:
                    result = self.evaluate()
                    if result:
                        self._log({"type": "eval", "step": self.step, "tokens": tokens_per_step * self.step,
                                   "train_seconds": self.train_seconds, **result})
                    if last:
                        final_eval = result
                if (cfg.save_every and self.step % cfg.save_every == 0) or want_eval or last:
                    self.save()
                if stop:
                    break
        finally:
            if bar is not None:
                bar.close()
        return {**self.last_metrics, **final_eval, "step": self.step}

    def _out_of_time(self, clock_at_start: float, start: float, first_step: int) -> bool:
        """Stop when another step would take the run's clock past the time budget (leaving room for eval + save);
        the clock includes earlier invocations of a resumed run."""
        budget = self.config.time_budget_s
        if budget is None:
            return False
        elapsed = time.perf_counter() - start
        per_step = elapsed / max(1, self.step - first_step)
        over = clock_at_start + elapsed + 2 * per_step > budget
        return self.parallel.agree(over, self.device)  # every rank stops at the same step


def train(model: nn.Module, train_data: Any, val_data: Any, config: TrainConfig, tokenizer: Any = None,
          evaluate_fn: EvaluateFn | None = None, resume: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Build a :class:`Trainer` and run ``fit``; returns the final metrics."""
    return Trainer(model, train_data, val_data, config, tokenizer, evaluate_fn, resume=resume, **kwargs).fit()
