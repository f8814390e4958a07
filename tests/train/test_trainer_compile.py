"""Compiled training (``TrainConfig.compile``): the setting and its default, what is compiled (the whole training
forward with the loss, as one graph), and that a compiled run trains as the eager one does."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from calmlm.cli import build_parser
from calmlm.cli import training as tr
from calmlm.config import autoencoder_preset, baseline_preset, calm_preset
from calmlm.models import build_model
from calmlm.train.trainer import COMPILE_BY_DEFAULT, RUN_FILE, TrainConfig, Trainer, resolve_compile

KINDS = ["baseline", "calm", "autoencoder", "calm-flow", "calm-diffusion"]
PRESETS = {"autoencoder": autoencoder_preset, "calm": calm_preset, "baseline": baseline_preset,
           "calm-flow": lambda name: calm_preset(name, head="flow"),
           "calm-diffusion": lambda name: calm_preset(name, head="diffusion")}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _losses(kind: str, out_dir: Path, compile: bool, device: str = "cpu", precision: str = "fp32",
            steps: int = 3) -> list[float]:
    """Per-step training losses of the debug preset (same weights, data and random draws for every call)."""
    torch.manual_seed(0)
    model = build_model(PRESETS[kind]("debug"))
    data = torch.randint(0, 512, (16, 16), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(lr=1e-3, batch_size=2, max_steps=steps, eval_every=0, save_every=0, precision=precision,
                      compile=compile, out_dir=str(out_dir), progress=False)
    trainer = Trainer(model, data, None, cfg, device=device)
    assert trainer.compiled is compile
    torch.manual_seed(0)
    return [trainer.train_step()["loss"].item() for _ in range(steps)]


def test_compile_setting_unset_follows_the_measured_default(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    assert TrainConfig().compile is None
    assert resolve_compile(None, cpu) is COMPILE_BY_DEFAULT["cpu"]
    monkeypatch.setitem(COMPILE_BY_DEFAULT, "cpu", not COMPILE_BY_DEFAULT["cpu"])  # a measurement flips it
    assert resolve_compile(None, cpu) is COMPILE_BY_DEFAULT["cpu"]
    assert resolve_compile(True, cpu) is True and resolve_compile(False, cpu) is False
    # the training commands: --compile, --no-compile, or neither (the default)
    for flags, expected in (([], None), (["--compile"], True), (["--no-compile"], False)):
        args = build_parser().parse_args(["train-baseline", "--out", str(tmp_path), *flags])
        assert tr.train_config(args).compile is expected
    # an older run's train_config.json says compile: false; it still loads
    assert TrainConfig.from_dict({**TrainConfig().to_dict(), "compile": False}).compile is False


def test_run_record_says_whether_the_run_was_compiled(tmp_path):
    data = torch.randint(0, 512, (8, 16))
    cfg = TrainConfig(max_steps=1, batch_size=2, eval_every=0, save_every=0, out_dir=str(tmp_path / "run"),
                      progress=False, precision="fp32")
    Trainer(build_model(baseline_preset("debug")), data, None, cfg).fit()
    run = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert run["compile"] is resolve_compile(None, torch.device("cpu"))
    assert run["train_config"]["compile"] is None


@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_and_loss_compile_as_one_graph(monkeypatch, tmp_path, kind):
    """With ``compile=True`` the trainer hands the whole training forward (targets, model, head, loss) to
    torch.compile. ``fullgraph=True`` turns any graph break into an error, and the ``aot_eager`` backend traces
    forward and backward as inductor would but runs eager kernels and random draws, so the losses must be
    eager's (CALM: to float32 rounding, its energy distances take the compile-friendly formula); every head."""
    from torch._dynamo.utils import counters

    eager = _losses(kind, tmp_path / "eager", compile=False)
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager", fullgraph=True))
    compiled = _losses(kind, tmp_path / "compiled", compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # it was traced, not run eagerly
    assert compiled == pytest.approx(eager, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["baseline", "calm"])
def test_inductor_compiled_training_matches_eager_on_cpu(tmp_path, kind):
    """Inductor (C++ kernels on the CPU; compiling takes 1-2 minutes here). ``fallback_random`` makes the
    compiled code draw CALM's noise with eager's generator, so the numbers can be compared."""
    import torch._inductor.config as inductor_config

    eager = _losses(kind, tmp_path / "eager", compile=False)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        compiled = _losses(kind, tmp_path / "compiled", compile=True)
    assert compiled == pytest.approx(eager, rel=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("kind", "precision"), [("calm", "fp32"), ("calm", "bf16"), ("baseline", "bf16")])
def test_inductor_compiled_training_matches_eager_on_cuda(tmp_path, kind, precision):
    """On a GPU (Triton kernels): compiled = eager to rounding, in fp32 and under bf16 autocast (training's)."""
    import torch._inductor.config as inductor_config

    eager = _losses(kind, tmp_path / "eager", compile=False, device="cuda", precision=precision)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        compiled = _losses(kind, tmp_path / "compiled", compile=True, device="cuda", precision=precision)
    assert compiled == pytest.approx(eager, rel=1e-4 if precision == "fp32" else 2e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_training_uses_fused_adamw(tmp_path):
    data = torch.randint(0, 512, (8, 16))
    cfg = TrainConfig(batch_size=2, max_steps=1, eval_every=0, save_every=0, out_dir=str(tmp_path), progress=False)
    trainer = Trainer(build_model(baseline_preset("debug")), data, None, cfg, device="cuda")
    assert trainer.optimizer.defaults["fused"] is True
    assert trainer.precision == "bf16"
