"""The machine a command runs on: which device to use, what it is called, and what it can do fast.

``--device auto`` (every command's default) takes CUDA, then Apple's MPS, then the CPU. Names and CPU features
are read, never assumed, so plans and benchmark figures always say which machine they came from.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .errors import ConfigError

# Dense bf16 tensor-core peaks (datasheets, TFLOPS) for MFU; the first key found in the device name wins.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("L4", 121.0),
]


def available(kind: str) -> bool:
    """Whether a device type ("cuda", "mps", "cpu") can be used in this process."""
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        return bool(backend is not None and backend.is_available())
    return kind == "cpu"


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": CUDA, else MPS, else the CPU; an explicit device must exist (one-line error if not)."""
    if spec is None or str(spec) == "auto":
        return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if available(kind)))
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if not available(device.type):
        raise ConfigError(f"--device {spec} was asked for but this machine has no {device.type.upper()} device "
                          "usable by PyTorch; use --device auto (or cpu)")
    return device


def cpu_model() -> str:
    """The CPU's model name (e.g. "AMD EPYC 7B12"), from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles, Sapphire Rapids and later): there
    bf16 autocast trains 2-3x faster than fp32 (BENCHMARKS.md); without AMX it is emulated and slower."""
    try:
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return bool(probe()) if probe is not None else "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except (RuntimeError, OSError):
        return False


def cpu_capability() -> str:
    """The vector instruction set PyTorch's CPU kernels use here ("AVX2", "AVX512", ...), with "+bf16" where the
    CPU has AVX-512 bf16 dot products (Zen 4, Cooper Lake and later) and PyTorch uses AVX-512."""
    try:
        isa = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"
    try:
        bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        bf16 = False
    return f"{isa}+bf16" if bf16 and isa.startswith("AVX512") else isa


def device_name(device: torch.device | str) -> str:
    """A human name: the GPU's, or the CPU model with its thread count and vector unit."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({cpu_model()})"
    amx = ", AMX" if cpu_has_fast_bf16() else ", no AMX"
    return f"CPU: {cpu_model()} ({torch.get_num_threads()} threads, {cpu_capability()}{amx})"


def peak_bf16_tflops(name: str) -> tuple[str, float] | None:
    """The PEAK_BF16_TFLOPS entry whose key occurs in a device name (case-insensitive), or None."""
    return next(((k, v) for k, v in PEAK_BF16_TFLOPS if k.lower() in name.lower()), None)


def cpu_threads() -> tuple[int, int]:
    """(threads PyTorch uses now, logical CPUs this process may run on)."""
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:
        logical = os.cpu_count() or 1
    return torch.get_num_threads(), logical
