"""The energy loss (paper §3.3): a strictly proper scoring rule that needs only samples.

Energy score of a model distribution P against an observation y:
    S(P, y) = E ||x' - x''||^alpha - 2 E ||x - y||^alpha,   x, x', x'' ~ P,  alpha in (0, 2).
With N model samples and M targets drawn from the autoencoder posterior of the true chunk, the
unbiased estimate is  mean_{i != j} ||x_i - x_j||^alpha  -  2 mean_{i, m} ||x_i - y_m||^alpha,
and the loss is its negative.
"""

from __future__ import annotations

import torch


def _pairwise(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    # cdist without the matmul shortcut: exact distances, and zero distances get zero gradient.
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
                alpha: float = 1.0, eps: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative energy score averaged over positions. x (N, P, l); mean/log_std (P, l).

    ``mask`` (P,) bool: average only over the positions it marks (e.g. the completion chunks in fine-tuning)."""
    y = posterior_targets(mean.detach(), log_std.detach(), num_targets, eps)
    score = energy_score(x, y, alpha)
    if mask is None:
        return -score.mean()
    w = mask.to(score.dtype)
    return -(score * w).sum() / w.sum().clamp_min(1.0)
