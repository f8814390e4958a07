"""The KV cache: the static layout (device position, masked full buffer) and the batching operations (admit, evict)
compute what a row computes alone in a plain cache."""

import pytest
import torch

from calmlm.config import baseline_preset
from calmlm.models import build_model


def _model():
    torch.manual_seed(0)
    return build_model(baseline_preset("debug")).eval().double()


def _x(*shape):
    return torch.randn(*shape, 64, dtype=torch.float64)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_static_cache_computes_what_the_dynamic_one_does():
    m = _model().backbone
    dynamic, static = m.new_cache(2, 9), m.new_cache(2, 9, static=True)
    for t in (5, 1, 1, 2):  # a prompt, two decode steps, a block
        x = _x(2, t)
        _close(m(x, static), m(x, dynamic))
    assert static.length == dynamic.length == 9 and int(static.position) == 9
    with pytest.raises(ValueError, match="full"):
        m(_x(2, 1), static)


@pytest.mark.parametrize("static", [False, True])
@torch.no_grad()
def test_admit_and_evict_keep_every_row_computing_what_it_does_alone(static):
    """Rows of different lengths prefilled on their own, admitted into one cache (the shorter side left-padded),
    stepped together, then one evicted: each row's outputs equal those of the row decoded alone."""
    m = _model().backbone
    prompts = [_x(1, 5), _x(1, 2), _x(1, 3)]
    alone = [m.new_cache(1, 12) for _ in prompts]
    expect = [m(p, c)[0, -1] for p, c in zip(prompts, alone)]

    batch = m.new_cache(4, 12, static=True) if static else None  # static: one vacant row throughout
    if static:
        batch.clear()
    for p, want in zip(prompts, expect):  # each joins the running batch, as in the serving engine
        zero = torch.zeros(1, dtype=torch.long)
        if batch is None:  # dynamic: the first prompt is prefilled straight into the batch's cache, with room
            batch = m.new_cache(1, p.shape[1] + 7, pad=zero)
            _close(m(p, batch)[0, -1], want)
            continue
        prefill = m.new_cache(1, p.shape[1], pad=zero)
        _close(m(p, prefill)[0, -1], want)
        batch.admit(prefill, room=7)
    assert batch.rows == 3 and batch.length == 5 and batch.pad[:3].tolist() == [0, 3, 2]

    for _ in range(2):
        step = _x(4 if static else 3, 1)
        out = m(step, batch)
        for i, c in enumerate(alone):
            _close(out[i, 0], m(step[i:i + 1], c)[0, 0])

    batch.evict(torch.tensor([2, 1]))  # row 0 (no padding) leaves: two padding columns no row needs are dropped
    alone = [alone[2], alone[1]]
    assert batch.rows == 2 and batch.length == 5 and batch.pad[:2].tolist() == [0, 1]
    for _ in range(2):
        step = _x(4 if static else 2, 1)
        out = m(step, batch)
        for i, c in enumerate(alone):
            _close(out[i, 0], m(step[i:i + 1], c)[0, 0])


def test_a_static_cache_refuses_what_it_cannot_hold():
    m = _model().backbone
    batch = m.new_cache(1, 4, static=True)
    batch.clear()
    with pytest.raises(ValueError, match="cannot hold"):
        batch.admit(m.new_cache(2, 3, pad=torch.zeros(2, dtype=torch.long)))
