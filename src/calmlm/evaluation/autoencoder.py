"""Autoencoder robustness evaluation (paper §2): reconstruction accuracy when noise is added to z.

CALM's language model never predicts a latent exactly, so the autoencoder must decode correctly from a
neighbourhood of the posterior mean. We report token accuracy and whole-chunk accuracy with Gaussian noise
of standard deviation sigma added to the mean, and how many latent dimensions are active (mean KL above the
clipping floor: a dimension at the floor carries no information).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..models.autoencoder import Autoencoder, kl_per_dim
from ..data.corpus import Blocks, iter_blocks, token_blocks
from .mode import eval_mode

DEFAULT_SIGMAS = (0.0, 0.1, 0.2, 0.3, 0.5)


@torch.no_grad()
def evaluate_autoencoder(model: Autoencoder, blocks: Blocks, sigmas: Sequence[float] = DEFAULT_SIGMAS,
                         batch_size: int = 16, max_blocks: int | None = None, seed: int = 0) -> dict[str, Any]:
    """``blocks``: a dataset of token blocks such as TokenDataset, or a token tensor (B, L).

    Returns {"sigmas": [...], "token_accuracy": {sigma: acc}, "chunk_accuracy": {...}, "active_dims", ...}."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    k = model.config.chunk_size
    correct = {s: 0 for s in sigmas}
    chunk_correct = {s: 0 for s in sigmas}
    tokens = chunks = 0
    kl_sum = torch.zeros(model.config.latent_size, device=device, dtype=torch.float64)
    with eval_mode(model):
        for batch in iter_blocks(token_blocks(blocks)[0], batch_size, max_blocks=max_blocks):
            ids = batch[:, : batch.shape[1] // k * k].to(device)
            mean, log_std = (t.float() for t in model.encode(ids))
            kl_sum += kl_per_dim(mean, log_std).sum((0, 1)).double()
            target = ids.view(ids.shape[0], -1, k)  # (B, chunks, K)
            for s in sigmas:
                z = mean + s * torch.randn(mean.shape, device=device, generator=gen) if s else mean
                hit = model.decode(z.to(model.decoder.expand_layer.weight.dtype)).argmax(-1).view_as(target) == target
                correct[s] += int(hit.sum())
                chunk_correct[s] += int(hit.all(-1).sum())
            tokens += target.numel()
            chunks += target.numel() // k
    if tokens == 0:
        raise ValueError("no evaluation data: the validation set has no complete block")
    kl_mean = kl_sum / chunks
    return {
        "sigmas": list(sigmas),
        "token_accuracy": {str(s): correct[s] / tokens for s in sigmas},
        "chunk_accuracy": {str(s): chunk_correct[s] / chunks for s in sigmas},
        "active_dims": int((kl_mean > model.config.kl_clamp).sum()),
        "latent_size": model.config.latent_size,
        "mean_kl_per_dim": float(kl_mean.mean()),
        "num_tokens": tokens,
        "num_chunks": chunks,
    }


def format_autoencoder_report(r: dict[str, Any]) -> str:
    lines = [f"{'sigma':>6}  {'token acc':>10}  {'chunk acc':>10}"]
    for s in r["sigmas"]:
        token, chunk = 100 * r["token_accuracy"][str(s)], 100 * r["chunk_accuracy"][str(s)]
        lines.append(f"{s:>6.2f}  {token:>9.3f}%  {chunk:>9.3f}%")
    lines.append(f"active latent dims: {r['active_dims']}/{r['latent_size']} (KL above the floor); "
                 f"evaluated {r['num_tokens']} tokens")
    return "\n".join(lines)
