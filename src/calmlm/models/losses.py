"""The energy loss (paper §3.3): a strictly proper scoring rule that needs only samples.

Energy score of a model distribution P against an observation y:
    S(P, y) = E ||x' - x''||^alpha - 2 E ||x - y||^alpha,   x, x', x'' ~ P,  alpha in (0, 2).
With N model samples and M targets drawn from the autoencoder posterior of the true chunk, the
unbiased estimate is  mean_{i != j} ||x_i - x_j||^alpha  -  2 mean_{i, m} ||x_i - y_m||^alpha,
and the loss is its negative.
"""

from __future__ import annotations

from typing import Any

import torch


def _pairwise(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """a (P, N, l), b (P, M, l) -> (P, N, M) distances ||a_i - b_j||^alpha, from the differences (exact: not the
    |a|^2 + |b|^2 - 2 a.b shortcut), and a zero distance gets zero gradient. Eager: cdist's kernel. Under
    torch.compile: the plain formula, which inductor fuses into one reduction (and its backward into another)
    that never stores the (P, N, M, l) differences; cdist would be an opaque call there."""
    if torch.compiler.is_compiling():
        sq = (a[:, :, None] - b[:, None]).square().sum(-1)
        return sq.clamp_min(1e-24).pow(alpha / 2)  # = the eager clamp of d at 1e-12; 0 gradient at d = 0
    d = torch.cdist(a, b, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    return d if alpha == 1.0 else d.clamp_min(1e-12).pow(alpha)


def energy_diversity(x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """x (N, P, l) model samples -> (P,) mean over ordered pairs i != j of ||x_i - x_j||^alpha."""
    n = x.shape[0]
    xp = x.transpose(0, 1).float()  # (P, N, l)
    d = _pairwise(xp, xp, alpha)  # (P, N, N); the diagonal is zero
    return d.sum((1, 2)) / (n * (n - 1))


def energy_fidelity(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, chunk: int = 4096) -> torch.Tensor:
    """x (N, P, l), targets y (M, P, l) -> (P,) mean over (i, m) of ||x_i - y_m||^alpha.

    Positions are processed in chunks so memory stays O(chunk * N * M)."""
    xp, yp = x.transpose(0, 1).float(), y.transpose(0, 1).float()
    out = [_pairwise(xp[s:s + chunk], yp[s:s + chunk], alpha).mean((1, 2)) for s in range(0, xp.shape[0], chunk)]
    return torch.cat(out)


def energy_score(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Per-position unbiased energy score (higher is better): diversity - 2 * fidelity."""
    return energy_diversity(x, alpha) - 2 * energy_fidelity(x, y, alpha)


def posterior_targets(mean: torch.Tensor, log_std: torch.Tensor, num_targets: int,
                      eps: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """M draws y_m = mean + eps_m * exp(log_std) from the autoencoder posterior: (M, P, l)."""
    if eps is None:
        eps = torch.randn((num_targets, *mean.shape), device=mean.device, dtype=torch.float32, generator=generator)
    return mean.float() + eps * log_std.float().exp()


def energy_loss(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, num_targets: int = 100,
                alpha: float = 1.0, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Negative energy score averaged over positions. x (N, P, l); mean/log_std (P, l)."""
    y = posterior_targets(mean.detach(), log_std.detach(), num_targets, eps)
    return -energy_score(x, y, alpha).mean()


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of per-position losses ``values`` (..., P) over the positions ``mask`` (P,) marks (e.g. the
    completion chunks in fine-tuning; every position for None); masked, in at least float32 and 0 if none is
    marked."""
    if mask is None:
        return values.mean()
    w = mask.float().expand_as(values)
    return (values * w).sum() / w.sum().clamp_min(1.0)


# -- cross-entropy through the output projection, without materialising the logits --------------------

class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of CE(h @ w.T, targets) and the number of argmax hits, row-chunk by row-chunk.

    A V-way output layer over every token is most of a small model's training step on a CPU: the (tokens, V)
    logits are written, copied to float32, read by log_softmax, its backward and an argmax. Here each slice of
    rows is multiplied, reduced and turned into its gradient while it is still in cache, and the gradients
    are kept for backward, so the full logits never exist. Matches ``F.cross_entropy`` (tested)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)  # softmax and sums: at least float32
        total = torch.zeros((), device=h.device, dtype=acc)
        correct = torch.zeros((), device=h.device, dtype=torch.long)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, device=w.device, dtype=acc) if need_w else None
        for s in range(0, h.shape[0], rows):
            hc, tc = h[s:s + rows], targets[s:s + rows]
            valid = tc != ignore_index
            tc = tc.clamp_min(0)
            logits = (hc @ w.T).to(acc)  # (r, V)
            target_logit = logits.gather(1, tc[:, None])[:, 0]
            top = logits.amax(-1)
            e = logits.sub_(top[:, None]).exp_()  # one exp pass serves the log-sum-exp and the softmax
            norm = e.sum(-1)
            total += torch.where(valid, top + norm.log() - target_logit, 0.0).sum()
            correct += (valid & (target_logit >= top)).sum()
            if need_h or need_w:
                p = e.mul_((valid / norm)[:, None])  # softmax of the target rows, in place of the logits
                p[torch.arange(p.shape[0], device=p.device), tc] -= valid.to(acc)
                g = p.to(h.dtype)  # d(sum CE)/d(logits)
                if need_h:
                    grad_h[s:s + rows] = g @ w  # type: ignore[index]
                if need_w:
                    grad_w += (g.T @ hc).to(acc)  # type: ignore[operator]
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (need_h, need_w)
        return total, correct, (targets != ignore_index).sum()

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        gh = next(saved) * grad_total.to(ctx.saved_tensors[0].dtype) if ctx.has[0] else None
        gw = next(saved) * grad_total if ctx.has[1] else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, max_logits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (entries equal to ``ignore_index``
    are skipped) and the argmax accuracy, without the (tokens, V) logits tensor. hidden (..., d), weight
    (V, d), targets (...). Under autocast the products run in its dtype (bf16 on CPUs with AMX), the
    softmax always in float32. Returns (loss, accuracy), both 0-d."""
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    h, w = hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype)
    if max_logits is None:  # slice size: cache-sized on CPU, large on GPUs
        max_logits = 2**21 if dev == "cpu" else 2**28
    rows = max(1, max_logits // weight.shape[0])
    with torch.autocast(dev, enabled=False):
        total, correct, count = _LinearCrossEntropy.apply(h, w, targets.reshape(-1), ignore_index, rows)
    count = count.clamp_min(1)
    return total / count, correct.float() / count
