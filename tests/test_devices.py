"""The device choice (`--device auto`: CUDA, then MPS, then the CPU) and the machine's description."""

from __future__ import annotations

import pytest
import torch

from calmlm import devices
from calmlm.errors import ConfigError


@pytest.mark.parametrize("present, expected", [({"cuda", "mps", "cpu"}, "cuda"), ({"mps", "cpu"}, "mps"),
                                               ({"cpu"}, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, present, expected):
    monkeypatch.setattr(devices, "available", lambda kind: kind in present)
    assert devices.resolve_device("auto").type == expected
    assert devices.resolve_device(None).type == expected


def test_an_absent_or_unknown_device_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(devices, "available", lambda kind: kind == "cpu")
    with pytest.raises(ConfigError, match="no MPS device.*--device auto"):
        devices.resolve_device("mps")
    with pytest.raises(ConfigError, match="unknown device 'gpu7'"):
        devices.resolve_device("gpu7")
    assert devices.resolve_device("cpu") == torch.device("cpu")


def test_single_process_training_takes_mps_when_it_is_the_accelerator(monkeypatch):
    from calmlm.train import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "available", lambda kind: kind in ("mps", "cpu"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup_distributed().device.type == "mps"


def test_machine_description_names_the_cpu():
    name = devices.device_name("cpu")
    assert devices.cpu_model() in name and "threads" in name and ("AMX" in name)
    assert devices.peak_bf16_tflops("NVIDIA H200")[1] == pytest.approx(989.4)
    assert devices.peak_bf16_tflops("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert devices.peak_bf16_tflops("Some Future GPU") is None
