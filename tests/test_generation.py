import pytest
import torch

from calmlm.baseline import BaselineLM
from calmlm.calm import CALM
from calmlm.config import baseline_preset, calm_preset
from calmlm.errors import GenerationError
from calmlm.generation import generate


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
