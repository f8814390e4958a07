"""Likelihood-free temperature sampling (CALM paper, Shao et al. 2025, sections 4-5).

A CALM head can only *draw* samples x ~ P; it cannot evaluate P(x). Temperature sampling asks for
samples from P_T(x) ∝ P(x)^(1/T) with T in (0, 1]. Write 1/T = n + α with an integer n ≥ 1 and
α ∈ [0, 1).

* :func:`exact_temperature_sample` - Algorithm 1, exact, one position, any draw callable.
* :func:`exact_temperature_sample_batch` - Algorithm 1 run as many parallel attempts per position,
  vectorised over positions; still exact.
* :func:`batch_temperature_sample` - Algorithm 2, the batch approximation: choose among a fixed
  pool of N draws per position by their repetition counts (consistent as N → ∞, no rejection loop).
* :func:`lazy_batch_temperature_choice` - the same choice from a pool compared on demand (:class:`QueryPool`):
  random tuples of draws first, counting only if none matches; the same distribution.
* :func:`expected_exact_draws` - the expected cost of Algorithm 1 for a known distribution.

Why Algorithm 1 is exact. Stage 1 draws n samples and goes on only when they are all equal, which
happens for the value x with probability P(x)^n. Stage 2 (only when α > 0) is a Bernoulli factory
that, using only fresh draws y_1, y_2, ..., accepts with probability P(x)^α: at step i, accept if
y_i = x, otherwise reject with probability α/i, otherwise continue. With q = 1 - P(x) its rejection
probability is Σ_{i≥1} q^i (α/i) Π_{j<i}(1 - α/j) = Σ_{i≥1} q^i α(1-α)_{i-1}/i! = 1 - (1-q)^α,
the binomial series of 1 - P(x)^α. An attempt therefore outputs x with probability P(x)^(n+α), and
restarting on rejection makes the output ∝ P(x)^(1/T).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import numpy
import torch
from torch import Tensor

from ..errors import GenerationError

__all__ = ["QueryPool", "batch_temperature_choice", "batch_temperature_sample", "exact_temperature_sample",
           "exact_temperature_sample_batch", "expected_exact_draws", "lazy_batch_temperature_choice",
           "split_inverse_temperature"]

# 1/T within this relative distance of an integer is that integer: 1/0.5 and 1/(1/3) must give α = 0
# exactly, or Algorithm 1 would run a pointless (and costly) factory for α ≈ 4e-16.
_INTEGER_TOLERANCE = 1e-9

# Factory outcome codes of one attempt after a chunk of steps.
_REJECT, _ACCEPT, _UNRESOLVED = 0, 1, 2


def split_inverse_temperature(temperature: float) -> tuple[int, float]:
    """Return ``(n, α)`` with ``1/temperature = n + α``, ``n ≥ 1`` an integer and ``0 ≤ α < 1``.

    Raises GenerationError unless ``temperature`` is a real number in (0, 1]."""
    try:
        if isinstance(temperature, (bool, str, bytes)):  # float("0.5") / float(True) would "work"
            raise TypeError
        t = float(temperature)  # int, float, numpy or one-element torch scalars
    except (TypeError, ValueError):
        raise GenerationError(
            f"temperature must be a number in (0, 1], got {temperature!r}; pass e.g. temperature=0.5") from None
    if not math.isfinite(t) or t <= 0.0 or t > 1.0:
        raise GenerationError(
            f"temperature must be in (0, 1], got {t}; likelihood-free sampling can only sharpen the "
            "model's distribution (T ≤ 1), and T → 0 needs unboundedly many draws - use e.g. 0.5")
    inv = 1.0 / t
    nearest = round(inv)
    if abs(inv - nearest) <= _INTEGER_TOLERANCE * max(1.0, inv):
        return int(nearest), 0.0
    n = math.floor(inv)
    return n, inv - n


def _factory_reject_prob(alpha: float, i: Tensor | float) -> Tensor | float:
    """Probability that the Bernoulli factory rejects at step ``i`` (1-based) after a mismatch. A separate
    function so tests can swap in a wrong rule (α/(i+1)) and check that the statistical tests reject it."""
    return alpha / i


def _same(a: object, b: object) -> bool:
    """Sample equality: ``torch.equal`` for tensors (``==`` would be elementwise), ``==`` otherwise."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    return bool(a == b)


def exact_temperature_sample(draw: Callable[[], Hashable], temperature: float, generator: torch.Generator | None = None,
                             max_draws: int | None = None) -> tuple[Hashable, int]:
    """Draw one sample from P_T(x) ∝ P(x)^(1/T) using only draws from P (paper Algorithm 1).

    ``draw()`` returns a fresh i.i.d. sample of P; samples are compared with ``==`` (``torch.equal``
    for tensors). The factory's uniforms come from ``generator`` so a seeded run is reproducible
    when ``draw`` is. Returns ``(sample, number of draws used)``; T = 1 costs exactly one draw.

    One attempt: stage 1 draws up to n samples and stops at the first one differing from the first
    (x), which rejects early without changing the result; stage 2 (α > 0) runs the Bernoulli factory
    for P(x)^α described in the module docstring. A rejected attempt restarts stage 1.

    Expected number of draws, with p = P(x) (see :func:`expected_exact_draws`):

    * stage 1, given first draw x: 1 + Σ_{k=0}^{n-2} p^k (draw k+2 happens only if draws 2..k+1
      all equalled x), so E[stage 1] = 1 + Σ_{m=1}^{n-1} Σ_x P(x)^m;
    * stage 2, reached with probability P(x)^n: E[draws | x] = Σ_{i≥1} Π_{j<i} (1-p)(1-α/j)
      = Σ_{k≥0} (1-α)_k (1-p)^k / k! = p^(α-1) ((a)_k the rising factorial; binomial series);
      so E[stage 2] = Σ_x P(x)^(n+α-1) when α > 0, else 0;
    * an attempt accepts with probability A = Σ_x P(x)^(n+α), and attempts are i.i.d., so
      E[total draws] = (E[stage 1] + E[stage 2]) / A.

    ``max_draws`` bounds the total; exceeding it raises GenerationError instead of looping forever
    (e.g. a draw function that never repeats itself at T < 1).
    """
    n, alpha = split_inverse_temperature(temperature)
    if max_draws is not None and (isinstance(max_draws, bool) or not isinstance(max_draws, int) or max_draws < 1):
        raise GenerationError(f"max_draws must be a positive integer or None, got {max_draws!r}")
    used = 0

    def take() -> Hashable:
        nonlocal used
        if max_draws is not None and used >= max_draws:
            raise GenerationError(
                f"exact temperature sampling at T={temperature} used max_draws={max_draws} draws without "
                "accepting; raise max_draws, use a higher temperature, or use batch_temperature_sample")
        used += 1
        return draw()

    while True:
        x = take()
        if not all(_same(take(), x) for _ in range(n - 1)):  # all() stops at the first mismatch
            continue
        if alpha == 0.0:
            return x, used
        i = 1
        while not _same(take(), x):
            if float(torch.rand((), generator=generator, dtype=torch.float64)) < _factory_reject_prob(alpha, i):
                break
            i += 1
        else:
            return x, used


def expected_exact_draws(probs: Tensor | Sequence[float], temperature: float) -> float:
    """Expected number of draws :func:`exact_temperature_sample` uses for the distribution ``probs``.

    ``probs`` is a 1-D probability vector (zeros allowed). Uses the formula in
    :func:`exact_temperature_sample`'s docstring, with the factory's series in closed form (p^(α-1)).
    """
    n, alpha = split_inverse_temperature(temperature)
    p = torch.as_tensor(probs, dtype=torch.float64).flatten()
    if p.numel() == 0 or not torch.isfinite(p).all() or (p < 0).any() or abs(float(p.sum()) - 1.0) > 1e-6:
        raise GenerationError("probs must be a non-empty vector of non-negative probabilities summing to 1")
    p = p[p > 0]
    stage1 = 1.0 + sum(float((p**m).sum()) for m in range(1, n))
    stage2 = float((p ** (n + alpha - 1.0)).sum()) if alpha > 0.0 else 0.0
    return (stage1 + stage2) / float((p ** (n + alpha)).sum())


# Vectorised exact sampler ---------------------------------------------------------------------


def _uniforms(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64, device=gen_device).to(device)


def _run_factories(y: Tensor, x: Tensor, start: Tensor, alpha: float, generator: torch.Generator | None) -> Tensor:
    """Run Bernoulli factories for P(x)^α for a chunk of L steps, all in parallel.

    ``y`` [B, F, L, D] fresh draws, ``x`` [B, F, D] the values under test, ``start`` [B, F] the
    1-based factory index of the chunk's first step. Returns status [B, F]: accept / reject at the
    first terminating step, or unresolved if none of the L steps terminated.
    """
    match = (y == x.unsqueeze(2)).all(-1)  # [B, F, L]
    index = (start.unsqueeze(-1) + torch.arange(y.shape[2], device=y.device)).to(torch.float64)
    coin = _uniforms(match.shape, generator, y.device) < _factory_reject_prob(alpha, index)
    terminal = match | coin  # a match accepts even when the coin would have rejected
    first = terminal.to(torch.uint8).argmax(-1, keepdim=True)  # first terminating step
    status = torch.where(match.gather(-1, first).squeeze(-1), _ACCEPT, _REJECT)
    return torch.where(terminal.any(-1), status, torch.full_like(status, _UNRESOLVED))


class _ExactBatch:
    """Per-position bookkeeping of :func:`exact_temperature_sample_batch` (flags and counts on the CPU)."""

    def __init__(self, draw: Callable[[int, Tensor], Tensor], num_positions: int, n: int, alpha: float,
                 generator: torch.Generator | None) -> None:
        self.draw, self.n, self.alpha, self.generator = draw, n, alpha, generator
        self.done = torch.zeros(num_positions, dtype=torch.bool)  # [P] the sample is in `out`
        # [P] an attempt whose factory ran out of steps is continued next round, from factory index pend_next
        self.pending = torch.zeros(num_positions, dtype=torch.bool)
        self.pend_next = torch.ones(num_positions, dtype=torch.long)
        self.draws = torch.zeros(num_positions, dtype=torch.long)  # [P] every sample drawn for the position
        self.out: Tensor | None = None  # [P, D] samples (rows flattened), on the draw's device; made at the first draw
        self.pend_x: Tensor | None = None  # [P, D] the pending attempt's value
        self.trail: tuple[int, ...] = ()  # the shape of one sample

    def fetch(self, m: int, idx: Tensor) -> Tensor:
        """m fresh samples for the positions idx, flattened to [len(idx), m, D]."""
        y = self.draw(m, idx)
        if not isinstance(y, Tensor) or y.dim() < 2 or y.shape[0] != idx.numel() or y.shape[1] != m:
            raise GenerationError(
                f"draw returned {tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}, expected shape "
                f"({idx.numel()}, {m}, ...): one row per requested position and m samples per row")
        if self.out is None:
            self.trail = tuple(y.shape[2:])
            self.out = torch.zeros(self.done.numel(), math.prod(self.trail), dtype=y.dtype, device=y.device)
            self.pend_x = torch.zeros_like(self.out)
        elif tuple(y.shape[2:]) != self.trail:
            raise GenerationError(f"draw changed the sample shape from {self.trail} to {tuple(y.shape[2:])}")
        self.draws[idx] += m
        return y.reshape(y.shape[0], m, -1)

    def finish(self, idx: Tensor, values: Tensor) -> None:
        self.done[idx] = True
        self.out[idx.to(values.device)] = values  # type: ignore[index]


def _decide(st: _ExactBatch, idx: Tensor, cand: Tensor, valid: Tensor, start: Tensor, steps: int) -> None:
    """Run ``steps`` factory steps, from factory index ``start`` [B], for the candidates ``cand`` [B, F, D]
    (``valid`` [B, F]) of the positions ``idx``. At each position the first valid candidate that does not
    reject decides: accepted, or pending (continued next round) when its factory ran out of steps."""
    num_b, num_f = valid.shape
    y = st.fetch(num_f * steps, idx).reshape(num_b, num_f, steps, -1)
    status = _run_factories(y, cand, start.to(y.device)[:, None].expand(num_b, num_f), st.alpha, st.generator)
    decisive = valid & (status != _REJECT)
    got = decisive.any(1)
    pick = decisive.to(torch.uint8).argmax(1, keepdim=True)
    first = status.gather(1, pick).squeeze(1)
    value = cand.gather(1, pick.unsqueeze(-1).expand(-1, -1, cand.shape[-1])).squeeze(1)
    acc = got & (first == _ACCEPT)
    st.finish(idx[acc.cpu()], value[acc])
    unresolved = (got & (first == _UNRESOLVED)).cpu()
    st.pending[idx] = unresolved
    st.pend_next[idx[unresolved]] = start[unresolved] + steps
    st.pend_x[idx[unresolved].to(y.device)] = value[unresolved.to(y.device)]  # type: ignore[index]


def _continue_pending(st: _ExactBatch, factory_steps: int) -> None:
    """Pending factories go first: they come before any attempt not yet started. Each gets as many steps
    as it has run so far (its length doubles)."""
    pidx = st.pending.nonzero().squeeze(1)
    if pidx.numel():
        start = st.pend_next[pidx]
        value = st.pend_x[pidx.to(st.pend_x.device)].unsqueeze(1)  # type: ignore[union-attr]
        valid = torch.ones(pidx.numel(), 1, dtype=torch.bool, device=value.device)
        _decide(st, pidx, value, valid, start, max(factory_steps, int(start.max()) - 1))


def _fresh_attempts(st: _ExactBatch, proposals: int, factory_steps: int, candidates: int) -> None:
    """New attempts for the positions with nothing pending: stage 1 (n draws each), then (α > 0) factories
    for the first ``candidates`` passers in attempt order (a predictable selection)."""
    fidx = (~st.done & ~st.pending).nonzero().squeeze(1)
    if not fidx.numel():
        return
    if st.n == 1:  # every attempt passes stage 1, and only the first `candidates` are used
        proposals = 1 if st.alpha == 0.0 else min(proposals, candidates)
    y = st.fetch(proposals * st.n, fidx).reshape(fidx.numel(), proposals, st.n, -1)
    x = y[:, :, 0]  # [Pf, A, D]
    passed = (y == x.unsqueeze(2)).all(-1).all(-1)  # [Pf, A]
    if st.alpha == 0.0:  # stage 1 is the whole attempt: the first passer wins
        has = passed.any(1)
        first = passed.to(torch.uint8).argmax(1)
        st.finish(fidx[has.cpu()], x[has, first[has]])
        return
    order = torch.arange(proposals, device=x.device) + proposals * ~passed  # passers first, in attempt order
    slot = order.sort(1).values[:, : min(candidates, proposals)]  # [Pf, F]
    valid = slot < proposals
    has = valid[:, 0]
    if bool(has.any()):
        sidx = fidx[has.cpu()]
        cand = x[has].gather(1, (slot[has] % proposals).unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, F, D]
        _decide(st, sidx, cand, valid[has], torch.ones_like(sidx), factory_steps)


def exact_temperature_sample_batch(draw: Callable[[int, Tensor], Tensor], num_positions: int, temperature: float,
                                   generator: torch.Generator | None = None, proposals_per_round: int = 32,
                                   max_rounds: int = 10_000, factory_steps: int = 8,
                                   factory_candidates: int = 4) -> tuple[Tensor, Tensor]:
    """Exact temperature sampling (Algorithm 1) for ``num_positions`` positions at once.

    ``draw(m, active)`` returns a tensor [len(active), m, ...] of m fresh i.i.d. samples for each position
    in the CPU int64 tensor ``active``, so finished positions stop costing draws. A sample is everything
    after the first two dims (e.g. K token ids) and two samples are equal when all those entries are.
    Returns ``(samples [num_positions, ...], draws [num_positions])`` where ``draws`` counts every sample
    drawn for the position (including parallel attempts that were discarded), i.e. the real cost.

    Each round, per unfinished position: ``proposals_per_round`` stage-1 attempts (n draws each)
    are checked at once; the first ``factory_candidates`` that passed, in attempt order, get a
    Bernoulli factory of ``factory_steps`` fresh draws each, all run in parallel. The position's
    result is decided by the first attempt (in that fixed order) that does not reject: if it
    accepted, the position is done; if its factory ran out of steps, that attempt stays pending and
    is continued alone next round (chunk length doubling) before any later attempt is looked at.

    Why this is still exact: every attempt is an independent copy of the same random experiment
    (its own stage-1 and factory draws and uniforms). Whether an attempt is considered at all, and
    its place in the order, depend only on attempts *before* it (how many passers came earlier,
    whether an earlier one is pending), never on its own draws, so the considered attempts form an
    i.i.d. sequence of Algorithm-1 attempts; the first success in a predetermined order of i.i.d.
    trials is distributed as a single trial conditioned on success, i.e. as P(x)^(1/T) normalised.
    Picking the *fastest* success instead would bias towards frequent x (short factories).

    Raises GenerationError if some position is still unfinished after ``max_rounds`` rounds.
    """
    n, alpha = split_inverse_temperature(temperature)
    counts = {"num_positions": num_positions, "proposals_per_round": proposals_per_round, "max_rounds": max_rounds,
              "factory_steps": factory_steps, "factory_candidates": factory_candidates}
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GenerationError(f"{name} must be a positive integer, got {value!r}")
    st = _ExactBatch(draw, num_positions, n, alpha, generator)
    for _ in range(max_rounds):
        if bool(st.done.all()):
            break
        _continue_pending(st, factory_steps)
        _fresh_attempts(st, proposals_per_round, factory_steps, factory_candidates)
    if not bool(st.done.all()):
        raise GenerationError(
            f"exact temperature sampling at T={temperature}: {int((~st.done).sum())} of {num_positions} positions "
            f"still unfinished after max_rounds={max_rounds}; raise max_rounds or proposals_per_round, use a "
            "higher temperature, or use batch_temperature_sample")
    return st.out.reshape(num_positions, *st.trail), st.draws  # type: ignore[union-attr]


# Batch approximation (Algorithm 2) ------------------------------------------------------------


def _as_rows(pool: Tensor) -> Tensor:
    """[P, N, ...] pool as [P, N, D] rows; raises GenerationError for a malformed pool."""
    if not isinstance(pool, Tensor) or pool.dim() < 2:
        raise GenerationError("pool must be a tensor [positions, N, ...] of N samples per position")
    if pool.shape[0] == 0 or pool.shape[1] == 0 or pool[0, 0].numel() == 0:
        raise GenerationError(f"pool {tuple(pool.shape)} is empty; give at least one sample per position")
    return pool.reshape(pool.shape[0], pool.shape[1], -1)


def _pack_rows(rows: Tensor, num_values: int | None = None) -> Tensor | None:
    """[P, N, D] rows as [P, N] keys that are equal exactly when the rows are, or None if the rows
    are not integers or their value ranges do not fit one int64 (then rows are sorted column-wise).

    ``num_values``: the entries are known to lie in [0, num_values) (token ids), so the radix needs no
    look at the data: no device-to-host transfer on GPUs."""
    dims = rows.shape[-1]
    if dims == 1:
        return rows[..., 0]
    if rows.dtype.is_floating_point or rows.dtype.is_complex:
        return None
    rows = rows.long()
    if num_values is not None:
        lows, spans = [0] * dims, [num_values] * dims
    else:
        lo, hi = (int(v) for v in rows.aminmax())
        lows, spans = [lo] * dims, [hi - lo + 1] * dims  # one radix for all columns: the common case
        if (hi - lo + 1) ** dims > 2**63:  # per-column ranges (a mixed radix) may still fit
            low, high = torch.aminmax(rows.reshape(-1, dims), dim=0)
            lows = low.tolist()
            spans = [b - a + 1 for a, b in zip(lows, high.tolist())]
    if math.prod(spans) > 2**63:  # e.g. 4 ids of a 128k vocabulary: column-wise sort
        return None
    # Horner, last column least significant, with Python-int digits (no host-to-device copy); no overflow
    # since every key is below the product of the spans.
    key = rows[..., 0] - lows[0]
    for d in range(1, dims):
        key = key * spans[d] + (rows[..., d] - lows[d])
    return key


@functools.lru_cache(maxsize=64)
def _group_log_weights(pool_size: int, n: int, alpha: float) -> numpy.ndarray:
    """log w(c) for c = 0..pool_size: log Γ(c+1) - log Γ(c+1-τ) for c ≥ n, -inf below (τ = n + α)."""
    table = numpy.full(pool_size + 1, -math.inf)
    for c in range(n, pool_size + 1):
        table[c] = math.lgamma(c + 1) - math.lgamma(c + 1 - (n + alpha))
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=64)
def _log_weight_table(pool_size: int, n: int, alpha: float, device: torch.device) -> Tensor:
    """_group_log_weights as a tensor kept on ``device`` (copied there once, not at every step)."""
    return torch.from_numpy(_group_log_weights(pool_size, n, alpha).copy()).to(device)


def _sorted_counts(rows: Tensor, num_values: int | None = None) -> tuple[Tensor, Tensor]:
    """For rows [P, N, D]: ``counts`` [P, N], the number of occurrences of the row at each sorted
    place, and ``perm`` [P, N] sorting each position's pool so that equal rows are adjacent. Exact."""
    key = _pack_rows(rows, num_values)
    if key is not None:
        ordered, perm = key.sort(dim=1)
        differs = ordered[:, 1:] != ordered[:, :-1]
    else:  # lexicographic: stable sorts by each column, last column first
        num_p, num_n, dims = rows.shape
        perm = torch.arange(num_n, device=rows.device).expand(num_p, num_n)
        for d in reversed(range(dims)):
            perm = perm.gather(1, rows[:, :, d].gather(1, perm).sort(dim=1, stable=True).indices)
        ordered_rows = rows[torch.arange(num_p, device=rows.device).unsqueeze(1), perm]
        differs = (ordered_rows[:, 1:] != ordered_rows[:, :-1]).any(-1)
    new = torch.ones(perm.shape, dtype=torch.bool, device=perm.device)
    new[:, 1:] = differs
    group = new.cumsum(1) - 1
    sizes = torch.zeros(perm.shape, dtype=torch.long, device=perm.device).scatter_add_(1, group, torch.ones_like(group))
    return sizes.gather(1, group), perm


def _sorted_log_weights(pool: Tensor, temperature: float, num_values: int | None = None) -> tuple[Tensor, Tensor]:
    """Log selection weight of every pool entry in sorted order [P, N] (-inf: never chosen), and
    the sorting permutation. See batch_temperature_sample for the rule."""
    n, alpha = split_inverse_temperature(temperature)
    counts, perm = _sorted_counts(_as_rows(pool), num_values)
    table = _log_weight_table(pool.shape[1], n, alpha, counts.device)
    # A value's weight is split evenly over its c occurrences (- log c).
    log_w = table.take(counts) - counts.double().log()
    # Fallback when no value occurs n times: τ = largest count c_max, so only the values with c_max
    # occurrences have weight (C(c_max, c_max) = 1 each).
    top = counts.max(1, keepdim=True).values
    fallback = torch.where(counts == top, -counts.double().log(), -math.inf)
    return torch.where(top >= n, log_w, fallback), perm


def _selection_probs(pool: Tensor, temperature: float) -> Tensor:
    """Probability [P, N] that :func:`batch_temperature_sample` returns each pool entry (pool order)."""
    log_w, perm = _sorted_log_weights(pool, temperature)
    return torch.empty_like(log_w).scatter_(1, perm, torch.softmax(log_w, dim=1))


def _sample_torch(pool: Tensor, temperature: float, u: Tensor, num_values: int | None = None) -> Tensor:
    """Pool index chosen per position [P] (any device): inverse CDF over per-entry weights. With
    ``num_values`` given it runs entirely on the pool's device, without synchronising."""
    log_w, perm = _sorted_log_weights(pool, temperature, num_values)
    cdf = (log_w - log_w.max(1, keepdim=True).values).exp().cumsum(1)
    place = (cdf <= u.to(cdf.device).unsqueeze(1) * cdf[:, -1:]).sum(1, keepdim=True).clamp_max(cdf.shape[1] - 1)
    return perm.gather(1, place).squeeze(1)


def _pack_numpy(rows: numpy.ndarray) -> numpy.ndarray | None:
    """numpy twin of _pack_rows for CPU pools [P, N, D]: keys [P, N] equal exactly when rows are."""
    dims = rows.shape[-1]
    if dims == 1:
        return rows[..., 0]
    if rows.dtype.kind == "b":
        rows = rows.astype(numpy.uint8)
    if rows.dtype.kind not in "iu":
        return None
    lo, hi = int(rows.min()), int(rows.max())
    span = hi - lo + 1
    width = next(w for w in (1, 2, 4, 8) if span <= 2 ** (8 * w))
    if width * dims in (1, 2, 4, 8):
        # Offset ids fit `width` bytes and a whole row fits 8: view each row's bytes as one integer.
        # (rows - lo) may wrap in rows' own dtype, but modulo 2^(8·width) the digit is still right.
        fits = lo >= 0 and hi < 2 ** (8 * width)  # e.g. token ids: no offset needed
        digits = (rows if fits else rows - rows.dtype.type(lo)).astype(f"u{width}")
        return numpy.ascontiguousarray(digits).view(f"u{width * dims}")[..., 0]
    if span**dims > 2**63:
        return None
    key = rows[..., 0].astype(numpy.int64) - lo
    for d in range(1, dims):
        key = key * span + (rows[..., d].astype(numpy.int64) - lo)
    return key


def _sample_numpy(key: numpy.ndarray, n: int, alpha: float, u: numpy.ndarray) -> numpy.ndarray:
    """Pool index chosen per position [P] for CPU keys [P, N], with one flat pass over the groups.

    Same rule as _sample_torch, several times faster at N = 200: numpy sorts short rows ~10x
    faster than torch on CPU, and weights are handled once per distinct value, not per entry.
    """
    num_p, num_n = key.shape
    # Sort values only (3x cheaper than argsort); the chosen value is located in the pool at the end.
    ordered = numpy.sort(key, axis=1).ravel()
    new = numpy.empty(ordered.shape, dtype=bool)
    new[0] = True
    numpy.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    new[::num_n] = True  # a group never spans two positions
    starts = numpy.flatnonzero(new)  # flat sorted index of each group's first entry
    sizes = numpy.diff(starts, append=ordered.size)  # its count c
    row = starts // num_n
    first = numpy.searchsorted(starts, numpy.arange(num_p) * num_n)  # first group of each position
    last = numpy.append(first[1:], starts.size) - 1
    top = numpy.maximum.reduceat(sizes, first)
    table = _group_log_weights(num_n, n, alpha)
    fallback = top < n
    # Normalise by each position's largest weight, w(c_max) (w increases with c), so exp() ≤ 1.
    log_w = table[sizes] - numpy.where(fallback, 0.0, table[top])[row]
    if fallback.any():  # τ = c_max there: only the most repeated values, equally
        log_w = numpy.where(fallback[row], numpy.where(sizes == top[row], 0.0, -math.inf), log_w)
    cum = numpy.cumsum(numpy.exp(log_w))
    base = numpy.where(first > 0, cum[first - 1], 0.0)
    chosen = numpy.searchsorted(cum, base + u * (cum[last] - base), side="right")
    # Float rounding can put the target at the row's end: clamp to its last group of positive weight.
    chosen = numpy.minimum(chosen, numpy.searchsorted(cum, cum[last], side="left"))
    picked = ordered[starts[chosen]]
    return (key == picked[:, None]).argmax(1)  # first pool entry holding the chosen value


def batch_temperature_sample(pool: Tensor, temperature: float, generator: torch.Generator | None = None,
                             num_values: int | None = None, use_numpy: bool = True) -> Tensor:
    """Approximate temperature sampling from a fixed pool of draws (paper Algorithm 2), vectorised.

    ``pool`` [P, N, ...] holds N i.i.d. draws of P(·) per position; a sample is everything after the
    first two dims (a scalar for a 2-D pool, a row of K token ids for [P, N, K]) and samples are
    equal when all their entries are. Returns one sample per position, shape [P, ...].

    Rule, with 1/T = τ = n + α and c(x) the number of times x occurs in the position's pool: pick a
    distinct x with probability ∝ w(c(x)), w(c) = Γ(c+1)/Γ(c+1-τ) for c ≥ n, 0 otherwise.

    * Integer τ = n: w(c) = n!·C(c, n), the paper's rule (count the n-subsets of identical draws);
      E[C(c, n)] = C(N, n)·P(x)^n exactly, so numerator and normaliser are unbiased and the output
      converges to P^n/Z with O(1/N) bias. τ = 1 picks a pool entry uniformly.
    * Non-integer τ: no unbiased estimator of P(x)^τ from a binomial count exists (only polynomials
      of degree ≤ N are estimable), so we use the analytic continuation of the falling factorial.
      Since Γ(c+1)/Γ(c+1-τ) = c^τ (1 + O(1/c)), w(c(x))/N^τ → P(x)^τ as N → ∞: consistent, exact in
      the integer limit, continuous in T. Randomising between n and n+1 instead would converge to a
      mixture of P^n and P^(n+1), not to P^τ.
    * Fallback: if no value occurs ≥ n times, τ is replaced by the largest count c_max (the paper's
      n-1, ..., 1 fallback): the most repeated values are chosen uniformly, and an all-distinct pool
      gives a uniform draw from the pool.

    On CPU the counting runs in numpy (rows packed into one integer key, sorted per position) unless
    ``use_numpy=False``; elsewhere in torch. Both apply the same rule (tested on both paths).
    ``num_values``: entries are integers in [0, num_values) (e.g. the vocabulary size), which lets the GPU
    path run without any host-device synchronisation. Randomness: one uniform per position from ``generator``.
    """
    flat = batch_temperature_choice(pool, temperature, generator, num_values, use_numpy)
    flat = flat + torch.arange(0, pool.shape[0] * pool.shape[1], pool.shape[1], device=pool.device)
    return pool.reshape(-1, *pool.shape[2:]).index_select(0, flat)


def batch_temperature_choice(pool: Tensor, temperature: float, generator: torch.Generator | None = None,
                             num_values: int | None = None, use_numpy: bool = True) -> Tensor:
    """The pool index [P] that :func:`batch_temperature_sample` picks at each position (same rule, same
    randomness). Only the equality pattern of the pool matters, so a pool of stand-in keys works too."""
    n, alpha = split_inverse_temperature(temperature)
    rows = _as_rows(pool)
    u = _uniforms((pool.shape[0],), generator, pool.device)  # one per position, the same on every path
    key = None
    if use_numpy and pool.device.type == "cpu":
        try:
            key = _pack_numpy(rows.detach().numpy())
        except TypeError:  # dtypes numpy lacks (bfloat16...): torch path
            pass
        if key is not None and key.dtype.kind == "f" and numpy.isnan(key).any():
            key = None  # NaN ≠ NaN: the value lookup at the end needs equality, the torch path does not
    if key is not None:
        return torch.from_numpy(_sample_numpy(key, n, alpha, u.numpy()))
    return _sample_torch(pool, temperature, u, num_values).to(pool.device)


# Batch approximation on a pool compared on demand ---------------------------------------------


class QueryPool(Protocol):
    """N draws at each of P positions whose equality is found on demand; entry ``p * N + i`` is draw i of
    position p (e.g. ``models.pool.DrawPool``, which decodes a chunk only as far as comparing it needs)."""

    num_positions: int
    pool_size: int

    def same(self, a: Tensor, b: Tensor) -> Tensor:
        """[M] bool: entries a[m] and b[m] (of one position) are equal."""

    def keys(self, positions: Tensor) -> Tensor:
        """[len(positions), N, ...] rows with the equality pattern of those positions' pools."""


def lazy_batch_temperature_choice(pool: QueryPool, temperature: float, generator: torch.Generator | None = None,
                                  tries_per_round: int = 32, max_rounds: int = 1) -> Tensor:
    """The pool index [P] chosen at each position by :func:`batch_temperature_sample`'s rule, with the same
    distribution, from a pool whose entries are compared on demand: random tuples first, counting if needed.

    For an integer 1/T = n the rule picks a distinct value x with probability ∝ c(c-1)···(c-n+1), c its count
    in the pool: N^n times the probability that n entries drawn uniformly with replacement are distinct and
    all equal x. So each try draws n entries, and the first try (in a fixed order) whose entries are distinct
    and equal gives the sample. The tries are i.i.d. given the pool, and the first success in a predetermined
    order of i.i.d. trials is distributed as one trial conditioned on success: the rule's distribution.

    Each round makes ``tries_per_round`` tries per open position. A position without a success after
    ``max_rounds`` rounds counts its whole pool instead (:func:`batch_temperature_choice` on ``pool.keys``).
    That is exact too: whether to stop depends only on tries already made, never on later ones, and the
    count-based choice has the rule's distribution whatever they were. A pool where a chunk repeats often
    (predictable text) is settled by a few comparisons, without counting the rest; in an all-distinct pool
    (the rule's fallback: a uniform entry) the tries fail and the pool is counted, which reuses what they
    decoded. Non-integer 1/T (weights that count no tuples) always counts the pool; n = 1 is a uniform entry,
    nothing compared. Randomness comes from ``generator`` (CPU).
    """
    n, alpha = split_inverse_temperature(temperature)
    num_p, num_n = pool.num_positions, pool.pool_size
    for name, value in {"tries_per_round": tries_per_round, "max_rounds": max_rounds}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GenerationError(f"{name} must be a non-negative integer, got {value!r}")
    if n == 1 and alpha == 0.0:  # τ = 1: every entry has weight 1
        return torch.randint(num_n, (num_p,), generator=generator)
    choice = torch.zeros(num_p, dtype=torch.long)
    open_ = torch.arange(num_p)  # positions without a sample yet
    for _ in range(max_rounds if alpha == 0.0 else 0):
        if not open_.numel():
            break
        tries = torch.randint(num_n, (open_.numel(), tries_per_round, n), generator=generator)
        ordered = tries.sort(-1).values
        alive = (ordered[..., 1:] != ordered[..., :-1]).all(-1)  # [P', tries] n distinct entries
        entries = tries + (open_ * num_n)[:, None, None]
        for k in range(1, n):  # entry k against entry 0, only while all earlier ones matched
            where = alive.nonzero(as_tuple=True)
            if not where[0].numel():
                break
            alive[where] = pool.same(entries[..., 0][where], entries[..., k][where]).cpu()
        won = alive.any(1)
        first = alive.to(torch.uint8).argmax(1)
        choice[open_[won]] = tries[won, first[won], 0]
        open_ = open_[~won]
    if open_.numel():
        choice[open_] = batch_temperature_choice(pool.keys(open_), temperature, generator).cpu()
    return choice
