"""linear_cross_entropy: the fused output projection + cross-entropy equals F.cross_entropy on the logits."""

import pytest
import torch
import torch.nn.functional as F

from calmlm.models.losses import linear_cross_entropy


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
