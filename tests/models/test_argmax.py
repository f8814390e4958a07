import pytest
import torch

from calmlm.config import autoencoder_preset
from calmlm.models import argmax as argmax_module
from calmlm.models.argmax import ArgmaxScreen, fast_argmax
from calmlm.models.autoencoder import Autoencoder


def exact_argmax(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x.double() @ weight.double().t()).argmax(-1)


@pytest.mark.parametrize("vocab,dim", [(4096, 64), (1000, 48), (8100, 32)])
def test_screen_is_the_exact_argmax(vocab: int, dim: int, monkeypatch) -> None:
    """Random (Gaussian, many near-maximal logits) and peaked rows, a vocabulary that is not a whole number of
    blocks (winners in the padded tail block included), rows of very different scales."""
    g = torch.Generator().manual_seed(vocab)
    weight = torch.randn(vocab, dim, generator=g) * 0.02
    weight[::7] *= 30  # row norms differing by 30x
    x = torch.randn(600, dim, generator=g) * torch.logspace(-3, 3, 600)[:, None]
    x[:100, 0] = 50.0  # an outlier coordinate: a coarse int8 scale for these rows
    x[100:150] = weight[-5:].repeat(10, 1) * 40  # peaked: the winner is in the last block
    got = ArgmaxScreen(weight)(x)
    assert torch.equal(got, exact_argmax(x, weight))
    assert torch.equal(got, fast_argmax(x @ weight.t()))
    # with the error bound switched off, the int8 maximum alone is wrong on some rows: the bound matters
    monkeypatch.setattr(argmax_module, "_SAFETY", 0.0)
    wrong = ArgmaxScreen(weight)(x) != got
    assert 0 < int(wrong.sum()) < 300


def test_screen_resolves_near_ties_and_exact_ties() -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(512, 16, generator=g)
    weight[40] = weight[7]  # identical rows tie exactly: the lower index wins, as argmax resolves ties
    x = torch.randn(300, 16, generator=g)
    x[:100] = weight[7] * 4
    direction = torch.randn(16, generator=g)
    weight[300] = weight[200] + 1e-6 * direction  # rows whose logits differ by ~1e-6: only float64 separates them
    x[100:200] = weight[200] * 5
    got = ArgmaxScreen(weight)(x)
    assert torch.equal(got, exact_argmax(x, weight))
    assert bool((got[:100] == 7).all())


def test_flat_rows_fall_back_to_float32_and_zero_rows_give_token_zero() -> None:
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(2048, 32, generator=g) * 1e-3
    weight[:, 0] = 1.0  # every logit ~ x[0]: the screen cannot narrow such rows down
    x = torch.randn(20, 32, generator=g)
    x[:5] = 0.0
    x[5:10, 1:] = 0.0
    got = ArgmaxScreen(weight)(x)
    assert torch.equal(got, exact_argmax(x, weight))
    assert bool((got[:5] == 0).all())


def test_screen_is_cached_per_weight_version() -> None:
    weight = torch.randn(256, 8)
    screen = ArgmaxScreen.for_weight(weight)
    assert ArgmaxScreen.for_weight(weight) is screen
    with torch.no_grad():
        weight[3] += 100.0  # an in-place update (a training step) makes a new screen
    rebuilt = ArgmaxScreen.for_weight(weight)
    assert rebuilt is not screen
    x = torch.randn(50, 8)
    x[:, :] = weight[3] * 0.1
    assert torch.equal(rebuilt(x), exact_argmax(x, weight))


def test_decoder_slot_tokens_are_the_logits_argmax() -> None:
    torch.manual_seed(0)
    ae = Autoencoder(autoencoder_preset("debug")).eval()
    x = torch.randn(500, ae.config.hidden_size) * 3
    with torch.no_grad():
        expected = ae.decoder.slot_logits(x).argmax(-1)
        assert torch.equal(ae.decoder.slot_tokens(x), expected)
        x[0, 0] = float("nan")  # not screened: the float32 path, whatever argmax makes of a NaN row
        assert torch.equal(ae.decoder.slot_tokens(x)[1:], expected[1:])
        bf16 = ae.to(torch.bfloat16).decoder
        assert torch.equal(bf16.slot_tokens(x[1:].bfloat16()), fast_argmax(bf16.slot_logits(x[1:].bfloat16())))


def test_screen_single_rows_and_odd_sizes() -> None:
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(777, 13, generator=g)
    x = torch.randn(5, 13, generator=g)
    screen = ArgmaxScreen(weight)
    assert torch.equal(torch.cat([screen(x[i:i + 1]) for i in range(5)]), exact_argmax(x, weight))
