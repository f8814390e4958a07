"""Small building blocks shared by the autoencoder and the backbone, and what every model returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelOutput:
    """What every model's ``forward`` returns to the training engine."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): computed in float32, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel; the normalisation runs in float32 as in the reference, whatever the input dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ResidualMLP(nn.Module):
    """x + MLP(RMSNorm(x)): the per-token layer of the autoencoder (no attention anywhere in it)."""

    def __init__(self, dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.layernorm(x))


def init_linear_and_embedding(module: nn.Module, std: float) -> None:
    """Llama initialisation: N(0, std) weights, zero biases; norms keep their ones."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
