"""Golden loss traces: a few training steps of each model's ``debug`` preset, compared with the stored trace.

A change anywhere on the training path (initialisation, backbone, head, losses, optimiser, schedule, data
order, seeding) moves these numbers; a refactoring that should change nothing must leave them in place.
Tolerance: relative ``RTOL`` (float32 on CPU; differences in reduction order between machines and thread
counts stay far below it, a real change of the computation moves the trace by much more).

Regenerate after an *intended* change, and say why in the commit:

    PYTHONPATH=src python tests/train/test_golden.py      # rewrites tests/train/golden/loss_traces.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from calmlm.config import autoencoder_preset, baseline_preset, calm_preset
from calmlm.models import build_model
from calmlm.train.trainer import METRICS_FILE, Trainer, TrainConfig

GOLDEN = Path(__file__).parent / "golden" / "loss_traces.json"
RTOL = 1e-4
STEPS = 6
PRESETS = {"autoencoder": autoencoder_preset, "calm": calm_preset, "baseline": baseline_preset}


def loss_trace(kind: str, out_dir: str, warmup_steps: int = 2) -> dict[str, list[float]]:
    """Per-step training loss (and the model's own metrics) of ``STEPS`` steps of the ``debug`` preset."""
    torch.manual_seed(0)
    model = build_model(PRESETS[kind]("debug"))
    data = torch.randint(0, model.config.vocab_size, (16, 16), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(lr=1e-3, warmup_steps=warmup_steps, max_steps=STEPS, batch_size=2, eval_every=0,
                      save_every=0, log_every=1, seed=0, out_dir=out_dir, progress=False, precision="fp32")
    with torch.random.fork_rng():
        Trainer(model, data, None, cfg).fit()
    records = [json.loads(line) for line in (Path(out_dir) / METRICS_FILE).read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    skip = {"type", "step", "lr", "tokens_per_s", "tokens", "elapsed_s", "train_seconds"}  # wall times vary
    return {key: [r[key] for r in train] for key in train[0] if key not in skip}


def _traces() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in PRESETS:
        with tempfile.TemporaryDirectory() as d:
            out[kind] = loss_trace(kind, d)
    return out


@pytest.mark.parametrize("kind", list(PRESETS))
def test_debug_loss_trace_matches_golden(kind: str, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())["traces"][kind]
    got = loss_trace(kind, str(tmp_path / "run"))
    assert sorted(got) == sorted(golden)
    for key, values in golden.items():
        assert len(got[key]) == STEPS
        assert got[key] == pytest.approx(values, rel=RTOL), (
            f"{kind} {key} trace moved: {got[key]} vs golden {values}; if the change is intended, regenerate "
            "with `PYTHONPATH=src python tests/train/test_golden.py`")


def test_golden_trace_is_sensitive() -> None:
    """The tolerance would catch a small real change: one more warm-up step moves every trace past RTOL."""
    golden = json.loads(GOLDEN.read_text())["traces"]["baseline"]["loss"]
    with tempfile.TemporaryDirectory() as d:
        changed = loss_trace("baseline", d, warmup_steps=3)["loss"]
    assert changed[-1] != pytest.approx(golden[-1], rel=RTOL)


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"steps": STEPS, "rtol": RTOL, "torch": torch.__version__, "traces": _traces(),
                                  "regenerate": "PYTHONPATH=src python tests/train/test_golden.py"}, indent=2) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
