import pytest
import torch

from calmlm.models.baseline import BaselineLM
from calmlm.models.calm import CALM
from calmlm.config import baseline_preset, calm_preset
from calmlm.errors import GenerationError
from calmlm.sampling.generation import generate, sample_logits


def _calm(**over):
    torch.manual_seed(0)
    model = CALM(calm_preset("debug", **over)).eval()
    # The zero-initialised last head layer makes every latent identical; give it scale so samples differ.
    torch.nn.init.normal_(model.head.final_layer.linears[2].weight, std=0.5)
    return model


def _baseline():
    torch.manual_seed(0)
    return BaselineLM(baseline_preset("debug")).eval()


@pytest.mark.parametrize("temperature,sampler", [(1.0, "batch"), (0.5, "batch"), (0.5, "exact")])
def test_calm_kv_cache_matches_full_recomputation(temperature, sampler):
    model = _calm()
    prompt = torch.randint(3, 512, (2, 10))  # not a multiple of K: left-padded
    kw = dict(max_new_tokens=24, temperature=temperature, sampler=sampler, pool_size=16, seed=7)
    cached = generate(model, prompt, use_cache=True, **kw)
    full = generate(model, prompt, use_cache=False, **kw)
    assert cached.shape == (2, 34)
    assert torch.equal(cached[:, :10], prompt)
    assert torch.equal(cached, full)


def test_baseline_kv_cache_matches_full_recomputation():
    model = _baseline()
    prompt = torch.randint(3, 512, (3, 7))
    cached = generate(model, prompt, max_new_tokens=20, temperature=0.8, top_k=50, seed=3)
    full = generate(model, prompt, max_new_tokens=20, temperature=0.8, top_k=50, seed=3, use_cache=False)
    assert torch.equal(cached, full)
    greedy = generate(model, prompt, max_new_tokens=5, temperature=0)
    assert torch.equal(greedy, generate(model, prompt, max_new_tokens=5, temperature=0, use_cache=False))


def test_num_samples_and_seed_reproducible():
    model = _calm()
    a = generate(model, [5, 6, 7, 8], max_new_tokens=8, num_samples=4, seed=1)
    b = generate(model, [5, 6, 7, 8], max_new_tokens=8, num_samples=4, seed=1)
    assert a.shape == (4, 12) and torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) > 1  # independent samples differ


def test_eos_stops_and_pads():
    model = _baseline()
    prompt = torch.randint(3, 512, (2, 4))
    free = generate(model, prompt, max_new_tokens=6, temperature=0)
    eos = int(free[0, 5])  # make the 2nd generated token of row 0 the EOS
    out = generate(model, prompt, max_new_tokens=6, temperature=0, eos_token_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0].item()
    assert (out[0, 4 + first:] == eos).all()


def test_calm_eos_inside_chunk_pads_rest():
    model = _calm()
    out = generate(model, [9, 9, 9, 9], max_new_tokens=8, seed=0)
    eos = int(out[0, 5])
    out2 = generate(model, [9, 9, 9, 9], max_new_tokens=8, seed=0, eos_token_id=eos)
    first = int((out2[0, 4:] == eos).nonzero()[0])
    assert (out2[0, 4 + first:] == eos).all()


def test_errors():
    calm, base = _calm(), _baseline()
    with pytest.raises(GenerationError, match="temperature must be in"):
        generate(calm, [1, 2, 3, 4], temperature=1.5)
    with pytest.raises(GenerationError, match="temperature"):
        generate(calm, [1, 2, 3, 4], temperature=0)
    with pytest.raises(GenerationError, match="longer than the model's context"):
        generate(calm, list(range(3, 3 + 4 * 257)), max_new_tokens=4)
    with pytest.raises(GenerationError, match="at most"):
        generate(base, [1] * 250, max_new_tokens=10)
    with pytest.raises(GenerationError, match="sampler"):
        generate(calm, [1, 2, 3, 4], temperature=0.5, sampler="magic")
    with pytest.raises(GenerationError, match="temperature must be >= 0"):
        generate(base, [1, 2], temperature=-1)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (0.7, 3)])
def test_sample_logits_follows_tempered_top_k_softmax(temperature, top_k):
    """The exponential race draws exactly from softmax(logits / T) restricted to the top k."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 60_000
    ids = sample_logits(logits.expand(n, -1), temperature, top_k, torch.Generator().manual_seed(5))
    p = torch.softmax(logits / temperature, -1)
    if top_k is not None:
        p[top_k:] = 0
        p /= p.sum()
    freq = torch.bincount(ids, minlength=6).double() / n
    sd = (p.double() * (1 - p.double()) / n).sqrt()
    assert torch.all((freq - p.double()).abs() <= 5 * sd + 1e-12), (freq, p)
    wrong = torch.softmax(logits, -1)  # the same bound catches sampling at the wrong temperature
    assert temperature == 1.0 or torch.any((freq - wrong.double()).abs() > 5 * sd)


def test_compiled_decode_step_matches_eager():
    """compile=True (the static KV cache and the compiled decode step) runs the same computation: identical
    tokens for CALM (T=1 and T<1) and the baseline."""
    calm, base = _calm(), _baseline()
    prompt = torch.randint(3, 512, (2, 8))
    for model, kw in [(calm, dict(temperature=1.0)), (calm, dict(temperature=0.5, pool_size=16)),
                      (base, dict(temperature=0.8, top_k=20))]:
        eager = generate(model, prompt, max_new_tokens=12, seed=4, **kw)
        compiled = generate(model, prompt, max_new_tokens=12, seed=4, compile=True, **kw)
        assert torch.equal(eager, compiled)
    # A later call (new generator, new seed) reuses the compiled code instead of compiling again.
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # the counter does see compilations
    generate(calm, prompt, max_new_tokens=12, seed=9, compile=True)
    generate(base, prompt, max_new_tokens=12, seed=9, temperature=0.8, top_k=20, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_decode_loop_never_synchronises_on_gpu(temperature):
    """After the prompt, no step of the decode loop (backbone, head, decoder, batch temperature sampling,
    EOS handling) waits for the GPU: torch's sync debug mode turns any synchronisation into an error."""
    from calmlm.sampling.generation import iter_generate

    for model, kw in [(_calm().cuda(), dict(pool_size=64)), (_baseline().cuda(), {})]:
        prompt = torch.randint(3, 512, (4, 8), device="cuda")
        steps = iter_generate(model, prompt, max_new_tokens=40, temperature=temperature, seed=1,
                              eos_token_id=2, stop_check_every=4, **kw)
        next(steps)  # prompt processing may synchronise
        torch.cuda.set_sync_debug_mode("error")
        try:
            produced = sum(1 for _ in steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert produced > 0
