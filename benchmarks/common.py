"""Helpers shared by the benchmark scripts: environment metadata, timing, JSON output.

Every result file has the same top-level ``meta`` block (device, torch version, threads, time...)
so figures from different runs and machines are never compared blind.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from calmlm import devices

REPO = Path(__file__).resolve().parents[1]


def device_name(device: torch.device | str = "cpu") -> str:
    """The GPU's name, or the CPU model with threads, vector unit and AMX (calmlm.devices.device_name)."""
    return devices.device_name(device)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where and when a benchmark ran."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "--short", "HEAD") or None,
        "git_dirty": None if (status := _git("status", "--porcelain", "--untracked-files=no")) is None else bool(status),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def time_call(fn: Callable[[], object], repeats: int = 7, warmup: int = 1, device: torch.device | str = "cpu") -> dict[str, float]:
    """Wall time of ``fn()``: median and best of ``repeats`` runs after ``warmup`` untimed ones.

    The median is the figure to report (robust to a busy machine); the best is the floor.
    """
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "best_s": min(times), "repeats": repeats}


def write_json(path: str | Path, results: dict[str, Any], device: torch.device | str = "cpu") -> Path:
    """Write ``{"meta": environment(device), **results}`` to ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": environment(device), **results}
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
