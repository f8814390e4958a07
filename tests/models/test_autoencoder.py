
import pytest
import torch

from calmlm.models.autoencoder import Autoencoder, fast_argmax, kl_per_dim
from calmlm.config import AutoencoderConfig, autoencoder_preset
from calmlm.errors import ConfigError
from calmlm.evaluation.autoencoder import evaluate_autoencoder


def _ae(**over):
    torch.manual_seed(0)
    return Autoencoder(autoencoder_preset("debug", **over))


def test_shapes_and_tied_embedding():
    ae = _ae()
    ids = torch.randint(0, 512, (3, 16))
    mean, log_std = ae.encode(ids)
    assert mean.shape == log_std.shape == (3, 4, 16)
    assert ae.decode(mean).shape == (3, 16, 512)
    assert ae.decode_tokens(mean[0, 0]).shape == (4,)
    names = [n for n, _ in ae.named_parameters()]
    assert "encoder.embed_tokens.weight" in names and not any("lm_head" in n for n in names)


def test_kl_per_dim_matches_closed_form_and_monte_carlo():
    mean, log_std = torch.tensor([0.3, -1.0, 0.0]), torch.tensor([-0.5, 0.2, 0.0])
    kl = kl_per_dim(mean, log_std)
    assert kl[2].item() == pytest.approx(0.0, abs=1e-7)  # N(0,1) vs N(0,1)
    std = log_std.exp()
    x = mean + std * torch.randn(400_000, 3, generator=torch.Generator().manual_seed(0))
    logq = -0.5 * ((x - mean) / std) ** 2 - log_std
    logp = -0.5 * x**2
    mc = (logq - logp).mean(0)
    assert torch.allclose(kl, mc, atol=0.01)


def test_loss_arithmetic_with_clipping():
    ae = _ae(token_dropout=0.0, latent_dropout=0.0).eval()
    ids = torch.randint(0, 512, (2, 8))
    torch.manual_seed(1)
    out = ae(ids)
    cfg = ae.config
    torch.manual_seed(1)  # the same z draw
    mean, log_std = ae.encode(ids)
    z = mean + torch.randn_like(mean) * log_std.exp()
    ce = torch.nn.functional.cross_entropy(ae.decode(z).flatten(0, 1), ids.flatten())
    kl = kl_per_dim(mean, log_std)
    clipped = torch.maximum(kl, torch.full_like(kl, cfg.kl_clamp)).sum(-1).mean()
    expected = cfg.chunk_size * ce + cfg.kl_weight * clipped
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # At initialisation the posterior is near N(0,1): every dimension is clipped to the floor.
    assert clipped.item() >= cfg.latent_size * cfg.kl_clamp - 1e-6


def test_dropout_only_in_training():
    ae = _ae(token_dropout=0.5, latent_dropout=0.5)
    ids = torch.randint(1, 512, (4, 32))
    seen = []
    orig = ae.encoder.forward
    ae.encoder.forward = lambda x: (seen.append(x.clone()), orig(x))[1]
    ae.train()
    ae(ids)
    masked = (seen[-1] == ae.config.mask_token_id).float().mean().item()
    assert 0.35 < masked < 0.65
    ae.eval()
    ae(ids)
    assert torch.equal(seen[-1], ids)
    # latent dropout: in eval the decoder input equals the sampled z (no zeros injected)
    ae.eval()
    z = torch.randn(2, 3, 16)
    assert torch.equal(ae.decode(z), ae.decode(z))


def test_latent_dropout_applies_in_training():
    ae = _ae(token_dropout=0.0, latent_dropout=0.5)
    captured = []
    orig = ae.decoder.expand  # the decoder's first step: sees z
    ae.decoder.expand = lambda z: (captured.append(z.clone()), orig(z))[1]
    ids = torch.randint(1, 512, (8, 32))
    ae.train(); ae(ids)
    assert 0.35 < (captured[-1] == 0).float().mean().item() < 0.65
    ae.eval(); ae(ids)
    assert (captured[-1] == 0).float().mean().item() == 0.0


def test_bad_length_and_config_errors():
    ae = _ae()
    with pytest.raises(ConfigError, match="multiple of K=4"):
        ae.encode(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ConfigError, match="even"):
        AutoencoderConfig(num_encoder_layers=3)
    with pytest.raises(ConfigError, match="token_dropout"):
        AutoencoderConfig(token_dropout=1.0)


def test_a_few_steps_learn_to_reconstruct():
    torch.manual_seed(0)
    ae = Autoencoder(autoencoder_preset("debug", vocab_size=64, token_dropout=0.0, latent_dropout=0.0))
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    data = torch.randint(0, 64, (64, 16))
    for _ in range(150):
        loss = ae(data).loss
        opt.zero_grad(); loss.backward(); opt.step()
    r = evaluate_autoencoder(ae, data, sigmas=(0.0, 0.3), batch_size=32)
    assert r["token_accuracy"]["0.0"] > 0.9
    assert r["num_tokens"] == 64 * 16 and r["num_chunks"] == 64 * 4
    assert 0 < r["active_dims"] <= 16
    assert r["token_accuracy"]["0.3"] <= r["token_accuracy"]["0.0"] + 1e-9


@pytest.mark.parametrize("vocab", [8192, 8100, 300, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_argmax_is_argmax_including_ties(vocab, dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(300, vocab, generator=g).to(dtype)
    logits[:100] = (logits[:100] * 2).round()  # many exact ties: the lowest index must win, as in argmax
    logits[100:110] = 0.0
    logits[110:120, -3:] = 50.0  # the winner in a ragged tail block
    assert torch.equal(fast_argmax(logits), logits.argmax(-1))


def test_chunked_decode_tokens_equal_full_argmax():
    ae = _ae().eval()
    z = torch.randn(7, 5, 16)
    with torch.no_grad():
        full = ae.decode(z).argmax(-1).view(7, 5, 4)  # (7, 5*K, V) -> (7, 5, K)
    assert torch.equal(ae.decode_tokens(z), full)
    assert torch.equal(ae.decode_tokens(z, max_logits=4 * 512 * 3), full)  # slices of 3 latents
    assert torch.equal(ae.decode_tokens(z, max_logits=1), full)  # one latent at a time


def test_trunk_and_single_slots_give_the_expansion():
    """Decoder.expand = the trunk, then all K slots' vectors; expand_slot computes one slot's alone."""
    ae = _ae().eval()
    z = torch.randn(6, 16)
    with torch.no_grad():
        slots = ae.decoder.expand(z)  # (6, K, d)
        x = ae.decoder.trunk(z)
        for j in range(4):
            assert torch.allclose(ae.decoder.expand_slot(x, j), slots[:, j], atol=1e-6)
