"""The robust chunk autoencoder (paper §2): K tokens -> one latent vector z in R^l -> the same K tokens.

It is a VAE: the encoder outputs a mean and a log-std per latent dimension; training adds a KL term
to N(0, I) with a per-dimension floor (``kl_clamp``) so no dimension collapses, and drops out input
tokens and latent dimensions so the decoder stays accurate when the language model's predicted
latent is slightly off. There is no attention anywhere: every layer is a per-position residual MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AutoencoderConfig
from ..errors import ConfigError
from .layers import ModelOutput, ResidualMLP, RMSNorm, init_linear_and_embedding
from .losses import linear_cross_entropy
from .argmax import ArgmaxScreen, fast_argmax


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        d, k = cfg.hidden_size, cfg.chunk_size
        self.chunk_size = k
        self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
        self.encoder_layers = nn.ModuleList(
            ResidualMLP(d, cfg.intermediate_size, cfg.rms_norm_eps) for _ in range(cfg.num_encoder_layers))
        self.squeeze_layer = nn.Linear(k * d, d)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.hidden_to_latent = nn.Linear(d, 2 * cfg.latent_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N*K) token ids -> (B, N, 2l) latent states: mean = [..., :l], log-std = [..., l:]."""
        b, length = input_ids.shape
        x = self.embed_tokens(input_ids).view(b, length // self.chunk_size, self.chunk_size, -1)  # (B, N, K, d)
        half = len(self.encoder_layers) // 2
        for layer in self.encoder_layers[:half]:
            x = layer(x)
        x = self.squeeze_layer(x.flatten(-2))  # (B, N, d)
        for layer in self.encoder_layers[half:]:
            x = layer(x)
        return self.hidden_to_latent(self.norm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        d, k = cfg.hidden_size, cfg.chunk_size
        self.chunk_size = k
        self.latent_to_hidden = nn.Linear(cfg.latent_size, d)
        self.decoder_layers = nn.ModuleList(
            ResidualMLP(d, cfg.intermediate_size, cfg.rms_norm_eps) for _ in range(cfg.num_decoder_layers))
        self.expand_layer = nn.Linear(d, k * d)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self._embedding = [embedding]  # tied output projection; a list keeps it out of this module's params

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(..., N, l) latents -> (..., N*K, V) logits over the vocabulary."""
        return self.slot_logits(self.expand(z)).flatten(-3, -2)

    def expand(self, z: torch.Tensor) -> torch.Tensor:
        """(..., l) latents -> (..., K, d): the shared trunk, up to one hidden vector per token slot."""
        return self.expand_layer(self.trunk(z)).unflatten(-1, (self.chunk_size, -1))

    def trunk(self, z: torch.Tensor) -> torch.Tensor:
        """(..., l) latents -> (..., d): the layers before the expansion into K slots."""
        x = self.latent_to_hidden(z)
        for layer in self.decoder_layers[: len(self.decoder_layers) // 2]:
            x = layer(x)
        return x

    def expand_slot(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """(..., d) trunk outputs -> (..., d) the vectors of token slot ``slot`` alone: a K-th of ``expand``."""
        d = x.shape[-1]
        rows = slice(slot * d, (slot + 1) * d)
        return F.linear(x, self.expand_layer.weight[rows], self.expand_layer.bias[rows])

    def slot_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) slot vectors -> (..., V) logits. Position-wise (no mixing between slots), so any subset
        of slots can be decoded on its own."""
        return F.linear(self.slot_hidden(x), self.output_weight)

    def slot_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(M, d) slot vectors -> (M,) token ids, the argmax of their logits. On CPU in float32 through an exact
        int8 screen (models/argmax.py): the same tokens at a fraction of the cost of the V-way logits."""
        hidden = self.slot_hidden(x)
        if ArgmaxScreen.supports(hidden, self.output_weight) and bool(hidden.isfinite().all()):
            return ArgmaxScreen.for_weight(self.output_weight)(hidden)
        return fast_argmax(F.linear(hidden, self.output_weight))

    def slot_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) slot vectors -> (..., d) final normed states, the input of the tied output projection."""
        for layer in self.decoder_layers[len(self.decoder_layers) // 2:]:
            x = layer(x)
        return self.norm(x)

    @property
    def output_weight(self) -> torch.Tensor:
        return self._embedding[0].weight


class Autoencoder(nn.Module):
    """Encoder + decoder with a tied embedding/output matrix."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, self.encoder.embed_tokens)
        init_linear_and_embedding(self, config.initializer_range)

    # -- public computations ------------------------------------------------------------------------
    def latent_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N*K) ids -> (B, N, 2l) concatenated (mean, log-std)."""
        self._check_length(input_ids)
        return self.encoder(input_ids)

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N*K) ids -> mean, log_std, each (B, N, l)."""
        states = self.latent_states(input_ids)
        return states.chunk(2, dim=-1)  # type: ignore[return-value]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(..., N, l) latents -> (..., N*K, V) logits."""
        return self.decoder(z)

    @torch.no_grad()
    def decode_tokens(self, z: torch.Tensor, max_logits: int | None = None) -> torch.Tensor:
        """(..., l) latents -> (..., K) token ids by argmax (the reference's decoding rule).

        Generation at T < 1 decodes hundreds of latents per position, so the latents go through the decoder
        in slices whose (rows, V) logits stay small (``max_logits`` elements; by default cache-sized on
        CPU, 2^28 on GPUs): the logits never exist for the whole pool at once."""
        k, lead = self.config.chunk_size, z.shape[:-1]
        flat = self._decoder_input(z).reshape(-1, z.shape[-1])
        if max_logits is None:
            max_logits = 2**23 if z.device.type == "cpu" else 2**28
        rows = max(1, max_logits // (k * self.config.vocab_size))
        out = torch.empty(flat.shape[0], k, dtype=torch.long, device=z.device)
        for i in range(0, flat.shape[0], rows):
            logits = self.decoder(flat[i:i + rows])  # (rows*K, V)
            out[i:i + rows] = fast_argmax(logits).view(-1, k)
        return out.view(*lead, k)

    def _decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in the decoder's dtype: a CALM head may run in another precision than the frozen decoder."""
        return z.to(self.decoder.expand_layer.weight.dtype)

    # -- training -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, noise_std: float = 0.0) -> ModelOutput:
        """Training loss K*CE + beta * sum_dims max(KL_i, floor), averaged over chunks.

        Dropouts (token masking, latent dropout) apply only in training mode; ``noise_std`` adds
        Gaussian noise to z (used by evaluation to measure robustness)."""
        cfg = self.config
        self._check_length(input_ids)
        inputs = input_ids
        if self.training and cfg.token_dropout > 0:
            mask = torch.rand(input_ids.shape, device=input_ids.device) < cfg.token_dropout
            inputs = input_ids.masked_fill(mask, cfg.mask_token_id)
        mean, log_std = self.encoder(inputs).float().chunk(2, dim=-1)
        z = mean + torch.randn_like(mean) * log_std.exp()
        if noise_std:
            z = z + noise_std * torch.randn_like(z)
        z = F.dropout(z, cfg.latent_dropout, self.training)
        hidden = self.decoder.slot_hidden(self.decoder.expand(z.to(mean.dtype) if z.dtype != mean.dtype else z))
        ce, acc = linear_cross_entropy(hidden, self.decoder.output_weight, input_ids)  # (B, N, K, d) vs (B, N*K)
        kl_raw = kl_per_dim(mean, log_std)  # (B, N, l)
        kl = kl_raw.clamp(min=cfg.kl_clamp).sum(-1).mean()
        loss = cfg.chunk_size * ce + cfg.kl_weight * kl
        with torch.no_grad():
            active = (kl_raw.mean((0, 1)) > cfg.kl_clamp).float().sum()
        return ModelOutput(loss, {"ce": ce.detach(), "kl": kl.detach(), "token_acc": acc, "active_dims": active})

    def _check_length(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] % self.config.chunk_size:
            raise ConfigError(f"autoencoder input must be (batch, length) with length a multiple of "
                              f"K={self.config.chunk_size}; got shape {tuple(input_ids.shape)}")


def kl_per_dim(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) per dimension: 0.5 * (mean^2 + std^2 - 1) - log_std."""
    return 0.5 * (mean.pow(2) + torch.exp(2 * log_std) - 1) - log_std
