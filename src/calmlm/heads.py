"""Generative heads: a hidden state (+ randomness) -> the next latent vector in ONE step.

The energy head (paper §3.2) is an MLP fed by the backbone's hidden state and uniform noise; trained
with the energy score it needs no likelihood, so one forward pass draws one sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CALMConfig


class ResidualBlock(nn.Module):
    """x + down_proj(SiLU(g) * u), where [g, u] = MLP(concat(LayerNorm(x), c))."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(d, eps=eps)
        self.linears = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2 * d))
        self.down_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c = c.expand(*x.shape[:-1], c.shape[-1])
        gate, up = self.linears(torch.cat([self.in_ln(x), c], dim=-1)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class FinalLayer(nn.Module):
    def __init__(self, d: int, latent_size: int, eps: float) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(d, eps=eps)
        self.linears = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, latent_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linears(self.in_ln(x))


class EnergyHead(nn.Module):
    """Hidden state + noise u ~ U[-0.5, 0.5)^noise_size -> latent z in R^l."""

    def __init__(self, cfg: CALMConfig) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.noise_size = cfg.noise_size
        self.noise_embd = nn.Linear(cfg.noise_size, d)
        self.hidden_embd = nn.Linear(d, d)
        self.norm_noise = nn.LayerNorm(d, eps=eps)
        self.norm_hidden = nn.LayerNorm(d, eps=eps)
        self.mlp_blocks = nn.ModuleList(ResidualBlock(d, eps) for _ in range(cfg.num_head_blocks))
        self.final_layer = FinalLayer(d, cfg.latent_size, eps)

    def zero_init_output(self) -> None:
        """The last layer starts at zero (as in the reference) so early samples do not explode."""
        nn.init.zeros_(self.final_layer.linears[2].weight)
        nn.init.zeros_(self.final_layer.linears[2].bias)

    def noise(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype = torch.float32,
              generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(*shape, self.noise_size, device=device, dtype=dtype, generator=generator) - 0.5

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) and noise (S, ..., noise_size) or (..., noise_size) -> latents of noise's leading shape.

        The hidden path is computed once and broadcast across the S samples."""
        c = self.norm_hidden(self.hidden_embd(hidden))
        x = self.norm_noise(self.noise_embd(noise.to(c.dtype)))
        for block in self.mlp_blocks:
            x = block(x, c)
        return self.final_layer(x)

    def sample(self, hidden: torch.Tensor, num_samples: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents: (..., l) for num_samples=None, else (num_samples, ..., l)."""
        lead = tuple(hidden.shape[:-1]) if num_samples is None else (num_samples, *hidden.shape[:-1])
        return self(hidden, self.noise(lead, hidden.device, hidden.dtype, generator))


HEADS = {"energy": EnergyHead}
