"""The Llama-style decoder shared by CALM (over chunk positions) and the baseline (over tokens).

Pre-norm RMSNorm, rotary position embeddings, grouped-query attention through
``scaled_dot_product_attention`` (fused kernels on GPU), SwiGLU MLPs, no biases, a final RMSNorm,
and a preallocated KV cache for decoding.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BackboneConfig
from .layers import RMSNorm, SwiGLU


class KVCache:
    """Preallocated keys/values for every layer: (layers, B, kv_heads, max_len, head_dim).

    ``length`` is a Python int, so the decode loop needs no host-device synchronisation."""

    def __init__(self, cfg: BackboneConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat(self, copies: int, extra: int) -> KVCache:
        """``copies`` copies of every row (copy-major: row c*B + b is row b), with room for ``extra`` more
        positions, so that each copy can continue on its own (BrierLM's continuation pass)."""
        out = copy.copy(self)
        out.k, out.v = (F.pad(t[:, :, :, :self.length], (0, 0, 0, extra)).repeat(1, copies, 1, 1, 1)
                        for t in (self.k, self.v))
        out.max_len = self.length + extra
        return out


class RotaryEmbedding(nn.Module):
    """Llama RoPE (half-split rotation), computed in float32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq  # (..., T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos.to(x.dtype)) + (_rotate_half(x) * sin.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is not None:  # an explicit pattern: BrierLM's tree-shaped continuation, left-padded rows
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        elif t == 1:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # a block of new positions after a cached prefix: causal with an offset
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layer: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Token embedding + decoder layers + final norm. ``forward`` takes input *vectors*, so CALM can feed
    its compressed chunk embeddings and the baseline its token embeddings."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_position_embeddings,
                       p.device, dtype or p.dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) input vectors -> (B, T, d) final hidden states (after the final RMSNorm).

        By default the T inputs follow the cached ones causally. ``positions`` (T,) or per row (B, T) (rotary
        positions) and ``mask`` (T, cached + T) or per row (B, T, cached + T) bool (True: may attend)
        override that, e.g. for BrierLM's pass in which every position of a cached block continues at once,
        or for left-padded rows (see ``left_padding``)."""
        start = cache.length if cache is not None else 0
        if cache is not None and start + x.shape[1] > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions is full")
        if positions is None:
            positions = torch.arange(start, start + x.shape[1], device=x.device)
        cos, sin = self.rotary(positions)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, S)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)


def left_padding(pad: torch.Tensor, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``Transformer.forward``'s (positions, mask) for rows of different lengths decoded as one batch:
    row b's first ``pad[b]`` cache positions are padding. Its real positions are numbered from 0 and never
    attend to its padding, so each row computes what it would alone. ``start`` is the cache length before
    these ``t`` inputs; pass the same ``pad`` at every step of a cached decode."""
    query = torch.arange(start, start + t, device=pad.device)
    keys = torch.arange(start + t, device=pad.device)
    causal = keys[None, :] <= query[:, None]  # (T, S)
    # A padding query attends to itself only, so its (unused) output stays finite.
    real = (keys[None, None, :] >= pad[:, None, None]) | (keys[None, None, :] == query[None, :, None])
    return (query[None, :] - pad[:, None]).clamp_min(0), causal[None] & real  # (B, T), (B, T, S)
