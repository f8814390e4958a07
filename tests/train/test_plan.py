"""The quickstart's plan (train/plan.py): measured choices on fake machines, the time split, the up-front warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from calmlm.cli.quickstart import target_control
from calmlm.train import plan as planning
from calmlm.train.plan import (AE_FLOOR, AE_MAX_SHARE, AE_TARGET, expected_accuracy, plan_run, time_training_steps,
                               tokens_to_reach)


def fake_machine(ae: float, calm: float, baseline: float, bf16: float = 1.0, base_cost: float = 4.0,
                 saturate: int = 16, threads: dict[int, float] | None = None, calls: list | None = None,
                 long_blocks: float = 1.0):
    """A measuring function: tokens/s of each model, bf16 speed-up, the base preset's cost, the batch where the
    device saturates and a speed factor per thread count (the test sets the thread count through set_threads)."""
    state = {"threads": 1}

    def measure(kind, size, vocab, precision, batch, block):
        if calls is not None:
            calls.append((kind, size, vocab, precision, batch, state["threads"]))
        speed = {"autoencoder": ae, "calm": calm, "baseline": baseline}[kind]
        speed *= (1.45 if vocab == 4096 else 1.0) * (bf16 if precision == "bf16" else 1.0)
        speed /= base_cost if size == "base" else 1.0
        speed *= min(batch * block // 256, saturate) / 16 * (threads or {}).get(state["threads"], 1.0)
        speed *= long_blocks if block > 256 else 1.0
        return speed

    def set_threads(n):
        state["threads"] = n
    return measure, set_threads


def _plan(machine, budget_min=15.0, device="cpu", **kw):
    measure, set_threads = machine
    budget = budget_min * 60
    return plan_run(budget, budget - 120, torch.device(device), measure=measure, set_threads=set_threads,
                    name=f"fake {device}", **{"threads": (2,), **kw})


def test_learning_curve_inverse():
    for vocab in (8192, 4096):
        for acc in (0.9, AE_FLOOR, AE_TARGET):
            tokens = tokens_to_reach("small", vocab, acc)
            assert tokens is not None and expected_accuracy("small", vocab, tokens) == pytest.approx(acc, abs=1e-9)
    assert tokens_to_reach("small", 8192, 0.99999) is None  # beyond the measured curve
    assert expected_accuracy("small", 4096, 1e3) < 0.01
    # a smaller vocabulary is learned from fewer tokens (measured: docs/small_scale.md)
    assert tokens_to_reach("small", 4096, AE_FLOOR) < tokens_to_reach("small", 8192, AE_FLOOR)


def test_slow_and_fast_machines_get_different_plans():
    # a 2-core CPU without AMX where the targets just fit (the AVX2-emulating EPYC measured ae 5600, calm 5700,
    # baseline 2900 tokens/s at 8192, 4096 being 1.45x faster: its plan warns that the LMs get ~294 steps)
    slow = _plan(fake_machine(ae=5600, calm=5700, baseline=3300, bf16=0.4))
    fast = _plan(fake_machine(ae=4e5, calm=6e5, baseline=5e5, bf16=2.5, saturate=64), device="cuda")
    assert (slow.precision, slow.vocab_size, slow.size) == ("fp32", 4096, "small")
    assert (fast.precision, fast.vocab_size, fast.size) == ("bf16", 8192, "base")
    assert {s.batch_size for s in slow.stages.values()} == {16}  # CPU: the recipes' batch
    assert {s.batch_size for s in fast.stages.values()} == {64}  # GPU: the smallest batch that saturates it
    for plan in (slow, fast):
        ae, calm, base = plan.stages["autoencoder"], plan.stages["calm"], plan.stages["baseline"]
        assert calm.minutes == base.minutes  # the LMs split what the autoencoder leaves, equally
        assert ae.minutes + calm.minutes + base.minutes == pytest.approx(15 - 2)
        assert ae.minutes <= AE_MAX_SHARE * (15 - 2) + 1e-9
        assert ae.expected_accuracy >= AE_FLOOR
    assert fast.stages["autoencoder"].minutes < 1  # stops as soon as its target is in reach
    assert not slow.warnings and not fast.warnings
    text = slow.format()
    assert "fake cpu" in text and "tokens/s" in text and "expects" in text
    assert json.loads(json.dumps(slow.to_dict()))["stages"]["calm"]["expected_steps"] == slow.stages["calm"].expected_steps


def test_a_budget_that_cannot_be_met_is_said_up_front():
    plan = _plan(fake_machine(ae=300, calm=500, baseline=300), budget_min=15)
    assert plan.warnings and plan.minutes_needed is not None and plan.minutes_needed > 15
    assert any("needs about" in w for w in plan.warnings)
    assert f"about {int(plan.minutes_needed) + 1} minutes" in plan.warnings[-1]
    assert plan.stages["autoencoder"].expected_accuracy < AE_FLOOR  # it runs anyway, with what it can reach
    roomy = _plan(fake_machine(ae=300, calm=500, baseline=300), budget_min=plan.minutes_needed * 1.1)
    assert not roomy.warnings


def test_fixed_choices_and_threads():
    calls: list = []
    measure, set_threads = fake_machine(ae=3900, calm=6000, baseline=3500, threads={1: 1.0, 2: 1.7}, calls=calls)
    plan = _plan((measure, set_threads), threads=(1, 2), precision="fp32", vocab_size=8192, size="small")
    assert plan.threads == 2 and plan.precision == "fp32" and plan.vocab_size == 8192 and plan.size == "small"
    assert not any(c[3] == "bf16" for c in calls) and not any(c[2] == 4096 for c in calls)
    assert len(calls) == len(set(calls)) == 4  # each configuration timed once: the autoencoder at 1 and 2 threads


def test_time_training_steps_on_this_cpu():
    cfg = planning.model_config("baseline", "debug", 512, 32)
    seconds = time_training_steps(cfg, 2, 32, "fp32", torch.device("cpu"), steps=1, warmup=1)
    assert 0 < seconds < 30


def test_autoencoder_stops_once_its_target_is_reached(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    control = target_control(metrics, every=10, target=0.995)
    assert control(10, 1.0) == (True, False)
    metrics.write_text(json.dumps({"type": "eval", "step": 10, "token_acc_sigma0": 0.99}) + "\n")
    assert control(11, 1.1) == (False, False)
    with metrics.open("a") as f:
        f.write(json.dumps({"type": "eval", "step": 20, "token_acc_sigma0": 0.996}) + "\n")
    assert control(20, 2.0) == (True, False) and control(21, 2.1) == (False, True)


def test_a_gpu_takes_longer_blocks_only_where_they_train_faster():
    same = _plan(fake_machine(ae=4e5, calm=6e5, baseline=5e5, bf16=2.5, saturate=64), device="cuda")
    faster = _plan(fake_machine(ae=4e5, calm=6e5, baseline=5e5, bf16=2.5, saturate=64, long_blocks=1.3),
                   device="cuda")
    assert same.block_size == 256 and faster.block_size == 1024
    assert faster.stages["baseline"].batch_size == 16 and faster.stages["baseline"].tokens_per_step == 16 * 1024
    cpu = _plan(fake_machine(ae=3900, calm=6000, baseline=3500, long_blocks=1.3))
    assert cpu.block_size == 256  # a CPU keeps the quickstart's block; fixed blocks are never replanned
    assert _plan(fake_machine(ae=4e5, calm=6e5, baseline=5e5, long_blocks=1.3), device="cuda",
                 block_size=512).block_size == 512
