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
        x = self.latent_to_hidden(z)
        for layer in self.decoder_layers[: len(self.decoder_layers) // 2]:
            x = layer(x)
        return self.expand_layer(x).unflatten(-1, (self.chunk_size, -1))

    def slot_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) slot vectors -> (..., V) logits. Position-wise (no mixing between slots), so any subset
        of slots can be decoded on its own."""
        return F.linear(self.slot_hidden(x), self.output_weight)

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

    @torch.no_grad()
    def decode_pool_keys(self, z: torch.Tensor) -> torch.Tensor:
        """(B, N, l) pools of latents -> (B, N, K) rows whose equality pattern within each pool is exactly
        that of the decoded chunks, at a fraction of the cost when the pool is diverse.

        Temperature sampling from a pool only needs to know which draws decode to the same chunk. Slots are
        decoded one at a time, and only for draws whose decoded prefix is still shared with another draw
        of the same pool: once a prefix is unique, so is the chunk, and its remaining slots are filled with
        a placeholder < 0 unique to that draw. Entries >= 0 are the decoded token ids. Decode the chosen
        draws fully afterwards (:meth:`decode_tokens`)."""
        b, n, _ = z.shape
        k, vocab = self.config.chunk_size, self.config.vocab_size
        slots = self.decoder.expand(self._decoder_input(z).reshape(b * n, -1))  # (R, K, d), cheap next to the logits
        rows = torch.arange(b * n, device=z.device)
        keys = -1 - rows[:, None].repeat(1, k)  # placeholders, unique per draw
        group = rows // n  # draws are compared within their own pool only
        active = rows
        for j in range(k):
            tokens = fast_argmax(self.decoder.slot_logits(slots[active, j]))
            keys[active, j] = tokens
            if j == k - 1:
                break
            # Dense ids of (group, prefix) keep the key small whatever V and K are.
            _, group, counts = torch.unique(group * vocab + tokens, return_inverse=True, return_counts=True)
            shared = counts[group] > 1
            active, group = active[shared], group[shared]
            if active.numel() == 0:
                break
        return keys.view(b, n, k)

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


def fast_argmax(logits: torch.Tensor, block: int = 64) -> torch.Tensor:
    """``logits.argmax(-1)`` for 2-D logits, ties resolved to the lowest index as argmax does.

    On CPU, ``argmax`` over a long last dimension is several times slower than ``amax`` (it is not
    vectorised the same way), so we take the max of each block of ``block`` columns, pick the first best
    block, and the first best column inside it. Elsewhere plain argmax is already fast."""
    if logits.device.type != "cpu" or logits.dim() != 2 or logits.shape[-1] < 4 * block:
        return logits.argmax(-1)
    rows, vocab = logits.shape
    main = vocab - vocab % block
    blocks = logits[:, :main].unflatten(-1, (-1, block))  # (rows, nb, block); a view when vocab % block == 0
    best_block = blocks.amax(-1).argmax(-1)  # (rows,)
    inside = blocks[torch.arange(rows, device=logits.device), best_block].argmax(-1)
    idx = best_block * block + inside
    if main < vocab:  # a ragged tail wins only if strictly larger (it comes later)
        tail = logits[:, main:]
        tail_val, tail_idx = tail.max(-1)
        head_val = logits.gather(-1, idx[:, None])[:, 0]
        idx = torch.where(tail_val > head_val, tail_idx + main, idx)
    return idx
