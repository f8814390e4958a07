"""Native checkpoints: a directory with ``config.json`` + safetensors weights (+ tokenizer, + training state).

Layout::

    config.json                         model config (its "kind": autoencoder | calm | baseline) + metadata
    model.safetensors                   all weights, or when larger than max_shard_size:
    model-00001-of-0000N.safetensors    shards, with model.safetensors.index.json (Hugging Face index format)
    tokenizer.json, tokenizer_config.json   when a tokenizer was given
    trainer_state.json, optimizer.pt, rng_state.pt   when saved by the trainer (exact resume)

Every save writes a hidden temporary sibling directory, fsyncs it, and renames it into place (an existing
checkpoint is renamed aside first and deleted last), so a crash never leaves a half-written checkpoint. A save
that fails (a full disk...) deletes its temporary directory and raises a ``CheckpointError`` naming the folder,
the step and the previous checkpoint, which is left in place.
Tied weights (e.g. the baseline's ``lm_head.weight`` = ``backbone.embed_tokens.weight``) are stored once
and re-tied on load. A CALM checkpoint holds its frozen autoencoder under ``autoencoder.*``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import random
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import CheckpointError, ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
REFERENCE_WEIGHTS = "pytorch_model.bin"
# Looked for in this order: safetensors are preferred when a folder has both (no pickle, same tensors).
WEIGHT_FILES = (INDEX_FILE, WEIGHTS_FILE, "pytorch_model.bin.index.json", REFERENCE_WEIGHTS)
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3
# what a failed write raises: OSError from Python, RuntimeError from torch.save, SafetensorError from safetensors
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
KIND_NAMES = {"autoencoder": "an autoencoder", "calm": "a CALM", "baseline": "a baseline"}


# -- atomic directory writes ---------------------------------------------------------------------------

def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames inside it durable). A file's fsync
    error (ENOSPC, EIO: data that never reached the disk) is raised; a directory's is ignored (some filesystems
    refuse fsync on directories), as is a filesystem without fsync."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if not path.is_dir() and e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def _stale_siblings(directory: Path) -> list[Path]:
    """Temporary and renamed-aside copies of ``directory`` left by an interrupted save."""
    if not directory.parent.is_dir():
        return []
    prefixes = (f".{directory.name}.tmp-", f".{directory.name}.old-")
    return [p for p in directory.parent.iterdir() if p.name.startswith(prefixes)]


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield an empty hidden temporary directory that replaces ``directory`` atomically on success (on an
    exception it is deleted and ``directory`` is left as it was)."""
    directory = Path(directory).expanduser().absolute()
    parent = directory.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the checkpoint folder {parent} ({e.strerror}); "
                              "choose a writable output directory") from None
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{parent} is not writable, so no checkpoint can be saved there; "
                              "choose a writable output directory")
    for stale in _stale_siblings(directory):
        if stale.name.startswith(f".{directory.name}.old-") and not directory.exists():
            stale.rename(directory)  # the crash hit between the two renames: the old one is the latest
        else:
            shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = parent / f".{directory.name}.tmp-{tag}", parent / f".{directory.name}.old-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for dirpath, _, filenames in os.walk(tmp):
            for name in filenames:
                _fsync_path(Path(dirpath) / name)
            _fsync_path(Path(dirpath))
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        _fsync_path(parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old.exists() and not directory.exists():  # failed between the two renames: the old one goes back
            old.rename(directory)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- saving ----------------------------------------------------------------------------------------------

def _unique_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each shared tensor stored once (safetensors refuses aliases), on the CPU.

    Identical aliases (tied weights) keep their first name; the model built from the config re-ties them on
    load. Other overlapping views are copied, so the file never depends on memory sharing."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        if t.numel() and (ptr in storages or not t.is_contiguous()):
            t = t.contiguous().clone()
        storages.add(ptr)
        out[name] = t.cpu()
    return out


def write_weights(weights: dict[str, torch.Tensor], directory: Path,
                  max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write a state dict into an existing directory (not atomic by itself; see ``save_model``): one
    safetensors file, or shards + index in the Hugging Face layout, by ``huggingface_hub``'s own writer."""
    from huggingface_hub import save_torch_state_dict

    if max_shard_size <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {max_shard_size}")
    save_torch_state_dict(_unique_state_dict(weights), directory, max_shard_size=max_shard_size,
                          metadata={"format": "pt"})


def save_model(model: nn.Module, directory: str | Path, tokenizer: Any = None,
               metadata: dict[str, Any] | None = None, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
               training_state: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (its config, weights, optionally a tokenizer) atomically; see :func:`save_checkpoint`."""
    config = getattr(model, "config", None)
    if not hasattr(config, "to_dict"):
        raise CheckpointError(f"{type(model).__name__} has no calmlm config (.config.to_dict()); only calmlm "
                              "models (autoencoder, CALM, baseline) can be saved as checkpoints")
    return save_checkpoint(directory, config, model.state_dict(), tokenizer, metadata, max_shard_size=max_shard_size,
                           training_state=training_state)


def save_checkpoint(directory: str | Path, config: Any, weights: dict[str, torch.Tensor], tokenizer: Any = None,
                    metadata: dict[str, Any] | None = None, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                    training_state: dict[str, Any] | None = None) -> Path:
    """Save a model config and its state dict (+ a tokenizer) as a checkpoint directory, atomically.

    ``metadata`` is merged into ``config.json`` (model config keys win). ``training_state`` holds the keyword
    arguments of :func:`save_training_state`, written in the same atomic step. A failed write (a full disk...)
    raises a ``CheckpointError`` that names the folder, the step (``metadata["step"]``) and the checkpoint left
    there, which is the previous one, untouched."""
    try:
        with atomic_directory(directory) as tmp:
            _write_json(tmp / CONFIG_FILE, {**(metadata or {}), **config.to_dict()})
            write_weights(weights, tmp, max_shard_size)
            if tokenizer is not None:
                tokenizer.save(tmp)
            if training_state is not None:
                save_training_state(tmp, **training_state)
    except WRITE_ERRORS as e:
        needed = _tensor_bytes(weights) + _tensor_bytes(training_state)
        raise CheckpointError(_save_failed(Path(directory).expanduser(), e, (metadata or {}).get("step"), needed,
                                           resumable=training_state is not None)) from None
    return Path(directory)


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists and tuples): about what saving it writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _save_failed(directory: Path, error: Exception, step: Any, needed: int, resumable: bool) -> str:
    """The one-line message of a failed save: what, where, why, which checkpoint is left, what to do."""
    try:
        free: int | None = shutil.disk_usage(directory.parent).free
    except OSError:
        free = None
    if free is not None and free < needed:  # torch's own message for a full disk does not say so
        why = f"not enough disk space: {_gb(free)} free, about {_gb(needed)} needed"
    elif isinstance(error, OSError):
        why = error.strerror or str(error)
    else:
        why = (str(error).strip().splitlines() or [type(error).__name__])[0]
    previous = is_checkpoint(directory)
    if previous:
        at_step = ""
        with contextlib.suppress(CheckpointError):
            step_before = read_config(directory).get("step")
            at_step = f" (step {step_before})" if step_before is not None else ""
        left = f"the last good checkpoint{at_step} is still at {directory}"
    else:
        left = f"there is no earlier checkpoint at {directory}"
    then = "resume from it (--resume)" if resumable and previous else "try again"
    what = f"the checkpoint of step {step}" if step is not None else "the checkpoint"
    return f"saving {what} to {directory} failed ({why}); {left}; free some disk space or choose another " \
           f"output folder, then {then}"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


# -- loading ---------------------------------------------------------------------------------------------

def _did_you_mean(directory: Path) -> str:
    """A hint for a directory that is not a checkpoint: an interrupted save, or a checkpoint inside it."""
    for stale in _stale_siblings(directory):
        if stale.name.startswith(f".{directory.name}.old-") and (stale / CONFIG_FILE).is_file():
            return f"; a save was interrupted and the previous checkpoint is at {stale} (rename it to {directory.name})"
    if not directory.is_dir():
        return ""
    candidates = [p for p in sorted(directory.iterdir()) if p.is_dir() and (p / CONFIG_FILE).is_file()]
    if not candidates:
        return ""
    best = next((c for c in candidates if c.name == "checkpoint"), candidates[0])  # a run folder's latest
    return f"; did you mean {best}?"


def is_checkpoint(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / CONFIG_FILE).is_file() and ((d / WEIGHTS_FILE).is_file() or (d / INDEX_FILE).is_file())


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint, with clear errors for a missing or corrupt one."""
    directory = Path(directory).expanduser()
    if not directory.exists():
        raise CheckpointError(f"no checkpoint at {directory}: the directory does not exist{_did_you_mean(directory)}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a checkpoint directory; pass the folder holding "
                              "config.json and model.safetensors")
    path = directory / CONFIG_FILE
    if not path.is_file():
        if (directory / REFERENCE_WEIGHTS).is_file():
            raise CheckpointError(f"{directory} holds a reference-format checkpoint ({REFERENCE_WEIGHTS}), not a "
                                  "native calmlm one; load it with calmlm.load, which detects the format")
        hint = _did_you_mean(directory) or "; pass a folder written by calmlm (config.json + model.safetensors)"
        raise CheckpointError(f"{directory} is not a calmlm checkpoint (no {CONFIG_FILE}){hint}")
    data = read_json(path)
    if "kind" not in data:
        raise CheckpointError(f"{path} has no model 'kind'; it is not a calmlm config (expected one of "
                              f"{sorted(KIND_NAMES)})")
    return data


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, with a clear error for a missing, corrupt or non-object file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no {path.name} in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {e}); restore, re-save or re-download it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; it is not a model config")
    return data


def _corrupt(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); restore, re-save "
                           "or re-download it")


@dataclass
class WeightFiles:
    """The weights of a folder (either format): one file or several shards named by an index file."""

    directory: Path
    shards: list[str]
    safetensors: bool
    _shapes: dict[str, tuple[int, ...]] | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def find(cls, directory: Path) -> WeightFiles | None:
        """The first of ``WEIGHT_FILES`` present in ``directory``, or None."""
        for name in WEIGHT_FILES:
            path = directory / name
            if not path.is_file():
                continue
            safe = ".safetensors" in name
            if not name.endswith(".index.json"):
                return cls(directory, [name], safe)
            try:
                shards = list(dict.fromkeys(read_json(path)["weight_map"].values()))
            except (KeyError, TypeError, AttributeError) as e:
                raise _corrupt(path, e) from None
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{directory} is missing weight shard(s) {missing} listed in {name}; the "
                                      "checkpoint is incomplete, copy the missing files or re-save it")
            return cls(directory, shards, safe)
        return None

    def load_shard(self, name: str) -> dict[str, torch.Tensor]:
        """One shard as CPU tensors backed by the file's pages (no copy is made here)."""
        path = self.directory / name
        try:
            if self.safetensors:
                from safetensors.torch import load_file

                return load_file(path, device="cpu")
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Files from torch < 1.6 (legacy format) cannot be mapped; this shard is then read in full.
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors and pickle raise their own error types for truncated/garbage files
            raise _corrupt(path, e) from None

    def iter_shards(self) -> Iterator[dict[str, torch.Tensor]]:
        for name in self.shards:
            yield self.load_shard(name)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key's shape, read from headers (safetensors) or from the mapped state dicts (torch)."""
        if self._shapes is not None:
            return self._shapes
        from safetensors import safe_open

        self._shapes = {}
        for name in self.shards:
            if not self.safetensors:
                self._shapes.update({k: tuple(v.shape) for k, v in self.load_shard(name).items()})
                continue
            try:
                with safe_open(self.directory / name, framework="pt") as f:
                    self._shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except Exception as e:
                raise _corrupt(self.directory / name, e) from None
        return self._shapes


def native_weights(directory: Path) -> WeightFiles:
    """The safetensors weights of a native checkpoint (config.json already read)."""
    files = WeightFiles.find(directory)
    if files is None:
        raise CheckpointError(f"{directory} is not a calmlm checkpoint: it has {CONFIG_FILE} but no weights "
                              f"({WEIGHTS_FILE} or {INDEX_FILE}); the save was incomplete or the files were moved")
    if not files.safetensors:
        raise CheckpointError(f"{directory} holds {REFERENCE_WEIGHTS} (the reference format) but no {WEIGHTS_FILE}; "
                              "load it with calmlm.load, which detects the format")
    return files


def read_weights(directory: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a native checkpoint (single file or shards), floating ones cast to ``dtype`` if given."""
    out: dict[str, torch.Tensor] = {}
    for shard in native_weights(Path(directory)).iter_shards():
        for key, t in shard.items():
            out[key] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).to(device)
    return out


def model_config(directory: str | Path, expect: str | None = None) -> Any:
    """The model config of a native checkpoint; ``expect`` (a kind) rejects a checkpoint of another kind."""
    from ..config import config_from_dict

    directory = Path(directory).expanduser()
    if expect is not None and expect not in KIND_NAMES:
        raise CheckpointError(f"unknown model kind {expect!r}; expected one of {sorted(KIND_NAMES)}")
    data = read_config(directory)
    kind = data["kind"]
    if expect is not None and kind != expect:
        raise CheckpointError(f"{directory} is {KIND_NAMES.get(kind, repr(kind))} checkpoint, expected "
                              f"{KIND_NAMES[expect]} one; pass the right checkpoint directory")
    fields = _config_fields(kind)
    try:
        return config_from_dict({k: v for k, v in data.items() if k in fields or k == "kind"})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a valid {kind} config: {e}") from None


def _config_fields(kind: Any) -> set[str]:
    """Fields of the config class of ``kind`` (extra keys in config.json are metadata, not config)."""
    from ..config import CONFIG_CLASSES

    if kind not in CONFIG_CLASSES:
        raise CheckpointError(f"config.json names an unknown model kind {kind!r}; expected one of "
                              f"{sorted(CONFIG_CLASSES)}")
    return {f.name for f in dataclasses.fields(CONFIG_CLASSES[kind])}  # type: ignore[arg-type]


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The keys of ``config.json`` that are not model-config fields (what ``save_model(metadata=...)`` added)."""
    data = read_config(directory)
    fields = _config_fields(data["kind"])
    return {k: v for k, v in data.items() if k not in fields and k != "kind"}


# -- training state --------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every random generator training touches: torch CPU, CUDA (if available), numpy, Python ``random``."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy/python states as plain lists/ints so torch.load(weights_only=True) can read them
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_cached)],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from a state of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():  # with another GPU count, restore what matches
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def save_training_state(directory: str | Path, optimizer: dict[str, Any] | None = None,
                        scheduler: dict[str, Any] | None = None, step: int = 0, rng: Any = None,
                        data_state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                        training_only: dict[str, torch.Tensor] | None = None) -> None:
    """Write the training state files into ``directory``; ``rng`` is a state of :func:`rng_state` or a list of them
    (one per rank); ``training_only``: parameters used only in training (CALM's aids), kept out of the model's
    weights. Pass it through ``save_model(training_state=...)`` for an atomic write."""
    directory = Path(directory)
    _write_json(directory / TRAINER_STATE_FILE, {"step": int(step), "data_state": data_state, "extra": extra or {}})
    torch.save({"optimizer": optimizer, "scheduler": scheduler, "training_only": training_only},
               directory / OPTIMIZER_FILE)
    if rng is not None:
        torch.save({"rng": rng}, directory / RNG_FILE)


def load_training_state(directory: str | Path,
                        optimizer: torch.optim.Optimizer | Callable[[dict[str, Any]], None] | None = None,
                        scheduler: Any = None) -> dict[str, Any]:
    """The training state of a checkpoint as {"step", "data_state", "extra", "rng", "optimizer", "scheduler",
    "training_only"},
    with the optimizer/scheduler state restored in place; ``optimizer`` may be a function that loads its state
    dict (the trainer's reshards it under FSDP). ``rng`` (or None) is for :func:`set_rng_state`."""
    directory = Path(directory)
    path = directory / TRAINER_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no training state ({TRAINER_STATE_FILE}); it holds weights only, "
                              "so training cannot resume from it exactly (start a new run initialised from it)")
    try:
        saved = json.loads(path.read_text())
        step = int(saved["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}); resume from another checkpoint") from None
    opt = _torch_load(directory / OPTIMIZER_FILE)
    rng = _torch_load(directory / RNG_FILE)["rng"] if (directory / RNG_FILE).is_file() else None
    info = {"step": step, "data_state": saved.get("data_state"), "extra": saved.get("extra") or {}, "rng": rng,
            "optimizer": opt.get("optimizer"), "scheduler": opt.get("scheduler"),
            "training_only": opt.get("training_only")}
    load_optimizer = optimizer.load_state_dict if isinstance(optimizer, torch.optim.Optimizer) else optimizer
    try:
        if load_optimizer is not None and info["optimizer"] is not None:
            load_optimizer(info["optimizer"])
        if scheduler is not None and info["scheduler"] is not None:
            scheduler.load_state_dict(info["scheduler"])
    except (ValueError, KeyError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"the optimizer state in {directory / OPTIMIZER_FILE} does not fit this model's "
                              f"parameters ({e}); resume with the same model and trainable parameters") from None
    return info


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint's training state is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt or unreadable ({type(e).__name__}: {e}); "
                              "resume from another checkpoint") from None
