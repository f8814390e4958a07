"""The batching engine with ``compile=True``: decode steps on static caches in batch-size and length buckets give
the same tokens as the eager engine (rows admitted into a bucket, moved to a larger one, evicted)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from calmlm.config import baseline_preset, calm_preset
from calmlm.models import build_model
from calmlm.serve.engine import Engine, Request


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "calm":
        model = build_model(calm_preset("debug", eos_token_id=2))
        torch.nn.init.normal_(model.head.final_layer.linears[2].weight, std=2.0)
    else:
        model = build_model(baseline_preset("debug", eos_token_id=2))
    return model.eval().double()  # float64: batching and the masked static layout cannot flip a near-tie


class _Collect:
    def __init__(self) -> None:
        self.steps: list[list[list[int]]] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def __call__(self, item) -> None:
        if item is None or isinstance(item, BaseException):
            self.error = item
            self.done.set()
        else:
            self.steps.append(item.tokens)


def _serve(engine: Engine, asks: list[dict], later: list[dict]) -> list[list[list[list[int]]]]:
    """Submit ``asks`` together, then ``later`` once the first has decoded a step (they join the running batch)."""
    out = [_Collect() for _ in [*asks, *later]]
    for a, c in zip(asks, out):
        engine.submit(Request(emit=c, **a))
    while not out[0].steps and not out[0].done.is_set():
        out[0].done.wait(0.001)
    for a, c in zip(later, out[len(asks):]):
        engine.submit(Request(emit=c, **a))
    for c in out:
        assert c.done.wait(120) and c.error is None
    return [c.steps for c in out]


@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_static_bucketed_engine_answers_as_the_eager_engine(kind, monkeypatch):
    """The static path without compilation (torch.compile as the identity): the bucket logic alone."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model = _model(kind)
    k = model.config.chunk_size if kind == "calm" else 1
    asks = [dict(prompt_ids=[5, 6, 7, 8, 9], max_tokens=12 * k, seed=1),
            dict(prompt_ids=[11], max_tokens=3 * k, seed=2, n=2)]
    later = [dict(prompt_ids=list(range(3, 40)), max_tokens=20 * k, seed=3),  # longer: the batch moves right
             dict(prompt_ids=[4, 4], max_tokens=6 * k, seed=4, temperature=0.5, n=3)]  # more rows: a larger bucket
    eager = Engine(model, max_batch_size=8, batch_wait=0.05)
    static = Engine(model, max_batch_size=8, batch_wait=0.05, compile=True)
    for engine in (eager, static):  # ~5 ms a step, so that the batch is still running when the others arrive
        propose = engine._propose
        monkeypatch.setattr(engine, "_propose", lambda *a, propose=propose: (time.sleep(0.005), propose(*a))[1])
    try:
        want = _serve(eager, asks, later)
        got = _serve(static, asks, later)
    finally:
        eager.close()
        static.close()
    assert got == want
    assert static.joined == eager.joined == 2 and len(static._buckets) >= 2  # joined, moved to a larger bucket
    assert [len(s) for s in got] == [12, 3, 20, 6]


def test_compiled_engine_answers_as_the_eager_engine():
    model = _model("calm")
    asks = [dict(prompt_ids=[5, 6, 7, 8, 9], max_tokens=24, seed=1), dict(prompt_ids=[11], max_tokens=12, seed=2)]
    eager, compiled = Engine(model, max_batch_size=2), Engine(model, max_batch_size=2, compile=True)
    try:
        assert _serve(compiled, asks, []) == _serve(eager, asks, [])
    finally:
        eager.close()
        compiled.close()
