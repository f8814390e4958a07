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
    """Preallocated keys and values for decoding: per layer, (B, kv_heads, max_len, head_dim).

    ``length`` positions are filled; it is a Python int, so the decode loop needs no host-device
    synchronisation. ``pad`` (B,), when set, marks row b's first ``pad[b]`` positions as padding (rows of
    different lengths decoded as one batch, right-aligned): the backbone masks them and numbers each row's
    positions from 0 (:func:`left_padding`), so a row computes what it would alone.

    A *static* cache (``static=True``) also keeps its length on the device (``position``), writes there and
    lets attention read all ``max_len`` positions under a mask: every decode step then runs the same kernels on
    the same memory, so it can be compiled once and captured in a CUDA graph. After :meth:`clear`, its
    ``rows`` first rows are in use and the others vacant (all padding) until :meth:`admit` fills them.

    What a batching engine needs are methods: :meth:`admit` (join prefilled rows), :meth:`evict` (drop rows)."""

    def __init__(self, cfg: BackboneConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, static: bool = False, pad: torch.Tensor | None = None) -> None:
        shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        # One tensor per layer: a compiled step updates each in place (a view of one tensor would be copied whole).
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len, self.length, self.rows = max_len, 0, batch_size
        self.pad = pad
        self.position: torch.Tensor | None = None
        if static:
            self.position = torch.zeros((), dtype=torch.long, device=device)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def static(self) -> bool:
        return self.position is not None

    def layout(self, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(positions, mask) of ``t`` new inputs for ``Transformer.forward`` (mask None: plain causal)."""
        device = self.k[0].device
        if not self.static:
            if self.pad is None:
                return torch.arange(self.length, self.length + t, device=device), None
            return left_padding(self.pad, self.length, t)
        if self.pad is None:
            query = self.position + torch.arange(t, device=device)
            return query, torch.arange(self.max_len, device=device)[None, :] <= query[:, None]
        return left_padding(self.pad, self.position, t, self.max_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``t`` new positions of ``layer``; return its keys and values to attend to."""
        if self.position is None:
            end = self.length + k.shape[2]
            self.k[layer][:, :, self.length:end] = k
            self.v[layer][:, :, self.length:end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        index = self.position + torch.arange(k.shape[2], device=k.device)
        self.k[layer].index_copy_(2, index, k)
        self.v[layer].index_copy_(2, index, v)
        return self.k[layer], self.v[layer]

    def check_room(self, t: int) -> None:
        if not torch.compiler.is_compiling() and self.length + t > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")

    def advance(self, t: int) -> None:
        if self.position is not None:
            self.position += t  # in place: a captured step moves it on every replay
            if torch.compiler.is_compiling():
                return  # a compiled step reads no Python int (it would recompile for each); its runner counts
        self.length += t

    def clear(self) -> None:
        """Empty a static cache: every row vacant, to be filled by :meth:`admit`. It keeps its buffers, so a
        step captured on it stays valid."""
        if self.position is None:
            raise ValueError("only a static KV cache is cleared in place; make a new cache instead")
        if self.pad is None:
            self.pad = torch.empty(self.batch_size, dtype=torch.long, device=self.position.device)
        self.pad.fill_(self.max_len)  # a vacant row is all padding: it attends to itself only
        self.position.zero_()
        self.length = self.rows = 0

    def repeat(self, copies: int, extra: int) -> KVCache:
        """``copies`` copies of every row (copy-major: row c*B + b is row b), with room for ``extra`` more
        positions, so that each copy can continue on its own (BrierLM's continuation pass)."""
        out = copy.copy(self)
        out.k, out.v = ([F.pad(t[:, :, :self.length], (0, 0, 0, extra)).repeat(copies, 1, 1, 1) for t in kv]
                        for kv in (self.k, self.v))
        out.max_len, out.rows = self.length + extra, self.rows * copies
        return out

    def admit(self, other: KVCache, room: int = 0) -> None:
        """Append the rows of ``other`` (e.g. new requests prefilled on their own) after this cache's rows. Both
        sides are right-aligned at the longer length: the shorter side's rows gain left padding, never new
        positions. A dynamic cache is reallocated with ``room`` positions to spare; a static one keeps its
        buffers and must have the room (``max_len``) and vacant rows already."""
        rows, length = self.rows + other.rows, max(self.length, other.length)
        shift, shift_other = length - self.length, length - other.length
        pads = [p[:n] if p is not None else torch.zeros(n, dtype=torch.long, device=self.k[0].device)
                for p, n in ((self.pad, self.rows), (other.pad, other.rows))]
        if self.static:
            if self.pad is None:
                raise ValueError("clear() a static KV cache before admitting rows into it")
            if rows > self.batch_size or length > self.max_len:
                raise ValueError(f"static KV cache of {self.batch_size} rows x {self.max_len} positions cannot "
                                 f"hold {rows} rows x {length}")
            for buf, src in zip(self.k + self.v, other.k + other.v):
                if shift:  # own rows move right (a copy: source and destination overlap)
                    buf[:self.rows, :, shift:length] = buf[:self.rows, :, :self.length].clone()
                buf[self.rows:rows, :, shift_other:length] = src[:other.rows, :, :other.length]
            self.pad[:rows] = torch.cat([pads[0] + shift, pads[1] + shift_other])
            self.position.fill_(length)
        else:
            size = length + room
            for kv, other_kv in ((self.k, other.k), (self.v, other.v)):
                for i, (buf, src) in enumerate(zip(kv, other_kv)):
                    merged = buf.new_zeros(rows, buf.shape[1], size, buf.shape[3])
                    merged[:self.rows, :, shift:length] = buf[:self.rows, :, :self.length]
                    merged[self.rows:, :, shift_other:length] = src[:other.rows, :, :other.length]
                    kv[i] = merged
            self.pad, self.max_len = torch.cat([pads[0] + shift, pads[1] + shift_other]), size
        self.rows, self.length = rows, length

    def evict(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (indices, in their new order), then drop the padding columns no kept row
        needs any more (shifting every row left). A static cache does both in place."""
        if self.static and self.pad is None:
            raise ValueError("only the rows admitted into a cleared static KV cache can be evicted")
        n = len(keep)
        pad = self.pad[keep] if self.pad is not None else torch.zeros(n, dtype=torch.long, device=keep.device)
        trim = int(pad.min()) if n else 0
        length = self.length - trim
        for kv in (self.k, self.v):
            for i, buf in enumerate(kv):
                kept = buf[keep, :, trim:self.length]
                if self.static:
                    buf[:n, :, :length] = kept
                else:
                    kv[i] = F.pad(kept, (0, 0, 0, self.max_len - self.length))
        if self.static:
            self.pad.fill_(self.max_len)
            self.pad[:n] = pad - trim
            self.position.fill_(length)
        else:
            self.pad, self.max_len = pad - trim, self.max_len - trim
        self.rows, self.length = n, length


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
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        past = k.shape[2] - t
        if mask is not None:  # an explicit pattern: static caches, BrierLM's continuation, left-padded rows
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

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  static: bool = False, pad: torch.Tensor | None = None) -> KVCache:
        """An empty :class:`KVCache` on this model's device (``pad``: each row's left padding, see there)."""
        p = self.embed_tokens.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_position_embeddings,
                       p.device, dtype or p.dtype, static, pad)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) input vectors -> (B, T, d) final hidden states (after the final RMSNorm).

        By default the T inputs follow the cached ones causally (as the cache lays them out: ``KVCache.layout``).
        ``positions`` (T,) or per row (B, T) (rotary positions) and ``mask`` (T, S) or per row (B, T, S) bool
        (True: may attend; S = cached + T) override that, e.g. for BrierLM's pass in which every position of a
        cached block continues at once."""
        t = x.shape[1]
        if cache is not None:
            cache.check_room(t)
        if cache is not None and positions is None and mask is None:
            positions, mask = cache.layout(t)
        elif positions is None:
            positions = torch.arange(t, device=x.device)
        cos, sin = self.rotary(positions)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): broadcast over heads
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, S)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)


def left_padding(pad: torch.Tensor, start: int | torch.Tensor, t: int,
                 size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``Transformer.forward``'s (positions, mask) for rows of different lengths decoded as one batch:
    row b's first ``pad[b]`` cache positions are padding. Its real positions are numbered from 0 and never
    attend to its padding, so each row computes what it would alone. ``start`` is the cache length before
    these ``t`` inputs (a device scalar for a static cache); the mask spans ``size`` keys (default start + t)."""
    query = start + torch.arange(t, device=pad.device)
    keys = torch.arange(start + t if size is None else size, device=pad.device)
    causal = keys[None, :] <= query[:, None]  # (T, S)
    # A padding query attends to itself only, so its (unused) output stays finite.
    real = (keys[None, None, :] >= pad[:, None, None]) | (keys[None, None, :] == query[None, :, None])
    return (query[None, :] - pad[:, None]).clamp_min(0), causal[None] & real  # (B, T), (B, T, S)
