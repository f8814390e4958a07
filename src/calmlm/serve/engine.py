"""The batching engine behind ``calm serve``: a request queue drained by one worker thread.

Dynamic batching (not continuous): the worker takes every request waiting in the queue (up to
``max_batch_size`` sequences), left-pads their prompts to a common length and decodes them together in one
KV-cached loop; a request leaves the batch when it is finished (EOS in every choice, ``max_tokens``, or
cancelled by the server after a stop sequence / a client disconnect). Requests that arrive meanwhile wait
for the next batch.

Batching never changes an answer: the backbone masks each row's padding and numbers its positions from 0
(``Transformer.forward(pad=...)``), and every request draws its randomness from its own generator, seeded
by its ``seed``. The draws are those of :func:`calmlm.generation.generate` for the same prompt, options and
seed, so a request answers the same alone, in any batch, and through ``calm generate``.
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
from ..generation import _next_chunk, _stop_after_eos, _validate, sample_logits

# Called from the worker thread with each step's new tokens, one list per choice (K tokens for CALM, 1 for
# the baseline), then once with None when the request is finished, or with an exception when it failed.
Emit = Callable[[Any], None]


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
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop decoding this request at the next step (its rows leave the batch)."""
        self.cancelled.set()


class Engine:
    """Owns the model; ``submit`` queues a request, a daemon thread decodes batches of them."""

    def __init__(self, model: Any, max_batch_size: int = 32, batch_wait: float = 0.0) -> None:
        if max_batch_size < 1:
            raise GenerationError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait  # seconds a new batch waits for more requests after its first one
        self.is_calm = model.config.kind == "calm"
        self.k = model.config.chunk_size if self.is_calm else 1
        self.eos = model.config.eos_token_id
        self.device = next(model.parameters()).device
        self.queue: queue.Queue[Request | None] = queue.Queue()
        self._held: Request | None = None  # a request that did not fit in the last batch
        self.batches = 0  # decoded batches, and the largest one (sequences): for tests and logs
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="calm-serve-engine", daemon=True)
        self._thread.start()

    # -- requests ------------------------------------------------------------------------------------
    @property
    def context(self) -> int:
        """The context in tokens (CALM: chunks x K)."""
        return self.model.config.max_position_embeddings * self.k

    def room(self, prompt_len: int) -> int:
        """How many new tokens fit after a prompt of ``prompt_len`` tokens."""
        return max(0, (self.model.config.max_position_embeddings - self._positions(prompt_len)) * self.k)

    def check(self, request: Request) -> None:
        """Raise GenerationError (a clear message) if ``request`` cannot be decoded; call before ``submit``."""
        if request.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if not 1 <= request.n <= self.max_batch_size:
            raise GenerationError(f"n must be between 1 and the server's --max-batch-size ({self.max_batch_size}), "
                                  f"got {request.n}")
        _validate(self.model, request.temperature, request.max_tokens, request.n, request.sampler, request.pool_size)
        if request.top_k is not None and request.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {request.top_k}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise GenerationError(f"prompt token ids must be in [0, {vocab}), the model's vocabulary")
        length = len(request.prompt_ids)
        if self._positions(length) > self.model.config.max_position_embeddings:
            raise GenerationError(f"the prompt has {length} tokens, longer than the model's context of "
                                  f"{self.context} tokens; shorten it")
        if request.max_tokens > self.room(length):
            raise GenerationError(f"max_tokens={request.max_tokens} does not fit: the context is {self.context} "
                                  f"tokens and the prompt takes {length}, so at most {self.room(length)} new "
                                  "tokens fit; lower max_tokens or shorten the prompt")

    def submit(self, request: Request) -> None:
        self.check(request)
        self.queue.put(request)

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    # -- the worker ----------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            first, self._held = self._held or self.queue.get(), None
            if first is None:
                return
            batch, rows = [first], first.n
            deadline = time.monotonic() + self.batch_wait
            while rows < self.max_batch_size:
                left = deadline - time.monotonic()
                try:
                    nxt = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)  # close after this batch
                    break
                if rows + nxt.n > self.max_batch_size:
                    self._held = nxt  # it leads the next batch
                    break
                batch.append(nxt)
                rows += nxt.n
            try:
                self._decode(batch)
            except Exception as e:  # a batch-wide failure (e.g. out of memory) fails its requests, not the server
                traceback.print_exc()
                for r in batch:
                    _safe_emit(r, e)

    def _positions(self, prompt_len: int) -> int:
        """Backbone positions a prompt takes: chunks after left-padding to a multiple of K (an empty prompt is
        one chunk of padding) for CALM; tokens (an empty prompt becomes BOS or EOS) for the baseline."""
        return max(1, math.ceil(prompt_len / self.k))

    def _prompt_row(self, ids: list[int]) -> list[int]:
        """The ids ``generate`` would feed for this prompt (CALM: left-padded to a multiple of K)."""
        cfg = self.model.config
        if self.is_calm:
            pad_id = self.eos if self.eos is not None else cfg.autoencoder.mask_token_id
            pad = (-len(ids)) % self.k if ids else self.k
            return [pad_id] * pad + ids
        if not ids:
            start = cfg.bos_token_id if cfg.bos_token_id is not None else self.eos
            if start is None:
                raise GenerationError("an empty prompt needs a BOS or EOS token id to start from; give a prompt")
            return [start]
        return ids

    def _forward(self, ids: torch.Tensor, cache: Any, pad: torch.Tensor) -> torch.Tensor:
        """New ids (B, T) -> the state at the last position: CALM hidden state (B, d), baseline logits (B, V)."""
        m = self.model
        if self.is_calm:
            return m.backbone(m.embed_chunks(ids), cache, pad)[:, -1]
        return m.lm_head(m.backbone(m.backbone.embed_tokens(ids), cache, pad)[:, -1:])[:, 0]

    def _propose(self, active: list[_Live], state: torch.Tensor) -> list[torch.Tensor]:
        """Each live request's next tokens (n, K), drawn with its own generator. CALM requests at T=1 share
        one head + decoder call (their noise is drawn per request, so the draws do not depend on the batch)."""
        out: list[torch.Tensor | None] = [None] * len(active)
        plain = [i for i, live in enumerate(active) if self.is_calm and live.request.temperature == 1.0]
        if plain:
            m = self.model
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
                    out[i] = _next_chunk(self.model, s, r.temperature, r.sampler, r.pool_size, live.gen)
                else:
                    out[i] = sample_logits(s, r.temperature, r.top_k, live.gen)[:, None]
            except Exception as e:  # this request fails alone
                live.error = e
                out[i] = torch.full((r.n, self.k), self.eos or 0, dtype=torch.long, device=self.device)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _decode(self, batch: list[Request]) -> None:
        live = [_Live(r, self.device) for r in batch if not r.cancelled.is_set()]
        for r in batch:
            if r.cancelled.is_set():
                _safe_emit(r, None)
        if not live:
            return
        prompts = [self._prompt_row(x.request.prompt_ids) for x in live]
        width = max(len(p) for p in prompts)  # tokens; a multiple of K for CALM
        rows, pads, start = [], [], 0
        for x, p in zip(live, prompts):
            x.rows = slice(start, start + x.request.n)
            start += x.request.n
            rows += [[0] * (width - len(p)) + p] * x.request.n
            pads += [(width - len(p)) // self.k] * x.request.n
        self.batches += 1
        self.largest_batch = max(self.largest_batch, start)
        ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        pad = torch.tensor(pads, dtype=torch.long, device=self.device)
        steps = max(x.steps(self.k) for x in live)
        cache = self.model.backbone.new_cache(ids.shape[0], width // self.k + steps)
        state = self._forward(ids, cache, pad)
        for step in range(steps):
            new = self._propose(live, state)
            keep, feed = [], []
            for x, tokens in zip(live, new):
                tokens, x.done = _stop_after_eos(tokens, x.done, self.eos)
                if x.error is not None:
                    _safe_emit(x.request, x.error)
                    continue
                _safe_emit(x.request, tokens.tolist())
                if step + 1 >= x.steps(self.k) or bool(x.done.all()) or x.request.cancelled.is_set():
                    _safe_emit(x.request, None)
                    continue
                keep.append(x)
                feed.append(tokens)
            if not keep:
                return
            if len(keep) < len(live):  # drop finished requests' rows from the batch and the cache
                index = torch.cat([torch.arange(x.rows.start, x.rows.stop, device=self.device) for x in keep])
                cache.k, cache.v = cache.k[:, index], cache.v[:, index]
                pad, state = pad[index], state[index]
                start = 0
                for x in keep:
                    x.rows = slice(start, start + x.request.n)
                    start += x.request.n
            live = keep
            state = self._forward(torch.cat(feed), cache, pad)


class _Live:
    """A request inside a running batch: its rows, generator and per-choice EOS flags."""

    def __init__(self, request: Request, device: torch.device) -> None:
        self.request = request
        self.rows = slice(0, 0)
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.done = torch.zeros(request.n, dtype=torch.bool, device=device)
        self.error: Exception | None = None

    def steps(self, k: int) -> int:
        return math.ceil(self.request.max_tokens / k)


def _safe_emit(request: Request, item: Any) -> None:
    try:
        request.emit(item)
    except Exception:  # a broken consumer must not stop the other requests
        traceback.print_exc()
        request.cancel()
