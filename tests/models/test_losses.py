"""linear_cross_entropy: the fused output projection + cross-entropy equals F.cross_entropy on the logits. The
energy score's distances: the formula torch.compile sees gives cdist's numbers, compiled or not."""

import pytest
import torch
import torch.nn.functional as F

from calmlm.models import losses
from calmlm.models.losses import energy_score, linear_cross_entropy


def _case(n: int = 300, d: int = 24, v: int = 97, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g, dtype=torch.float64)).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


@pytest.mark.parametrize("rows", [1, 7, 300, 1000])  # slices of 1 row, ragged slices, one slice, more than all rows
def test_matches_cross_entropy_loss_grads_and_accuracy(rows):
    h, w, t = _case()
    t[::5] = -100  # ignored positions
    loss, acc = linear_cross_entropy(h, w, t, max_logits=rows * w.shape[0])
    gh, gw = torch.autograd.grad(loss, (h, w))
    logits = h @ w.T
    ref = F.cross_entropy(logits, t, ignore_index=-100)
    rgh, rgw = torch.autograd.grad(ref, (h, w))
    keep = t != -100
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, rgh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rgw, rtol=1e-10, atol=1e-12)
    assert acc.item() == pytest.approx((logits.argmax(-1)[keep] == t[keep]).double().mean().item(), rel=1e-6)


def test_shapes_no_grad_and_scaled_backward():
    h, w, t = _case(n=40)
    with torch.no_grad():  # evaluation: no gradients computed or kept
        loss, _ = linear_cross_entropy(h.view(4, 10, -1), w, t.view(4, 10))
    assert loss.requires_grad is False
    loss, _ = linear_cross_entropy(h, w, t)
    (3.0 * loss).backward()  # the saved gradients are scaled by the incoming one
    ref_h = h.detach().clone().requires_grad_()
    (3.0 * F.cross_entropy(ref_h @ w.detach().T, t)).backward()
    torch.testing.assert_close(h.grad, ref_h.grad)


def test_bf16_autocast_products_stay_close():
    h, w, t = _case(n=256, d=64, v=512)
    h, w = h.float().detach().requires_grad_(), w.float().detach().requires_grad_()
    ref = F.cross_entropy(h @ w.T, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, t)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def _samples(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Model samples x (N=4, P=6, l=8) with x_0 == x_1 at every position (a zero distance), targets y (M=5, P, l)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 8, generator=g)
    x[1] = x[0]
    return x, torch.randn(5, 6, 8, generator=g)


def _score_and_grad(x: torch.Tensor, y: torch.Tensor, alpha: float, fn=energy_score):
    x = x.clone().requires_grad_()
    score = fn(x, y, alpha)
    return score.detach(), torch.autograd.grad(score.sum(), x)[0]


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_distance_formula_for_compilation_matches_cdist(monkeypatch, alpha):
    """The branch torch.compile traces (run eagerly here) gives cdist's scores and gradients, and a zero
    distance (x_0 == x_1) a zero gradient rather than NaN."""
    x, y = _samples()
    ref_score, ref_grad = _score_and_grad(x, y, alpha)
    monkeypatch.setattr(losses.torch.compiler, "is_compiling", lambda: True)
    score, grad = _score_and_grad(x, y, alpha)
    torch.testing.assert_close(score, ref_score, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad).all()


def test_energy_score_compiled_by_inductor_matches_eager():
    """torch.compile (inductor, CPU) of the energy score: eager's numbers within float32 rounding."""
    x, y = _samples(1)
    ref_score, ref_grad = _score_and_grad(x, y, 1.0)
    score, grad = _score_and_grad(x, y, 1.0, torch.compile(energy_score))
    torch.testing.assert_close(score, ref_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_energy_score_compiled_on_cuda_matches_eager_cdist():
    """On a GPU at a training-sized shape (N=8, P=512, M=100, l=128): compiled = eager within float32 rounding."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 512, 128, device="cuda", generator=g)
    y = torch.randn(100, 512, 128, device="cuda", generator=g)
    ref_score, ref_grad = _score_and_grad(x, y, 1.0)
    score, grad = _score_and_grad(x, y, 1.0, torch.compile(energy_score))
    torch.testing.assert_close(score, ref_score, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
