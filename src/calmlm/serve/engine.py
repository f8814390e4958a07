"""The batching engine behind ``calm serve``: a request queue drained by one worker thread.

Continuous batching: the worker decodes every live request in one KV-cached loop of up to ``max_batch_size``
sequences (requests x n). A new batch waits ``batch_wait`` seconds after its first request for others; later
requests join the running batch between two decode steps. A request leaves the batch when it is finished (EOS in
every choice, ``max_tokens``, or cancelled by the server after a stop sequence / a client disconnect).

Batching never changes an answer: the backbone masks each row's padding and numbers its positions from 0
(``left_padding``), and every request draws from its own generator seeded by its ``seed``, as
:func:`calmlm.sampling.generation.generate` does: a request answers the same alone, in any batch and through
``calm generate``.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import GenerationError
from ..sampling.generation import (baseline_logits, calm_hidden, check_options, next_chunk, padded_prompt,
                                   sample_logits, start_token, stop_after_eos)
from ..sampling.step import StaticStep

# Called from the worker thread with each step's Step, then once with None when the request is finished, or
# with an exception when it failed.
Emit = Callable[[Any], None]
# A baseline step's log-probabilities: per choice, per token (log p, [(id, log p)] of the top ones).
Logprobs = list[list[tuple[float, list[tuple[int, float]]]]]


@dataclass
class Step:
    """One decode step of a request: per choice, the new tokens (K for CALM, 1 for the baseline) and, for a
    baseline request with ``logprobs``, their log-probabilities."""

    tokens: list[list[int]]
    logprobs: Logprobs | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Emit
    temperature: float = 1.0
    n: int = 1
    seed: int | None = None
    top_k: int | None = None  # baseline
    sampler: str = "batch"  # CALM, T < 1
    pool_size: int = 200  # CALM batch sampler
    logprobs: int | None = None  # baseline: report the sampled tokens' log-probabilities and this many top ones
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop decoding this request at the next step (its rows leave the batch)."""
        self.cancelled.set()


class Engine:
    """Owns the model; ``submit`` queues a request, a daemon thread decodes batches of them."""

    def __init__(self, model: Any, max_batch_size: int = 32, batch_wait: float = 0.0, compile: bool = False) -> None:
        if max_batch_size < 1:
            raise GenerationError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait  # seconds a new batch waits for more requests after its first one
        # compile: decode steps on static caches, one per (rows, positions) bucket, kept with their compiled
        # (and on CUDA, graph-captured) step; prefills stay eager
        self.compile = compile
        self._buckets: dict[tuple[int, int], tuple[Any, StaticStep]] = {}
        self.is_calm = model.config.kind == "calm"
        self.k = model.config.chunk_size if self.is_calm else 1
        self.eos = model.config.eos_token_id
        self.device = next(model.parameters()).device
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self._held: Request | None = None  # a request that did not fit in the batch yet
        self._closed = False
        # For tests, logs and benchmarks: requests that joined a running batch, prefills (a fresh batch or requests
        # joining it), the largest batch (sequences), decode steps and the sequences they decoded.
        self.joined = self.batches = self.largest_batch = self.steps = self.rows_stepped = 0
        self._thread = threading.Thread(target=self._work, name="calm-serve-engine", daemon=True)
        self._thread.start()

    @property
    def context(self) -> int:
        """The context in tokens (CALM: chunks x K)."""
        return self.model.config.max_position_embeddings * self.k

    def room(self, prompt_len: int) -> int:
        """How many new tokens fit after a prompt of ``prompt_len`` tokens."""
        return max(0, (self.model.config.max_position_embeddings - self._positions(prompt_len)) * self.k)

    def check(self, request: Request) -> None:
        """Raise GenerationError (a clear message) if ``request`` cannot be decoded; call before ``submit``."""
        cfg = self.model.config
        length = len(request.prompt_ids)
        if request.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if not 1 <= request.n <= self.max_batch_size:
            raise GenerationError(f"n must be between 1 and the server's --max-batch-size ({self.max_batch_size}), "
                                  f"got {request.n}")
        check_options(self.model, request.temperature, request.max_tokens, request.n, request.sampler,
                      request.pool_size)
        if request.logprobs is not None and (self.is_calm or not 0 <= request.logprobs <= 20):
            raise GenerationError("logprobs needs the baseline (CALM is likelihood-free) and 0 <= logprobs <= 20")
        if request.top_k is not None and request.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {request.top_k}")
        if any(not 0 <= t < cfg.vocab_size for t in request.prompt_ids):
            raise GenerationError(f"prompt token ids must be in [0, {cfg.vocab_size}), the model's vocabulary")
        if not length and start_token(cfg, self.eos) is None:  # CALM always has its mask token to pad with
            raise GenerationError("an empty prompt needs a BOS or EOS token id to start from; give a prompt")
        if self._positions(length) > cfg.max_position_embeddings:
            raise GenerationError(f"the prompt has {length} tokens, longer than the model's context of "
                                  f"{self.context} tokens; shorten it")
        room = self.room(length)
        if request.max_tokens > room:
            raise GenerationError(f"max_tokens={request.max_tokens} does not fit: the context is {self.context} "
                                  f"tokens and the prompt takes {length}, so at most {room} new tokens fit; "
                                  "lower max_tokens or shorten the prompt")

    def submit(self, request: Request) -> None:
        self.check(request)
        self.queue.put(request)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while not self._closed:
            first = self._held or self.queue.get()  # block while idle
            self._held = None
            if first is None:
                return
            batch = _Batch(self)
            try:
                batch.run([first, *self._take(first.n, self.batch_wait)])
            except Exception as e:  # a batch-wide failure (e.g. out of memory) fails its requests, not the server
                traceback.print_exc()
                for x in batch.live:
                    _safe_emit(x.request, e)

    def _take(self, rows: int, wait: float = 0.0) -> list[Request]:
        """Queued requests that fit beside ``rows`` sequences, waiting up to ``wait`` seconds for more."""
        taken: list[Request] = []
        deadline = time.monotonic() + wait
        while rows < self.max_batch_size and not self._closed:
            if self._held is not None:
                nxt, self._held = self._held, None
            else:
                left = deadline - time.monotonic()
                try:
                    nxt = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
            if nxt is None:
                self._closed = True  # finish the running batch, then stop
                break
            if rows + nxt.n > self.max_batch_size:
                self._held = nxt  # it joins as soon as rows free up
                break
            taken.append(nxt)
            rows += nxt.n
        return taken

    def _positions(self, prompt_len: int) -> int:
        """Backbone positions a prompt takes: CALM chunks or baseline tokens; an empty prompt still takes one."""
        return max(1, math.ceil(prompt_len / self.k))

    def _bucket(self, rows: int, positions: int) -> tuple[Any, StaticStep]:
        """The cleared static cache and the decode step of the smallest bucket holding ``rows`` sequences of up to
        ``positions`` cache positions (powers of two; rows capped at the batch size). Right-aligned rows can need
        more cache positions than the context: a long prompt beside a long answer."""
        key = min(_power_of_two(rows), self.max_batch_size), max(16, _power_of_two(positions))
        if key not in self._buckets:
            cache = self.model.backbone.new_cache(*key, static=True)
            self._buckets[key] = cache, StaticStep(calm_hidden if self.is_calm else baseline_logits, cache,
                                                   (self.model, cache))
        cache, step = self._buckets[key]
        cache.clear()
        return cache, step

    def _forward(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """New ids (B, T) -> the state at the last position: CALM hidden state (B, d), baseline logits (B, V). The
        cache lays out each row's left padding (``KVCache.pad``)."""
        return (calm_hidden if self.is_calm else baseline_logits)(self.model, cache, ids)

    def _propose(self, active: list[_Live], state: torch.Tensor) -> list[torch.Tensor]:
        """Each live request's next tokens (n, K), drawn with its own generator. CALM requests at T=1 share
        one head + decoder call (their noise is drawn per request, so the draws do not depend on the batch)."""
        m = self.model
        out: list[torch.Tensor | None] = [None] * len(active)
        plain = [i for i, live in enumerate(active) if self.is_calm and live.request.temperature == 1.0]
        if plain:
            hidden = torch.cat([state[active[i].rows] for i in plain])
            noise = torch.cat([m.head.noise((active[i].request.n,), hidden.device, hidden.dtype, active[i].gen)
                               for i in plain])
            tokens = m.decode_latents(m.head(hidden, noise)).split([active[i].request.n for i in plain])
            for i, t in zip(plain, tokens):
                out[i] = t
        for i, live in enumerate(active):
            if out[i] is not None:
                continue
            r, s = live.request, state[live.rows]
            try:
                if self.is_calm:
                    out[i] = next_chunk(m, s, r.temperature, r.sampler, r.pool_size, live.gen)
                else:
                    out[i] = sample_logits(s, r.temperature, r.top_k, live.gen)[:, None]
                    if r.logprobs is not None:
                        live.logprobs = _logprobs(s, out[i][:, 0], r.logprobs)
            except Exception as e:  # this request fails alone
                live.error = e
                out[i] = torch.full((r.n, self.k), self.eos or 0, dtype=torch.long, device=self.device)
        return out  # type: ignore[return-value]


class _Batch:
    """The running batch: live requests, their KV cache (one row per sequence, right-aligned, each row's left
    padding in the cache) and the state to sample the next tokens from, (B, d) or (B, V).

    Continuous batching: between two decode steps, queued requests are prefilled on their own and admitted to the
    batch's cache (``KVCache.admit``); finished requests' rows are evicted (``KVCache.evict``). Padding shifts a
    row's cache, never its positions."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.live: list[_Live] = []
        self.cache: Any = None
        self.decode: StaticStep | None = None  # with Engine(compile=True): the static cache's step
        self.state = torch.empty(0)

    @torch.no_grad()
    def run(self, requests: list[Request]) -> None:
        while True:
            self.admit(requests)
            if not self.live:
                return
            self.step()
            requests = self.engine._take(sum(x.request.n for x in self.live))

    def admit(self, requests: list[Request]) -> None:
        e = self.engine
        new = []
        for r in requests:
            if r.cancelled.is_set():
                _safe_emit(r, None)
            else:
                new.append(_Live(r, e.device, e.k))
        if not new:
            return
        remaining = max(x.total_steps - x.step for x in [*self.live, *new])
        self.live += new  # from here on, a failure is reported to these requests too
        # the ids ``generate`` feeds; check() made sure an empty baseline prompt has a BOS or EOS id to start from
        prompts = [padded_prompt(x.request.prompt_ids, e.model.config, e.eos) for x in new]
        width = max(len(p) for p in prompts)  # tokens; a multiple of K for CALM
        rows, pads = [], []
        for x, p in zip(new, prompts):
            rows += [[0] * (width - len(p)) + p] * x.request.n
            pads += [(width - len(p)) // e.k] * x.request.n
        ids = torch.tensor(rows, dtype=torch.long, device=e.device)
        pad = torch.tensor(pads, dtype=torch.long, device=e.device)
        fresh = self.cache is None
        # A fresh batch is prefilled straight into a cache with room for every step, joiners alone; compiled
        # steps need the batch in a static cache, which takes the prefilled rows (in a larger bucket if need be).
        direct = fresh and not e.compile
        cache = e.model.backbone.new_cache(len(rows), width // e.k + (remaining if direct else 0), pad=pad)
        state = e._forward(ids, cache)
        if e.compile:
            parts = [cache] if fresh else [self.cache, cache]
            rows_needed, length = sum(p.rows for p in parts), max(p.length for p in parts) + remaining
            if fresh or rows_needed > self.cache.batch_size or length > self.cache.max_len:
                target, self.decode = e._bucket(rows_needed, length)
                for part in parts:
                    target.admit(part)
                self.cache = target
            else:
                self.cache.admit(cache)
        elif fresh:
            self.cache = cache
        else:
            self.cache.admit(cache, room=remaining)
        self.state = state if fresh else torch.cat([self.state, state])
        if not fresh:
            e.joined += len(new)
        self._reindex()
        e.batches += 1
        e.largest_batch = max(e.largest_batch, self.cache.rows)

    def step(self) -> None:
        """Sample every live request's next tokens, hand them out, drop finished requests, feed the rest."""
        e = self.engine
        e.steps += 1
        e.rows_stepped += self.cache.rows
        new = []
        for x, tokens in zip(self.live, e._propose(self.live, self.state)):
            tokens, x.done = stop_after_eos(tokens, x.done, e.eos)
            new.append(tokens)
        # One device-to-host copy per step for every request's tokens and EOS flags.
        host = torch.cat([torch.cat([t, x.done[:, None].long()], 1) for t, x in zip(new, self.live)]).tolist()
        keep, feed = [], []
        for x, tokens in zip(self.live, new):
            x.step += 1
            rows = host[x.rows]
            if x.error is not None:
                _safe_emit(x.request, x.error)
                continue
            _safe_emit(x.request, Step([r[:-1] for r in rows], x.logprobs))
            if x.step >= x.total_steps or all(r[-1] for r in rows) or x.request.cancelled.is_set():
                _safe_emit(x.request, None)
                continue
            keep.append(x)
            feed.append(tokens)
        if not keep:
            self.live, self.cache = [], None
            return
        if len(keep) < len(self.live):  # drop finished requests' rows (and padding no row needs any more)
            index = torch.cat([torch.arange(x.rows.start, x.rows.stop, device=e.device) for x in keep])
            self.cache.evict(index)
            self.state = self.state[index]
            self.live = keep
            self._reindex()
        feed = torch.cat(feed)
        if e.compile:  # vacant rows of the bucket decode a dummy token, all padding
            feed = torch.cat([feed, feed.new_zeros(self.cache.batch_size - len(feed), feed.shape[1])])
            self.state = self.decode(feed)[:self.cache.rows]
        else:
            self.state = e._forward(feed, self.cache)

    def _reindex(self) -> None:
        start = 0
        for x in self.live:
            x.rows = slice(start, start + x.request.n)
            start += x.request.n


class _Live:
    """A request inside a running batch: its rows, generator and per-choice EOS flags."""

    def __init__(self, request: Request, device: torch.device, k: int) -> None:
        self.request = request
        self.total_steps = math.ceil(request.max_tokens / k)
        self.rows = slice(0, 0)
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.done = torch.zeros(request.n, dtype=torch.bool, device=device)
        self.error: Exception | None = None
        self.step = 0  # decode steps done
        self.logprobs: Logprobs | None = None  # of the last step


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> Logprobs:
    """(n, V) logits and the (n,) sampled ids -> per row, [(log p(chosen), top ``top`` (id, log p))] under the
    model's distribution (before temperature and top-k, as OpenAI-style servers report it)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    picked = lp.gather(-1, chosen[:, None])[:, 0].tolist()
    values, ids = lp.topk(top, dim=-1)
    return [[(p, list(zip(i, v)))] for p, i, v in zip(picked, ids.tolist(), values.tolist())]


def _safe_emit(request: Request, item: Any) -> None:
    try:
        request.emit(item)
    except Exception:  # a broken consumer must not stop the other requests
        traceback.print_exc()
        request.cancel()
