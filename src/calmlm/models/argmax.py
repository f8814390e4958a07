"""Argmax over a large vocabulary, fast on CPUs: :func:`fast_argmax` of given logits, and
:class:`ArgmaxScreen`, the argmax of ``x @ W.T`` found through an int8 screen without the float32 logits.

Decoding a pool of draws at T < 1 takes the argmax of V-way logits for hundreds of rows per step, and on
CPUs the float32 product with the V x d output matrix is most of that cost. An int8 product is several
times cheaper (and its matrix 4x smaller to read), and with a rigorous bound on its error it decides the
argmax exactly: only the few tokens whose int8 logit could still be the largest are recomputed, in float64.

The bound. With x = s_x q_x + e_x and W_v = s_W q_v + f_v (q integer, s a scale, e and f the rounding
errors), x·W_v = s_x s_W (q_x·q_v) + s_x q_x·f_v + e_x·W_v, and by Cauchy-Schwarz the last two terms are
at most E = s_x |q_x| max_v|f_v| + |e_x| max_v|W_v| in absolute value (Euclidean norms). q_x·q_v is an
exact int32. So the true argmax v* satisfies I_v* >= max_v I_v - 2E / (s_x s_W) with I = q_x·q_v, and only
tokens above that threshold are candidates; their logits are recomputed in float64 (products of float32
numbers are exact there) and the largest wins, ties to the lowest index as ``argmax`` resolves them. The
result is the argmax of the exact logits of the float32 inputs: the same token as a float32 matmul's
argmax except where two logits tie to within float32 rounding (there the float32 result depends on the
kernel and the batch size anyway).
"""

from __future__ import annotations

import torch

_BLOCK = 64  # the candidate search looks at blocks of this many tokens
_Q = 127  # symmetric int8 range
_MAX_CANDIDATES = 512  # a row with more is decoded in float32 (re-scoring them would cost as much)
_U = 2.0**-24  # float32 unit roundoff
_SAFETY = 1.001  # covers the rounding of the bound's own float32 arithmetic (norms: relative <= d u)


class ArgmaxScreen:
    """For a fixed (V, d) float32 weight W: ``screen(x)`` = ``(x @ W.T).argmax(-1)`` for (M, d) float32 rows x.

    Build it once per weight (:meth:`for_weight` caches it on the weight's storage and version)."""

    def __init__(self, weight: torch.Tensor) -> None:
        w = weight.detach()
        vocab, _ = w.shape
        self.vocab, self.weight = vocab, w
        w64 = w.double()
        self.scale = float(w64.abs().max().clamp_min(1e-30)) / _Q  # s_W (one scale: the screen stays integer)
        q = (w64 / self.scale).round().clamp(-_Q, _Q)
        self.err_norm = float((w64 - self.scale * q).norm(dim=1).max())  # max_v |f_v| (float64: exact enough)
        self.weight_norm = float(w64.norm(dim=1).max())  # max_v |W_v|
        # Rows padded to whole blocks with copies of row 0: they never beat the real maximum, map back to 0.
        pad = -vocab % _BLOCK
        q8 = q.to(torch.int8)
        if pad:
            q8 = torch.cat([q8, q8[:1].expand(pad, -1)])
        self.qweight_t = q8.t()  # (d, V') a transposed view: the layout torch._int_mm reads fastest on CPU

    _cache: dict[tuple[int, int, tuple[int, ...]], "ArgmaxScreen"] = {}

    @classmethod
    def for_weight(cls, weight: torch.Tensor) -> "ArgmaxScreen":
        """The screen of ``weight``, rebuilt when the weight changes: new storage, or an in-place update
        (which bumps its version; writes through ``weight.data`` do not, and are not seen). A cached screen
        holds its weight's storage, so a freed weight's address is not reused while cached (two at most)."""
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        screen = cls._cache.get(key)
        if screen is None:
            if len(cls._cache) >= 2:
                cls._cache.clear()
            screen = cls._cache[key] = cls(weight)
        return screen

    @staticmethod
    def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
                and hasattr(torch, "_int_mm"))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(M, d) float32 -> (M,) int64 argmax of x @ W.T."""
        num = x.shape[0]
        scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min(1e-30) / _Q  # (M, 1) s_x
        q = torch.div(x, scale).round_().clamp_(-_Q, _Q)  # integers, exact in float32
        # |e_x|, e_x = x - s_x q computed in float32: each entry within 2u(|x_k| + |e_k|) of the true one
        x_norm = x.norm(dim=1, keepdim=True)
        err = torch.addcmul(x, scale, q, value=-1).norm(dim=1, keepdim=True) * (1 + 3 * _U) + 2 * _U * x_norm
        bound = (scale * q.norm(dim=1, keepdim=True) * self.err_norm + err * self.weight_norm) * _SAFETY
        ints = torch._int_mm(q.to(torch.int8), self.qweight_t)  # (M, V') exact q_x·q_v
        blocks = ints.view(num, -1, _BLOCK)
        block_max = blocks.amax(-1)  # (M, V'/B)
        top = block_max.amax(1, keepdim=True)
        # I_v >= top - 2E/(s_x s_W), I integer: >= top - floor(.)
        slack = (2 * bound / (scale * self.scale)).floor().clamp_max(2**31 - 1).to(torch.int64)
        threshold = top - slack  # (M, 1)
        row, block = (block_max >= threshold).nonzero(as_tuple=True)
        inside = blocks[row, block] >= threshold[row]  # (C, B)
        which, offset = inside.nonzero(as_tuple=True)
        row = row[which]
        token = block[which] * _BLOCK + offset
        token = torch.where(token < self.vocab, token, 0)  # padding rows are copies of row 0
        # A row whose logits are too flat for the screen to narrow them down is decoded in float32.
        flat = torch.bincount(row, minlength=num) > _MAX_CANDIDATES
        if bool(flat.any()):
            keep = ~flat[row]
            row, token = row[keep], token[keep]
        out = self._largest(x, x_norm[:, 0], row, token, num)
        if bool(flat.any()):
            out[flat] = fast_argmax(x[flat] @ self.weight.t())
        return out

    def _largest(self, x: torch.Tensor, x_norm: torch.Tensor, row: torch.Tensor, token: torch.Tensor,
                 num: int) -> torch.Tensor:
        """The candidate with the largest exact logit x[row]·W[token] at each row, ties to the lowest token.

        Float32 logits decide wherever the best leads the rest by more than twice their rounding bound
        (γ_d |x| |W_v|, any summation order); rows without such a lead are recomputed in float64."""
        counts = torch.bincount(row, minlength=num)
        single = counts[row] == 1  # the only candidate of its row: the argmax, nothing to compare
        out = torch.full((num,), self.vocab, dtype=torch.long)
        out[row[single]] = token[single]
        if bool(single.all()):
            return out
        row, token = row[~single], token[~single]
        weights = self.weight.index_select(0, token)
        logit = (x.index_select(0, row) * weights).sum(1).double()
        d = x.shape[1]
        gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
        slack = 2 * gamma * x_norm.double() * self.weight_norm * _SAFETY  # twice the rounding bound
        best = torch.full((num,), -torch.inf, dtype=torch.float64).scatter_reduce(0, row, logit, "amax")
        close = logit >= best[row] - slack[row]  # could be the largest
        redo = close & (torch.bincount(row[close], minlength=num) > 1)[row]  # rows with a close race
        if bool(redo.any()):
            logit[redo] = (x.index_select(0, row[redo]).double() * weights[redo].double()).sum(1)
        logit[~close] = -torch.inf
        best = best.fill_(-torch.inf).scatter_reduce(0, row, logit, "amax")
        winner = torch.where(logit == best[row], token, self.vocab)
        return out.scatter_reduce(0, row, winner, "amin")


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
