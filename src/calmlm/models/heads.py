"""Generative heads: a hidden state (+ randomness) -> the next latent vector.

The energy head (paper §3.2) is an MLP fed by the backbone's hidden state and uniform noise; trained
with the energy score it needs no likelihood, so one forward pass draws one sample. The paper compares it
with two iterative heads, both as in the reference implementation: flow matching (an ODE integrated in
``flow_steps`` network calls) and diffusion (a 100-step ancestral chain). Those two share one network, an
MLP with adaptive-LayerNorm conditioning on the hidden state and the time (:class:`AdaLNMLP`).

Every head has the same interface:
  * ``head.noise(lead, device, dtype, generator)`` draws the randomness of ``len(lead)``-shaped samples;
  * ``head(hidden, noise) -> latents`` is deterministic given that noise (reproducible, testable);
  * ``head.sample(hidden, num_samples, generator)`` = ``head(hidden, head.noise(...))``;
  * ``head.loss(hidden, targets, ..., mask=None)`` is the training loss for posterior draws ``targets`` (M, P, l)
    of the true chunks at hidden (P, d), with ``head.num_targets`` = M, averaged over the positions a (P,)
    ``mask`` marks (fine-tuning's completion chunks) or all; ``CALM.forward`` uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CALMConfig
from .diffusion import GaussianDiffusion
from ..errors import ConfigError
from .losses import energy_score, masked_mean


class ResidualBlock(nn.Module):
    """x + down_proj(SiLU(g) * u), where [g, u] = MLP(concat(LayerNorm(x), c))."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(d, eps=eps)
        self.linears = nn.Sequential(nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2 * d))
        self.down_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # linears[0] acts on concat(LayerNorm(x), c); its c half is applied to c as given (one row per hidden
        # state) and broadcast over the samples that share it, not once per sample: the same product, split.
        first, d = self.linears[0], x.shape[-1]
        h = F.linear(self.in_ln(x), first.weight[:, :d], first.bias) + F.linear(c, first.weight[:, d:])
        for layer in list(self.linears)[1:]:
            h = layer(h)
        gate, up = h.chunk(2, dim=-1)
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
        # the loss: num_samples draws against num_targets posterior draws, distances to the power alpha
        self.num_samples, self.num_targets, self.alpha = cfg.num_samples, cfg.num_targets, cfg.energy_alpha
        self.xavier_init = cfg.energy_head_init == "xavier"

    def zero_init_output(self) -> None:
        """The last layer starts at zero (as in the reference) so early samples do not explode; with
        ``energy_head_init="xavier"`` the other Linears are first redrawn xavier-uniform with zero biases."""
        if self.xavier_init:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
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

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor | None = None,
             mask: torch.Tensor | None = None, samples: torch.Tensor | None = None) -> torch.Tensor:
        """Negative energy score of num_samples draws at hidden (P, d) against targets (M, P, l), averaged
        (over the positions ``mask`` (P,) marks, if given); ``noise`` (num_samples, P, noise_size) pins the draws,
        ``samples`` (num_samples, P, l) are the draws themselves when the caller has made them (training aids)."""
        if samples is None:
            samples = self(hidden, self.draw_noise(hidden) if noise is None else noise)
        return masked_mean(-energy_score(samples, targets, self.alpha), mask)

    def draw_noise(self, hidden: torch.Tensor) -> torch.Tensor:
        """The noise of the num_samples training draws at every position of hidden (P, d)."""
        return self.noise((self.num_samples, hidden.shape[0]), hidden.device, hidden.dtype)

    def configure(self, cfg: CALMConfig) -> None:
        """No sampling options: one network call per sample."""

    network_calls = 1


# ---------------------------------------------------------------------------------------------------
# The network of the flow and diffusion heads (the reference's SimpleMLPAdaLN, same submodule names).

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Integer timestep τ -> [cos(τ·f), sin(τ·f)] over 256 frequencies f_i = 10000^(−i/128) -> MLP -> (…, d)."""

    def __init__(self, d: int, frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[..., None].float() * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # cos first
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLNBlock(nn.Module):
    """x + gate·MLP(LN(x)·(1 + scale) + shift), with (shift, scale, gate) = Linear(SiLU(y))."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class AdaLNFinalLayer(nn.Module):
    def __init__(self, d: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class AdaLNMLP(nn.Module):
    """(x (…, l), integer timestep τ (…), condition c (…, d)) -> (…, out); y = time_embed(τ) + cond_embed(c).

    Leading dims broadcast, so a condition (P, d) serves S samples (S, P, l) with one cond_embed."""

    def __init__(self, latent_size: int, d: int, num_blocks: int, out: int) -> None:
        super().__init__()
        self.time_embed = TimestepEmbedder(d)
        self.cond_embed = nn.Linear(d, d)
        self.input_proj = nn.Linear(latent_size, d)
        self.res_blocks = nn.ModuleList(AdaLNBlock(d) for _ in range(num_blocks))
        self.final_layer = AdaLNFinalLayer(d, out)

    def zero_init_output(self) -> None:
        """The reference's initialisation: xavier-uniform Linears, N(0, 0.02) time MLP, zero modulation and
        output layers (so a fresh head outputs exactly 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(m.weight, std=0.02)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for m in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, c_emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.input_proj(x.to(self.input_proj.weight.dtype))
        y = self.time_embed(t) + (self.cond_embed(c) if c_emb is None else c_emb)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


# ---------------------------------------------------------------------------------------------------
# Flow matching

class FlowNet(AdaLNMLP):
    """The flow head's network in the reference's time convention: t in [0, 1], embedded as (t·1000).long()
    (a float32 multiply, then truncation: t = 0.7 embeds 700, not floor(float64(0.7f)·1000) = 699)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, c_emb: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, (t.float() * 1000).long(), c, c_emb)


class FlowHead(nn.Module):
    """Flow matching: x_t = (1 − t)·x0 + t·x (x0 ~ N(0, I) at t = 0, data at t = 1), the net regresses the
    velocity x − x0; sampling integrates dx/dt = v from t = 0 to 1 (midpoint: flow_steps // 2 steps of two
    calls; Euler: flow_steps steps of one). ``noise`` is the starting point x0 (…, l)."""

    def __init__(self, cfg: CALMConfig) -> None:
        super().__init__()
        self.latent_size, self.num_targets = cfg.latent_size, cfg.num_targets
        self.net = FlowNet(cfg.latent_size, cfg.hidden_size, cfg.num_head_blocks, cfg.latent_size)
        self.configure(cfg)

    def configure(self, cfg: CALMConfig) -> None:
        """Sampling options (they do not change the weights, so a loaded model can be re-configured)."""
        self.steps, self.solver = cfg.flow_steps, cfg.flow_solver

    @property
    def network_calls(self) -> int:
        return 2 * (self.steps // 2) if self.solver == "midpoint" else self.steps

    def zero_init_output(self) -> None:
        self.net.zero_init_output()

    def noise(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype = torch.float32,
              generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(*shape, self.latent_size, device=device, dtype=dtype, generator=generator)

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden (..., d), x0 = noise (S, ..., l) or (..., l) -> the ODE solution at t = 1, noise's shape."""
        c_emb = self.net.cond_embed(hidden)  # once, whatever the number of steps and samples
        x = noise.float()  # integrated in float32 whatever the net's dtype
        n = self.steps // 2 if self.solver == "midpoint" else self.steps
        dt = 1.0 / n
        lead = x.shape[:-1]
        for i in range(n):
            # float32 times as in the reference: t = i/n as a Python float, t_mid = t + dt/2 as a float32 add
            t = torch.full(lead, i / n, device=x.device)
            if self.solver == "midpoint":
                v1 = self.net(x, t, hidden, c_emb)
                x_mid = x + 0.5 * dt * v1
                x = x + dt * self.net(x_mid, t + 0.5 * dt, hidden, c_emb)
            else:
                x = x + dt * self.net(x, t, hidden, c_emb)
        return x

    def sample(self, hidden: torch.Tensor, num_samples: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        lead = tuple(hidden.shape[:-1]) if num_samples is None else (num_samples, *hidden.shape[:-1])
        return self(hidden, self.noise(lead, hidden.device, hidden.dtype, generator))

    def row_losses(self, hidden: torch.Tensor, targets: torch.Tensor, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row squared velocity error (mean over l) for targets x (…, l) at hidden (broadcasting to them);
        ``t`` (…) ~ U[0, 1) and ``noise`` x0 (…, l) ~ N(0, I) pin the draws (drawn in that order)."""
        if t is None:
            t = torch.rand(targets.shape[:-1], device=targets.device)
        if noise is None:
            noise = torch.randn_like(targets)
        t, noise = t.reshape(targets.shape[:-1]), noise.reshape(targets.shape)
        xt = (1 - t[..., None]) * noise + t[..., None] * targets
        c_emb = self.net.cond_embed(hidden)  # once per position, shared by its M targets
        return (self.net(xt, t, hidden, c_emb) - (targets - noise)).pow(2).mean(-1)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean flow-matching loss; hidden (P, d), targets (M, P, l), each target paired with its position;
        averaged over the positions ``mask`` (P,) marks, if given."""
        return masked_mean(self.row_losses(hidden, targets, t, noise), mask)


# ---------------------------------------------------------------------------------------------------
# Diffusion

class DiffusionHead(nn.Module):
    """DDPM on the latent: ε-prediction + learned-range variance (net output 2l), cosine schedule of
    ``diffusion_steps`` training steps, ancestral sampling on a chain respaced to ``diffusion_sample_steps``.
    The net is fed the original timestep of each respaced step. ``noise`` (S+1, …, l): x_T, then the noise of
    each of the S reverse steps in the order they run (the last step's noise is multiplied by 0)."""

    def __init__(self, cfg: CALMConfig) -> None:
        super().__init__()
        self.latent_size, self.num_targets = cfg.latent_size, cfg.num_targets
        self.net = AdaLNMLP(cfg.latent_size, cfg.hidden_size, cfg.num_head_blocks, 2 * cfg.latent_size)
        self.configure(cfg)

    def configure(self, cfg: CALMConfig) -> None:
        self.train_diffusion = GaussianDiffusion(cfg.diffusion_steps)
        self.gen_diffusion = GaussianDiffusion(cfg.diffusion_steps, cfg.diffusion_sample_steps)
        self.temperature = 1.0  # scales the per-step noise; CALM's temperature sampling never changes it

    @property
    def network_calls(self) -> int:
        return self.gen_diffusion.num_steps

    def zero_init_output(self) -> None:
        self.net.zero_init_output()

    def noise(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype = torch.float32,
              generator: torch.Generator | None = None) -> torch.Tensor:
        steps = self.gen_diffusion.num_steps
        return torch.randn(steps + 1, *shape, self.latent_size, device=device, dtype=dtype, generator=generator)

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden (..., d), noise (S+1, [n,] ..., l) -> x_0 (noise.shape[1:])."""
        chain = self.gen_diffusion
        if noise.shape[0] != chain.num_steps + 1:
            raise ConfigError(f"diffusion noise has {noise.shape[0]} slices; the {chain.num_steps}-step chain needs "
                             f"{chain.num_steps + 1} (x_T and one per reverse step)")
        c_emb = self.net.cond_embed(hidden)
        x = noise[0].float()  # the chain runs in float32 (its coefficients are float32), whatever the net's dtype
        lead = x.shape[:-1]
        for j, k in enumerate(range(chain.num_steps - 1, -1, -1)):
            ks = torch.full(lead, k, dtype=torch.long, device=x.device)
            out = self.net(x, chain.original_timestep(ks), hidden, c_emb)
            x = chain.p_sample(out, x, ks, noise[j + 1].to(x.dtype), self.temperature)
        return x

    def sample(self, hidden: torch.Tensor, num_samples: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        lead = tuple(hidden.shape[:-1]) if num_samples is None else (num_samples, *hidden.shape[:-1])
        return self(hidden, self.noise(lead, hidden.device, hidden.dtype, generator))

    def loss_terms(self, hidden: torch.Tensor, targets: torch.Tensor, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-row ``mse``, ``vb`` and ``loss`` for targets x_0 (…, l); ``t`` (…) uniform in 0..T−1 and ``noise``
        ε (…, l) pin the draws (drawn in that order)."""
        if t is None:
            t = torch.randint(0, self.train_diffusion.num_steps, targets.shape[:-1], device=targets.device)
        if noise is None:
            noise = torch.randn_like(targets)
        t, noise = t.reshape(targets.shape[:-1]), noise.reshape(targets.shape)
        d = self.train_diffusion
        x_t = d.q_sample(targets, t, noise)
        out = self.net(x_t, d.original_timestep(t), hidden, self.net.cond_embed(hidden))
        return d.training_losses(out, targets, x_t, t, noise)

    def row_losses(self, hidden: torch.Tensor, targets: torch.Tensor, t: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.loss_terms(hidden, targets, t, noise)["loss"]

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean diffusion loss (mse + vb); hidden (P, d), targets (M, P, l); averaged over the positions
        ``mask`` (P,) marks, if given."""
        return masked_mean(self.row_losses(hidden, targets, t, noise), mask)


HEADS = {"energy": EnergyHead, "flow": FlowHead, "diffusion": DiffusionHead}
