"""The CALM next-vector language model (paper §3).

Each step reads the previous chunks as *discrete* tokens (the K token embeddings of a chunk are
concatenated and compressed by an MLP into one input vector), the backbone emits a hidden state, and the
generative head draws the next chunk's latent (the energy head in one step; see heads.py for the others). The frozen autoencoder is part of the model:
its encoder gives the training targets, its decoder turns generated latents back into K tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .autoencoder import Autoencoder
from .transformer import KVCache, Transformer
from ..config import HEAD_SAMPLING_OPTIONS, CALMConfig, check_compatible
from ..errors import ConfigError
from .aids import TrainingAids
from .heads import HEADS
from .layers import ModelOutput, init_linear_and_embedding
from .pool import DrawPool
from .losses import posterior_targets


class CALM(nn.Module):
    def __init__(self, config: CALMConfig, autoencoder: Autoencoder | None = None) -> None:
        super().__init__()
        self.config = config
        d, k = config.hidden_size, config.chunk_size
        self.backbone = Transformer(config)
        self.input_proj = nn.Sequential(  # K*d -> 2d -> d, then LayerNorm
            nn.Linear(k * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=config.layer_norm_eps))
        self.head = HEADS[config.head](config)
        init_linear_and_embedding(self, config.initializer_range)
        self.head.zero_init_output()
        if autoencoder is None:
            autoencoder = Autoencoder(config.autoencoder)
        else:
            check_compatible(config, autoencoder.config)
        self.autoencoder = autoencoder
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()
        self.aids: TrainingAids | None = None  # training-only losses, attached by the training workflow

    def attach_aids(self) -> None:
        """Build the training aids the config turns on (models/aids.py); the trainer keeps their parameters out
        of the checkpoint's weights, so the saved model is a plain CALM."""
        if self.config.uses_aids and self.aids is None:
            p = self.backbone.embed_tokens.weight
            self.aids = TrainingAids(self.config).to(device=p.device, dtype=p.dtype)

    def train(self, mode: bool = True) -> "CALM":
        super().train(mode)
        self.autoencoder.eval()  # frozen: no dropout, no masking, ever
        return self

    # -- public computations ------------------------------------------------------------------------
    def embed_chunks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N*K) ids -> (B, N, d) compressed chunk input vectors."""
        b, length = input_ids.shape
        k = self.config.chunk_size
        if length % k:
            raise ConfigError(f"CALM input length {length} is not a multiple of K={k}")
        e = self.backbone.embed_tokens(input_ids).view(b, length // k, -1)  # (B, N, K*d), chunk tokens in order
        return self.input_proj(e)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, N*K) ids -> (B, N, d) backbone hidden states (after the final norm) at every chunk."""
        return self.backbone(self.embed_chunks(input_ids), cache)

    def sample_latents(self, hidden: torch.Tensor, num_samples: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        return self.head.sample(hidden, num_samples, generator)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(..., l) -> (..., K) token ids (argmax of the frozen decoder)."""
        return self.autoencoder.decode_tokens(z)

    def draw_pool(self, hidden: torch.Tensor, pool_size: int, generator: torch.Generator | None = None) -> DrawPool:
        """hidden (B, d) -> ``pool_size`` draws of the next chunk at each position (the latents of
        ``sample_latents(hidden, pool_size, generator)``), decoded only as far as a temperature sampler needs."""
        return DrawPool(self.autoencoder.decoder, self.sample_latents(hidden, pool_size, generator).transpose(0, 1))

    def sample_chunks(self, hidden: torch.Tensor, num_samples: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Black-box sampler of the next chunk: hidden (..., d) -> tokens (..., K) or (S, ..., K)."""
        return self.decode_latents(self.sample_latents(hidden, num_samples, generator))

    # -- training -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, noise: torch.Tensor | None = None,
                target_eps: torch.Tensor | None = None, t: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> ModelOutput:
        """The head's loss for predicting chunks 1..N-1 from the hidden states of chunks 0..N-2.

        Targets are ``head.num_targets`` draws from the autoencoder posterior of each true chunk, each paired
        with the position's hidden state. ``target_eps`` (M, B*(N-1), l) pins their draw (rows batch-major);
        ``noise`` pins the head's draws (energy: (S, B*(N-1), noise_size); flow: x0, diffusion: ε, both
        (M, B*(N-1), l)) and ``t`` the flow/diffusion times (M, B*(N-1)), e.g. to compare with the reference.
        ``loss_mask`` (B, N) bool, one flag per input chunk (chunk 0 is never a target): average the loss only
        over the chunks it marks (fine-tuning's completion)."""
        hidden = self.hidden_states(input_ids)[:, :-1]  # (B, N-1, d)
        with torch.no_grad():
            mean, log_std = self.autoencoder.encode(input_ids)
        mean, log_std = mean[:, 1:].flatten(0, 1), log_std[:, 1:].flatten(0, 1)  # (P, l)
        hidden = hidden.flatten(0, 1)  # (P, d)
        targets = posterior_targets(mean, log_std, self.head.num_targets, target_eps)  # (M, P, l)
        if t is not None and self.config.head == "energy":
            raise ConfigError("t pins the flow/diffusion times; the energy head has none (pass noise only)")
        draws = {k: v for k, v in (("noise", noise), ("t", t)) if v is not None}
        mask = None if loss_mask is None else _chunk_mask(loss_mask, input_ids, self.config.chunk_size)
        aiding = self.aids is not None and self.training and self.aids.active
        samples = None
        if aiding and self.aids.uses_samples:  # the energy loss's own draws serve the aids that read samples
            samples = self.head(hidden, noise if noise is not None else self.head.draw_noise(hidden))
            draws = {"samples": samples}
        loss = self.head.loss(hidden, targets, **draws, mask=mask)
        metrics = {f"{self.config.head}_loss": loss.detach()}
        if self.aids is not None and self.training:
            metrics["aid_factor"] = self.aids.factor.detach().clone()
        if aiding:
            k = self.config.chunk_size
            chunks = input_ids[:, k:].reshape(-1, k)  # (P, K): the chunks the hidden states predict
            aid_loss, aid_metrics = self.aids(self, hidden, chunks, mean, mask, samples)
            loss = loss + aid_loss
            metrics.update(aid_metrics)
        return ModelOutput(loss, metrics)

    def set_head_options(self, **options: Any) -> None:
        """Change sampling options of a trained model's head (flow_steps, flow_solver, diffusion_sample_steps);
        the weights stay valid, so a flow model can be sampled with 10 calls or a diffusion model with 50 steps."""
        bad = sorted(set(options) - set(HEAD_SAMPLING_OPTIONS))
        if bad:
            raise ConfigError(f"{bad} cannot change after training; sampling options: {list(HEAD_SAMPLING_OPTIONS)}")
        self.config = self.config.replace(**options)
        self.head.configure(self.config)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """See :func:`calmlm.sampling.generation.generate`."""
        from ..sampling.generation import generate
        return generate(self, input_ids, **kwargs)


def _chunk_mask(loss_mask: torch.Tensor, input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) per-chunk mask -> (B*(N-1),) flags of the predicted chunks 1..N-1, batch-major."""
    shape = (input_ids.shape[0], input_ids.shape[1] // k)
    if tuple(loss_mask.shape) != shape:
        raise ConfigError(f"CALM loss_mask must have one flag per input chunk, shape {shape}, "
                          f"got {tuple(loss_mask.shape)}")
    return loss_mask[:, 1:].flatten()
