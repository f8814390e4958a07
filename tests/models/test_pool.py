import torch

from calmlm.config import autoencoder_preset, calm_preset
from calmlm.models.autoencoder import Autoencoder
from calmlm.models.calm import CALM
from calmlm.models.pool import DrawPool
from calmlm.sampling import temperature as sampling


def _ae() -> Autoencoder:
    torch.manual_seed(0)
    return Autoencoder(autoencoder_preset("debug")).eval()


def _latent_pools(g: torch.Generator) -> torch.Tensor:
    """(5, 120, l) pools mixing exact repeats, near repeats (same chunk or shared prefixes) and unrelated draws."""
    centres = torch.randn(6, 16, generator=g) * 3
    z = centres[torch.randint(0, 6, (5, 120), generator=g)] + 0.3 * torch.randn(5, 120, 16, generator=g)
    z[:, 100:] = torch.randn(5, 20, 16, generator=g) * 3
    z[0] = z[0, :1]  # one pool of identical draws
    return z


def test_keys_have_the_equality_pattern_of_the_decoded_chunks():
    """keys() decodes only what telling draws apart needs; the equality pattern within each pool (hence every
    count the temperature sampler uses) is exactly that of full decoding."""
    ae = _ae()
    z = _latent_pools(torch.Generator().manual_seed(3))
    full = ae.decode_tokens(z)
    keys = DrawPool(ae.decoder, z).keys(torch.arange(5))
    same = (full[:, :, None] == full[:, None, :]).all(-1)
    assert torch.equal((keys[:, :, None] == keys[:, None, :]).all(-1), same)
    decoded = keys >= 0
    assert torch.equal(keys[decoded], full[decoded])  # decoded slots are the real tokens...
    assert decoded[:, :, 0].all() and not decoded.all()  # ...the first always, not all of them
    assert same.sum() > 5 * 120 + 100  # the pools do contain repeats
    for t in (0.5, 1 / 3, 0.7):
        assert torch.allclose(sampling._selection_probs(keys, t), sampling._selection_probs(full, t))
    sub = DrawPool(ae.decoder, z).keys(torch.tensor([3, 1]))  # some positions only
    assert torch.equal((sub[:, :, None] == sub[:, None, :]).all(-1), same[[3, 1]])


def test_same_and_chunks_agree_with_full_decoding_and_decode_each_token_once(monkeypatch):
    """Slot 0 of every draw is decoded up front; same() decodes later slots only for the compared draws whose
    prefixes match, chunks() what is missing of the chosen ones, keys() reuses all of it; no token twice."""
    ae = _ae()
    z = _latent_pools(torch.Generator().manual_seed(4))
    full = ae.decode_tokens(z).view(600, 4)
    decoded: list[int] = []
    slot_tokens = ae.decoder.slot_tokens
    monkeypatch.setattr(ae.decoder, "slot_tokens", lambda x: decoded.append(x.shape[0]) or slot_tokens(x))
    pool = DrawPool(ae.decoder, z, max_logits=512 * 7)  # logits for 7 rows at a time
    assert sum(decoded) == 600 and max(decoded) == 7
    g = torch.Generator().manual_seed(5)
    position = torch.randint(0, 5, (300,), generator=g)
    a = position * 120 + torch.randint(0, 120, (300,), generator=g)
    b = position * 120 + torch.randint(0, 120, (300,), generator=g)
    b[:50] = a[:50]  # an entry is the same as itself
    assert torch.equal(pool.same(a, b), (full[a] == full[b]).all(-1))
    known = pool._tokens >= 0
    later = known[:, 1:].any(1).nonzero().squeeze(1)
    assert 0 < later.numel() and set(later.tolist()) <= set(torch.cat([a, b]).tolist())
    chosen = torch.tensor([0, 119, 599, 300])
    assert torch.equal(pool.chunks(chosen), full[chosen])
    keys = pool.keys(torch.arange(5))
    assert torch.equal((keys[:, :, None] == keys[:, None, :]).all(-1),
                       (full.view(5, 120, 1, 4) == full.view(5, 1, 120, 4)).all(-1))
    assert sum(decoded) == int((pool._tokens >= 0).sum()) < 2400  # every token decoded once, not all of them


def test_calm_draw_pool_holds_the_heads_draws():
    """The pool's draws are sample_latents' draws for the same generator state."""
    torch.manual_seed(0)
    model = CALM(calm_preset("debug")).eval()
    torch.nn.init.normal_(model.head.final_layer.linears[2].weight, std=0.5)
    hidden = torch.randn(3, model.config.hidden_size)
    z = model.sample_latents(hidden, 40, torch.Generator().manual_seed(6)).transpose(0, 1)  # (3, 40, l)
    pool = model.draw_pool(hidden, 40, torch.Generator().manual_seed(6))
    assert (pool.num_positions, pool.pool_size) == (3, 40)
    entries = torch.tensor([0, 39, 40, 119, 77])
    assert torch.equal(pool.chunks(entries), model.decode_latents(z.reshape(120, -1)[entries]))
