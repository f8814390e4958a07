"""The static decode step (``generate(..., compile=True)``): a static KV cache, the step compiled, on CUDA replayed
as a CUDA graph. The same tokens as eager decoding for the same seed: here without compilation (the static
layout and the step's split of the draws), on GPUs through a CUDA graph. (The compiled step on CPU:
tests/sampling/test_generation.py::test_compiled_decode_step_matches_eager.)"""

import pytest
import torch

from calmlm.config import baseline_preset, calm_preset
from calmlm.models import build_model
from calmlm.sampling.generation import generate, iter_generate

CASES = [("calm", dict(temperature=1.0)), ("calm", dict(temperature=0.5, pool_size=16)),
         ("calm", dict(temperature=0.5, sampler="exact")), ("baseline", dict(temperature=0.8, top_k=20)),
         ("baseline", dict(temperature=0.0))]


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "calm":
        model = build_model(calm_preset("debug"))
        torch.nn.init.normal_(model.head.final_layer.linears[2].weight, std=0.5)
    else:
        model = build_model(baseline_preset("debug"))
    return model.eval()


@pytest.mark.parametrize(("kind", "options"), CASES)
def test_static_step_gives_the_eager_tokens(kind, options, monkeypatch):
    model = _model(kind)
    prompt = torch.randint(3, 512, (3, 9))
    eager = generate(model, prompt, max_new_tokens=20, seed=5, eos_token_id=7, **options)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # the static path alone
    static = generate(model, prompt, max_new_tokens=20, seed=5, eos_token_id=7, compile=True, **options)
    assert torch.equal(static, eager)
    assert len({tuple(r) for r in eager[:, 9:].tolist()}) > 1  # the rows differ: the draws matter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("kind", "options"), CASES)
def test_cuda_graph_step_gives_the_eager_tokens(kind, options):
    model = _model(kind).cuda().double()  # float64: the compiled kernels cannot flip a near-tie
    prompt = torch.randint(3, 512, (3, 9), device="cuda")
    eager = generate(model, prompt, max_new_tokens=20, seed=5, **options)
    graphed = generate(model, prompt, max_new_tokens=20, seed=5, compile=True, **options)
    assert torch.equal(graphed, eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["calm", "baseline"])
def test_cuda_graph_decode_never_synchronises(kind):
    """Once the step is captured (the first decode step), the loop replays it without waiting for the GPU."""
    model = _model(kind).cuda()
    steps = iter_generate(model, torch.randint(3, 512, (4, 8), device="cuda"), max_new_tokens=40, seed=1,
                          eos_token_id=2, stop_check_every=4, compile=True)
    next(steps), next(steps)  # the prompt, then the step's compilation and capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        produced = sum(1 for _ in steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert produced > 0
