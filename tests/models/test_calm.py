import pytest
import torch

from calmlm.models.autoencoder import Autoencoder
from calmlm.models.calm import CALM
from calmlm.config import AutoencoderConfig, CALMConfig, autoencoder_preset, calm_preset
from calmlm.errors import ConfigError
from calmlm.models.losses import energy_loss, energy_score, masked_mean


def slow_energy_score(x, y, alpha):
    """Direct double loops over samples and targets, one position at a time."""
    n, p, _ = x.shape
    m = y.shape[0]
    out = []
    for j in range(p):
        div = sum(torch.linalg.vector_norm(x[a, j] - x[b, j]) ** alpha for a in range(n) for b in range(n) if a != b)
        fid = sum(torch.linalg.vector_norm(x[a, j] - y[c, j]) ** alpha for a in range(n) for c in range(m))
        out.append(div / (n * (n - 1)) - 2 * fid / (n * m))
    return torch.stack(out)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 1.7])
def test_energy_score_matches_slow_computation(alpha):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, 7, generator=g), torch.randn(11, 3, 7, generator=g)
    assert torch.allclose(energy_score(x, y, alpha), slow_energy_score(x, y, alpha), atol=1e-5)


def test_energy_loss_uses_posterior_targets():
    g = torch.Generator().manual_seed(1)
    x, mean, log_std = torch.randn(4, 6, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    eps = torch.randn(9, 6, 5, generator=g)
    y = mean + eps * log_std.exp()
    assert energy_loss(x, mean, log_std, 9, 1.0, eps).item() == pytest.approx(-slow_energy_score(x, y, 1.0).mean().item(), abs=1e-5)


def test_masked_mean_averages_the_marked_positions():
    values = torch.arange(12.0).view(3, 4)  # (M, P): the mask (P,) picks whole columns
    mask = torch.tensor([True, False, False, True])
    assert masked_mean(values, mask).item() == pytest.approx(values[:, [0, 3]].mean().item())
    assert masked_mean(values, None) == values.mean() == masked_mean(values, torch.ones(4, dtype=torch.bool))
    assert masked_mean(values.bfloat16(), mask).dtype == torch.float32
    assert masked_mean(values, torch.zeros(4, dtype=torch.bool)).item() == 0.0  # nothing marked: no NaN


def test_energy_score_is_proper_on_gaussians():
    # The expected score is maximised by the true distribution: samples from it beat shifted/narrow ones.
    g = torch.Generator().manual_seed(2)
    y = torch.randn(4000, 1, 3, generator=g)
    good = torch.randn(64, 1, 3, generator=g)
    assert energy_score(good, y) > energy_score(good + 0.5, y)
    assert energy_score(good, y) > energy_score(0.3 * good, y)


def _debug(k=4):
    ae = autoencoder_preset("debug", chunk_size=k)
    return CALM(calm_preset("debug", autoencoder=ae, chunk_size=k))


def test_gradient_reaches_backbone_and_head_but_not_autoencoder():
    torch.manual_seed(0)
    model = _debug()
    before = {n: p.clone() for n, p in model.autoencoder.named_parameters()}
    # The head's last layer starts at zero, which blocks gradient upstream on the very first step only.
    torch.nn.init.normal_(model.head.final_layer.linears[2].weight, std=0.1)
    model.train()
    assert not model.autoencoder.training  # frozen: stays in eval mode
    model(torch.randint(0, 512, (2, 32))).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("autoencoder."):
            assert not p.requires_grad and p.grad is None
        else:
            assert p.grad is not None, name
    assert model.backbone.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.head.final_layer.linears[2].weight.grad.abs().sum() > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.autoencoder.named_parameters())


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_any_k_trains_a_few_steps(k):
    torch.manual_seed(0)
    model = _debug(k)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = torch.randint(0, 512, (4, 8 * k))
    losses = []
    for _ in range(6):
        loss = model(ids).loss
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert model.sample_chunks(model.hidden_states(ids)[:, -1]).shape == (4, k)


def test_k_and_latent_mismatch_errors():
    with pytest.raises(ConfigError, match="chunk size K: model 2, autoencoder 4"):
        CALMConfig(chunk_size=2, latent_size=128, autoencoder=AutoencoderConfig())
    with pytest.raises(ConfigError, match="latent size"):
        CALMConfig(latent_size=64, autoencoder=AutoencoderConfig())
    with pytest.raises(ConfigError, match="does not match its autoencoder"):
        CALM(calm_preset("debug"), autoencoder=Autoencoder(autoencoder_preset("debug", chunk_size=2)))
    with pytest.raises(ConfigError, match="multiple of K=4"):
        _debug().hidden_states(torch.zeros(1, 6, dtype=torch.long))


def test_head_noise_is_explicit_and_reproducible():
    model = _debug().eval()
    torch.nn.init.normal_(model.head.final_layer.linears[2].weight)
    h = torch.randn(3, 64)
    noise = torch.rand(5, 3, 16) - 0.5
    assert torch.equal(model.head(h, noise), model.head(h, noise))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(model.sample_latents(h, 5, g1), model.sample_latents(h, 5, g2))
    assert model.sample_latents(h, 5).shape == (5, 3, 16)
