"""BrierLM (paper §4): a likelihood-free language-model metric from two samples per position.

Brier(P, y) = 2 P(y) - Σ_x P(x)². With two independent draws x1, x2 ~ P the quantity
1{x1=y} + 1{x2=y} - 1{x1=x2} is an unbiased estimate of it, so a model that can only *sample*
(CALM) is scored exactly like one that has a softmax. Brier-n applies this to the n-gram that
starts at a position, given the true prefix; BrierLM = 100 · (Brier-1 · ... · Brier-4)^(1/4)
(reported as 0 when some Brier-n ≤ 0, where the geometric mean is undefined).

Protocol implemented here:

* CALM (any K): positions are chunk starts. One backbone pass over a block gives the hidden state of
  every chunk; two independent next chunks are drawn at each. For n ≤ K the first n tokens are compared.
  For K < 4, an n-gram that crosses a chunk boundary is completed by *continuing generation from each
  sample independently*: every position's sampled chunk is appended to its own true prefix and the next
  chunk is drawn from the resulting hidden state, for all positions of the block in one batched
  pass of the backbone over the KV cache of the block (see :class:`Continuations`).
* Baseline: every token position. The accuracy term uses the exact teacher-forced probability
  P(y_{t+1..t+n}) (no sampling). The collision term samples two continuations of n-1 tokens and, when
  they agree, adds Σ_v p(v | prefix, sampled n-1 tokens)², the exact collision probability of the last
  token: E = Σ_a P(a)² Σ_v p(v|a)² = Σ_x P(x)², unbiased with a lower variance than 1{x1=x2}.
* An n-gram is scored at a position only when it lies inside the block, so Brier-n for larger n counts
  slightly fewer positions (``count_n``).

The block size matters: the context length changes BrierLM substantially (an independent reproduction
measured about 30 % between short and long blocks), so every report states ``block_size`` and
``num_tokens``. The paper's set-up is WikiText-103 test, documents concatenated and cut into blocks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.corpus import iter_blocks, token_blocks
from ..errors import ConfigError, DataError
from ..sampling.generation import chunk_sampler
from ..distributed import all_reduce, rank_and_world
from .mode import eval_mode

MAX_N = 4  # BrierLM combines Brier-1 .. Brier-4
_HEAD_ROWS = 4096  # positions per slice of the CALM temperature pools
_HEAD_ELEMENTS = 1 << 26  # rows x vocabulary per slice through the LM head (bounds the float32 logits)


class Continuable(Protocol):
    """What the estimators need: hidden states of true prefixes and their extension by sampled chunks.

    ``start(ids (B, N*K))`` -> (hidden (B, N, ...), state): the hidden state after every chunk of the block.
    ``extend(state, chunks (S, B, N, K))`` -> hidden (S, B, N, ...): for every position j, the hidden state
    after the true chunks 0..j followed by the chunks passed to previous ``extend`` calls and these ones (each
    of the S rows continues on its own). K = ``chunk_size``, 1 for a token-level model. Then either
    ``sample_chunks(hidden, num_samples=None, generator=None)`` -> (..., K) or (num_samples, ..., K), a
    sampler of the next chunk (CALM: scored from two samples), or ``head(hidden rows (R, ...))`` -> next-token
    logits (R, V) (baseline: scored with exact probabilities)."""

    chunk_size: int

    def start(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    def extend(self, state: Any, chunks: torch.Tensor) -> torch.Tensor: ...


@dataclass
class _Branches:
    """A cached block and how many continuation steps have been appended to its (copied) cache."""

    cache: Any  # backbone.KVCache: the block's B rows, then S*B rows (sample-major) once continued
    steps: int = 0


class Continuations:
    """:class:`Continuable` for a CALM or baseline model: every position of a block continues at once through
    the backbone's own forward, over the block's KV cache with a tree-shaped attention mask."""

    def __init__(self, model: Any, compile: bool = False) -> None:
        self.model, self.kind = model, model.config.kind
        self.chunk_size = int(model.config.chunk_size) if self.kind == "calm" else 1
        if self.kind == "calm":  # scored from two samples of the next chunk (compile: head + decoder compiled)
            self.sample_chunks = chunk_sampler(model, compile)
        else:  # scored with exact next-token probabilities
            self.head = model.lm_head

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_chunks(ids) if self.kind == "calm" else self.model.backbone.embed_tokens(ids)

    def start(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, _Branches]:
        cache = self.model.backbone.new_cache(input_ids.shape[0], input_ids.shape[1] // self.chunk_size)
        return self.model.backbone(self._embed(input_ids), cache), _Branches(cache)

    def extend(self, state: _Branches, chunks: torch.Tensor) -> torch.Tensor:
        """Entry j of each row sits at position j + step and sees the true positions 0..j and its own earlier
        continuation entries only: one forward of S*B sequences of N positions, not one per position."""
        s, b, n, k = chunks.shape
        if state.steps == 0:  # one copy of the block per sample, room for every step Brier-MAX_N can take
            state.cache = state.cache.repeat(s, (MAX_N - 1) * n)
        if state.cache.batch_size != s * b or n != state.cache.length // (state.steps + 1):
            raise ValueError(f"continuation input {tuple(chunks.shape)} does not match the cached block")
        state.steps += 1
        device = chunks.device
        own = [torch.eye(n, dtype=torch.bool, device=device)] * state.steps  # each entry sees its own earlier ones
        mask = torch.cat([torch.ones(n, n, dtype=torch.bool, device=device).tril(), *own], 1)
        positions = torch.arange(n, device=device) + state.steps
        hidden = self.model.backbone(self._embed(chunks.reshape(s * b, n * k)), state.cache, positions, mask)
        return hidden.view(s, b, n, -1)


def _unwrap(model: Any) -> Any:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner


def continuable(model: Any, compile: bool = False) -> tuple[Any, str]:
    """(the :class:`Continuable` to score, "calm" or "baseline") for a model or a Continuable stand-in."""
    model = _unwrap(model)
    if getattr(getattr(model, "config", None), "kind", None) in ("calm", "baseline"):
        view = Continuations(model, compile)
        return view, view.kind
    if hasattr(model, "start") and hasattr(model, "extend"):
        if hasattr(model, "sample_chunks"):
            return model, "calm"
        if hasattr(model, "head"):
            return model, "baseline"
    raise ConfigError(f"cannot evaluate a {type(model).__name__}: BrierLM needs a CALM or baseline model "
                      "(an autoencoder alone is not a language model; evaluate it with `calm eval-ae`)")


# -- the estimators on one batch of blocks -----------------------------------------------------------------

def _empty_sums() -> dict[str, list[float]]:
    return {"acc": [0.0] * MAX_N, "coll": [0.0] * MAX_N, "count": [0.0] * MAX_N,
            "chunk": [0.0, 0.0, 0.0]}  # chunk accuracy sum, chunk collision sum, chunk count


@torch.no_grad()
def calm_brier_sums(sampler: Continuable, ids: torch.Tensor, generator: torch.Generator | None = None,
                    max_n: int = MAX_N) -> dict[str, list[float]]:
    """Per-n sums of the two-sample estimator over the chunk positions of the blocks ``ids`` (B, L).

    Position j (chunk j's hidden state) predicts the tokens from (j+1)K on; it is scored for n when the
    n-gram ends inside the block. ``acc`` sums (1{x1=y}+1{x2=y})/2, ``coll`` sums 1{x1=x2}."""
    k = sampler.chunk_size
    hidden, state = sampler.start(ids)  # (B, N, d)
    x = sampler.sample_chunks(hidden, num_samples=2, generator=generator)  # (2, B, N, K)
    drawn = [x]
    for _ in range(math.ceil(max_n / k) - 1):  # K < 4: each sample continues on its own, for all positions at once
        hidden = sampler.extend(state, x)  # (2, B, N, d)
        x = sampler.sample_chunks(hidden, generator=generator)  # (2, B, N, K)
        drawn.append(x)
    seq = torch.cat(drawn, -1).to(ids.device)  # (2, B, N, ceil(max_n/K)*K)
    width = max(max_n, k)
    target = F.pad(ids, (0, width), value=-1)[:, k:].unfold(1, width, k)  # (B, N, width): true tokens after chunk j
    room = ids.shape[1] - k * torch.arange(1, target.shape[1] + 1, device=ids.device)  # (N,): tokens after chunk j

    def terms(n: int) -> list[float]:
        ok = (room >= n).expand(ids.shape[0], -1)  # (B, N): the n-gram ends inside the block
        hit = (seq[..., :n] == target[..., :n]).all(-1).float()  # (2, B, N)
        same = (seq[0, ..., :n] == seq[1, ..., :n]).all(-1).float()
        return [float((hit.mean(0) * ok).sum()), float((same * ok).sum()), float(ok.sum())]

    sums = _empty_sums()
    for n in range(1, max_n + 1):
        sums["acc"][n - 1], sums["coll"][n - 1], sums["count"][n - 1] = terms(n)
    sums["chunk"] = terms(k)
    return sums


def _head_stats(scorer: Continuable, hidden: torch.Tensor, num_draws: int, generator: torch.Generator | None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For hidden (..., d): Σ_v p(v)² (...), ``num_draws`` samples (..., num_draws), and p(target) (...) if given.

    Rows go through the head in slices so the (rows, V) logits stay small."""
    lead = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    sq, draws, pt = [], [], []
    s, rows = 0, 1  # the first slice is one row; its width (the vocabulary) sizes the others
    while s < flat.shape[0]:
        probs = scorer.head(flat[s:s + rows]).float().softmax(-1)
        sq.append(probs.square().sum(-1))
        on_gen = probs.to(generator.device) if generator is not None else probs
        draws.append(torch.multinomial(on_gen, num_draws, replacement=True, generator=generator).to(probs.device))
        if targets is not None:
            t = targets.reshape(-1)[s:s + len(probs)].to(probs.device)
            pt.append(probs.gather(-1, t.clamp_min(0)[:, None]).squeeze(-1))
        s += len(probs)
        rows = max(1, _HEAD_ELEMENTS // probs.shape[-1])
    p_target = torch.cat(pt).view(lead) if targets is not None else None
    return torch.cat(sq).view(lead), torch.cat(draws).view(*lead, num_draws), p_target


@torch.no_grad()
def baseline_brier_sums(scorer: Continuable, ids: torch.Tensor, generator: torch.Generator | None = None,
                        max_n: int = MAX_N) -> dict[str, list[float]]:
    """Per-n sums over the token positions t of the blocks ``ids`` (B, L) (prefix ids[:, :t+1]).

    ``acc`` sums the exact P(y_{t+1..t+n}); ``coll`` sums 1{x1_{<n} = x2_{<n}} · Σ_v p(v | prefix, x1_{<n})²."""
    b, length = ids.shape
    hidden, state = scorer.start(ids)  # (B, T, d)
    nxt = F.pad(ids[:, 1:], (0, 1), value=-1)  # (B, T): the next token, -1 past the block
    sumsq0, x, p_true = _head_stats(scorer, hidden, 2, generator, nxt)  # (B,T), (B,T,2), (B,T)
    x = x.permute(2, 0, 1)  # (2, B, T): first token of each continuation
    sumsq = [sumsq0]  # sumsq[m]: Σ_v p(v | prefix, x1_{1..m})², (B, T)
    drawn = [x]
    for m in range(1, max_n):
        hidden = scorer.extend(state, x[..., None])  # (2, B, T, d)
        if m == max_n - 1:  # the last step only needs sample 1's collision probability
            sumsq.append(_head_stats(scorer, hidden[0], 1, generator)[0])
        else:
            sq, x, _ = _head_stats(scorer, hidden, 1, generator)
            x = x.squeeze(-1)
            drawn.append(x)
            sumsq.append(sq[0])
    conts = torch.stack(drawn, -1).to(ids.device)  # (2, B, T, max_n-1)
    log_q = p_true.double().clamp_min(1e-300).log()  # (B, T): log p(y_{t+1} | y_{<=t})
    positions = torch.arange(length, device=ids.device)
    sums = _empty_sums()
    for n in range(1, max_n + 1):
        ok = (positions <= length - 1 - n).expand(b, -1)  # the n-gram y_{t+1..t+n} lies in the block
        lq = F.pad(log_q, (0, n)).unfold(1, n, 1)[:, :length].sum(-1)  # Σ_{i<n} log q[t+i]
        agree = (conts[0, ..., :n - 1] == conts[1, ..., :n - 1]).all(-1).double()
        sums["acc"][n - 1] += float((lq.exp() * ok).sum())
        sums["coll"][n - 1] += float((agree * sumsq[n - 1].double().to(ids.device) * ok).sum())
        sums["count"][n - 1] += float(ok.sum())
    sums["chunk"] = [sums["acc"][0], sums["coll"][0], sums["count"][0]]
    return sums


# -- whole-dataset evaluation --------------------------------------------------------------------------------

def _check_model_input(model: Any, kind: str, k: int, length: int) -> None:
    """Shape checks that name the fix (the context check is skipped for stand-ins without a config)."""
    if kind == "calm" and length % k:
        raise ConfigError(f"block size {length} is not a multiple of the chunk size K={k}; use a multiple of {k}")
    if length < k + MAX_N:
        raise ConfigError(f"block size {length} is too short: Brier-{MAX_N} needs at least "
                          f"{k + MAX_N} tokens per block ({'one chunk' if kind == 'calm' else 'one token'} "
                          f"of context + {MAX_N}); use a larger block size")
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_pos is not None and length // k > max_pos:
        raise ConfigError(f"block size {length} is longer than the model's context of {max_pos * k} tokens; "
                          f"use --block-size {max_pos * k} or less")


def brierlm_from_sums(sums: dict[str, list[float]]) -> dict[str, Any]:
    """Turn summed estimator terms into Brier-n (means over positions) and BrierLM."""

    def mean(total: float, count: float) -> float:
        return total / count if count else float("nan")

    out: dict[str, Any] = {}
    for n in range(1, MAX_N + 1):
        count = sums["count"][n - 1]
        acc, coll = mean(sums["acc"][n - 1], count), mean(sums["coll"][n - 1], count)
        out.update({f"accuracy_{n}": acc, f"collision_{n}": coll, f"brier_{n}": 2 * acc - coll,
                    f"count_{n}": int(count)})
    briers = [out[f"brier_{n}"] for n in range(1, MAX_N + 1)]
    if all(b > 0 for b in briers):  # nan compares False, so nan also gives 0
        out["brierlm"] = 100.0 * math.exp(sum(math.log(b) for b in briers) / MAX_N)
    else:
        out["brierlm"] = 0.0
        out["brierlm_note"] = "some Brier-n is <= 0 (or undefined): the geometric mean is reported as 0"
    acc, coll, count = sums["chunk"]
    out["chunk_accuracy"], out["chunk_collision"] = mean(acc, count), mean(coll, count)
    out["sums"] = {key: list(v) for key, v in sums.items()}
    return out


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


@torch.no_grad()
def evaluate_brierlm(model: Any, data: Any, block_size: int | None = None, batch_size: int = 8,
                     max_tokens: int | None = None, seed: int = 0, generator: torch.Generator | None = None,
                     progress: bool = True, compile: bool = False) -> dict[str, Any]:
    """BrierLM of a CALM or baseline model (or a :class:`Continuable`) on ``data``.

    ``data``: a dataset of (L,) token blocks such as :class:`calmlm.data.corpus.TokenDataset` or a token tensor
    (blocks, L), read by :func:`calmlm.data.corpus.token_blocks` (re-cut to ``block_size`` when that differs).
    ``max_tokens`` keeps the first ``max_tokens // L`` blocks. Under ``torch.distributed`` each rank takes
    blocks rank, rank+world, ... and the sums are all-reduced, so every rank returns the same result. ``seed``
    (or ``generator``) makes the draws reproducible; rank r uses seed + r. ``compile``: CALM's head and decoder
    through ``torch.compile`` (the same draws).

    Returns brier_1..4, brierlm, accuracy_n/collision_n (the two terms, Brier-n = 2·acc - coll),
    chunk_accuracy/chunk_collision (CALM: whole next chunk; baseline: next token), count_n (positions),
    num_positions, num_tokens, num_blocks, block_size, chunk_size, kind and the raw sums. Always report
    block_size and num_tokens with the score: BrierLM depends on the context length (~30 %)."""
    base = _unwrap(model)
    view, kind = continuable(base, compile)
    blocks, length = token_blocks(data, block_size)
    num_blocks = len(blocks)
    if max_tokens is not None:
        if max_tokens < length:
            raise DataError(f"max_tokens={max_tokens} is less than one block of {length} tokens; "
                            "raise max_tokens or lower the block size")
        num_blocks = min(num_blocks, max_tokens // length)
    if num_blocks == 0:
        raise DataError(f"the evaluation data holds no complete block of {length} tokens; "
                        "use more data or a smaller block size")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    _check_model_input(base, kind, view.chunk_size, length)
    vocab = getattr(getattr(base, "config", None), "vocab_size", None)
    rank, world = rank_and_world()
    device = _device_of(base)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed + rank)
    estimator = calm_brier_sums if kind == "calm" else baseline_brier_sums
    blocks_done = len(range(rank, num_blocks, world))
    totals = _empty_sums()
    with eval_mode(base), tqdm(total=blocks_done, unit="block", desc=f"BrierLM ({kind}, L={length})",
                                disable=not progress or rank != 0) as bar:
        for ids in iter_blocks(blocks, batch_size, rank, world, num_blocks):
            ids = ids.to(device)
            if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise DataError(f"token ids in [{int(ids.min())}, {int(ids.max())}] fall outside the model's "
                                f"vocabulary of {vocab}; tokenise the data with the model's own tokenizer")
            part = estimator(view, ids, generator)
            totals = {key: [a + b for a, b in zip(totals[key], part[key])] for key in totals}
            bar.update(ids.shape[0])
    if world > 1:  # one all_reduce of every sum and the block count
        flat = torch.tensor([*itertools.chain(*totals.values()), blocks_done], dtype=torch.float64, device=device)
        all_reduce(flat)
        values = iter(flat.tolist())
        totals = {key: [next(values) for _ in sums] for key, sums in totals.items()}
        blocks_done = int(next(values))
    out = brierlm_from_sums(totals)
    out.update(kind=kind, block_size=length, chunk_size=view.chunk_size, num_blocks=blocks_done,
               num_tokens=blocks_done * length, num_positions=out["count_1"], seed=seed,
               available_tokens=len(blocks) * length)
    return out


def make_brierlm_eval_fn(block_size: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
                         seed: int = 0, progress: bool = False) -> Callable[[Any, Any], dict[str, Any]]:
    """An ``evaluate_fn(model, val_data) -> dict`` for the training engine's periodic evaluation.

    The same seed at every evaluation makes successive scores differ only through the model. Keys are
    prefixed for logging: ``brierlm``, ``brier_1``..``brier_4``, ``brier_block_size``, ``brier_tokens``."""

    def evaluate_fn(model: Any, val_data: Any) -> dict[str, Any]:
        r = evaluate_brierlm(model, val_data, block_size, batch_size, max_tokens, seed=seed, progress=progress)
        out = {"brierlm": r["brierlm"], **{f"brier_{n}": r[f"brier_{n}"] for n in range(1, MAX_N + 1)},
               "brier_block_size": r["block_size"], "brier_tokens": r["num_tokens"]}
        if r["kind"] == "calm":
            out.update(chunk_accuracy=r["chunk_accuracy"], chunk_collision=r["chunk_collision"])
        return out

    return evaluate_fn


# -- accuracy vs diversity under temperature (paper figures 10-11) -------------------------------------------

@torch.no_grad()
def accuracy_diversity(model: Any, data: Any, temperatures: Sequence[float], pool_sizes: Sequence[int] = (),
                       block_size: int | None = None, batch_size: int = 8, max_tokens: int | None = None,
                       seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Accuracy (mean 1{x=y}) against collision rate (mean 1{x1=x2}) of next-step samples at each temperature.

    Baseline: next token under softmax(logits / T), computed exactly (E 1{x=y} = p_T(y),
    E 1{x1=x2} = Σ p_T²); ``pool_sizes`` is ignored. CALM: the next chunk, drawn at T = 1 directly and at
    T < 1 with :func:`calmlm.sampling.temperature.batch_temperature_sample` from a pool of N head draws per
    position, for every N in ``pool_sizes``; two independent pools give the two samples. Returns one point per
    (T, N): temperature, pool_size (None for plain sampling), accuracy, collision, positions."""
    base = _unwrap(model)
    view, kind = continuable(base, compile)
    blocks, length = token_blocks(data, block_size)
    num_blocks = len(blocks) if max_tokens is None else min(len(blocks), max(1, max_tokens // length))
    if num_blocks == 0:
        raise DataError(f"the evaluation data holds no complete block of {length} tokens")
    _check_model_input(base, kind, view.chunk_size, length)
    for t in temperatures:
        if not (isinstance(t, (int, float)) and 0 < t and (kind == "baseline" or t <= 1)):
            raise ConfigError(f"temperature {t} is out of range: CALM needs 0 < T <= 1, the baseline T > 0")
    settings: list[tuple[float, int | None]] = []
    for t in temperatures:
        if kind == "calm" and t < 1:
            if not pool_sizes:
                raise ConfigError("CALM at T < 1 needs pool sizes (e.g. --pool-sizes 16 64 256)")
            for p in pool_sizes:
                if p < round(1 / t):
                    raise ConfigError(f"pool size {p} is too small for T={t}: it needs at least 1/T draws")
                settings.append((float(t), int(p)))
        else:
            settings.append((float(t), None))
    device, k = _device_of(base), view.chunk_size
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = {s: [0.0, 0.0, 0.0] for s in settings}
    with eval_mode(base):
        for ids in tqdm(iter_blocks(blocks, batch_size, max_blocks=num_blocks), unit="batch",
                        total=-(-num_blocks // batch_size), desc="accuracy/diversity", disable=not progress):
            ids = ids.to(device)
            hidden, _ = view.start(ids)
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (P, d): positions with a next chunk in the block
            target = ids[:, k:].reshape(-1, k)  # (P, K), K = 1 for the baseline
            if kind == "calm":
                _calm_points(view, hidden, target, settings, sums, gen)
            else:
                _baseline_points(view, hidden, target, settings, sums)
    return [{"temperature": t, "pool_size": p, "accuracy": v[0] / v[2], "collision": v[1] / v[2],
             "positions": int(v[2]), "kind": kind, "block_size": length} for (t, p), v in sums.items()]


def _calm_points(sampler: Continuable, hidden: torch.Tensor, target: torch.Tensor,
                 settings: list[tuple[float, int | None]], sums: dict[Any, list[float]], gen: torch.Generator) -> None:
    from ..sampling.temperature import batch_temperature_sample

    def tempered(rows: torch.Tensor, t: float, pool: int) -> torch.Tensor:
        """One chunk per row at temperature t, from its own pool of head draws: (rows, K)."""
        draws = sampler.sample_chunks(rows, num_samples=pool, generator=gen)  # (pool, rows, K)
        return batch_temperature_sample(draws.transpose(0, 1), t, gen)

    for t, pool in settings:
        if pool is None:
            x = sampler.sample_chunks(hidden, num_samples=2, generator=gen)  # (2, P, K)
        else:  # positions in slices, so pool x positions head/decoder rows stay bounded; two independent pools
            step = max(1, _HEAD_ROWS * 4 // pool)
            x = torch.cat([torch.stack([tempered(hidden[s:s + step], t, pool) for _ in range(2)])
                           for s in range(0, hidden.shape[0], step)], 1)  # (2, P, K)
        x = x.to(target.device)
        hit = (x == target).all(-1).float().mean(0)
        same = (x[0] == x[1]).all(-1).float()
        v = sums[(t, pool)]
        v[0], v[1], v[2] = v[0] + float(hit.sum()), v[1] + float(same.sum()), v[2] + hit.numel()


def _baseline_points(scorer: Continuable, hidden: torch.Tensor, target: torch.Tensor,
                     settings: list[tuple[float, int | None]], sums: dict[Any, list[float]]) -> None:
    for s in range(0, hidden.shape[0], _HEAD_ROWS):
        logits = scorer.head(hidden[s:s + _HEAD_ROWS]).float()
        y = target[s:s + _HEAD_ROWS].to(logits.device)  # (rows, 1)
        for t, pool in settings:
            probs = (logits / t).softmax(-1)
            v = sums[(t, pool)]
            v[0] += float(probs.gather(-1, y).sum())
            v[1] += float(probs.square().sum())
            v[2] += y.numel()
