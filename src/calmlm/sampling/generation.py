"""Batched, KV-cached generation for CALM (one latent -> K tokens per step) and the baseline.

Prompt policy for CALM: the backbone reads whole chunks, so a prompt whose length is not a multiple of
K is *left-padded* with the EOS token (the document separator the model saw in training; the
autoencoder's mask token when the model has no EOS id) to the next multiple of K. An empty prompt
becomes one chunk of padding. Padding is removed from the returned sequences.

Temperature for CALM (likelihood-free, paper §5): T = 1 draws one latent per step; T < 1 uses either
the batch approximation (``sampler="batch"``: a pool of ``pool_size`` draws per step) or the exact
rejection sampler (``sampler="exact"``). The baseline uses ordinary softmax temperature and top-k.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import GenerationError
from . import temperature as sampling
from .step import StaticStep, compile_frozen


def prompt_padding(length: int, k: int) -> int:
    """Tokens left-padded before a CALM prompt of ``length`` tokens: to the next multiple of K, and one whole
    chunk for an empty prompt."""
    return (-length) % k if length else k


def start_token(config: Any, eos_id: int | None) -> int | None:
    """CALM's padding token (EOS, else the autoencoder's mask token), or the baseline's token for an empty
    prompt (BOS, else EOS)."""
    if config.kind == "calm":
        return eos_id if eos_id is not None else config.autoencoder.mask_token_id
    return config.bos_token_id if config.bos_token_id is not None else eos_id


def padded_prompt(prompt: list[int], config: Any, eos_id: int | None) -> list[int]:
    """The ids generation feeds the backbone for ``prompt`` (fine-tuning and ``calm serve`` lay out theirs
    with it): a CALM prompt left-padded to whole chunks, an empty baseline prompt started with BOS/EOS."""
    if config.kind == "calm":
        return [start_token(config, eos_id)] * prompt_padding(len(prompt), config.chunk_size) + prompt
    return prompt or [start_token(config, eos_id)]


def check_options(model: Any, temperature: float, max_new_tokens: int, num_samples: int, sampler: str,
              pool_size: int) -> None:
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise GenerationError(f"num_samples must be >= 1, got {num_samples}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)):
        raise GenerationError(f"temperature must be a finite number, got {temperature!r}")
    if model.config.kind == "calm":
        if not 0.0 < temperature <= 1.0:
            raise GenerationError(
                f"CALM temperature must be in (0, 1], got {temperature}: likelihood-free sampling can only "
                "sharpen the model's distribution (use T=1 for plain sampling)")
        if sampler not in ("batch", "exact"):
            raise GenerationError(f"unknown sampler {sampler!r}; use 'batch' or 'exact'")
        if sampler == "batch" and temperature < 1.0 and pool_size < round(1 / temperature):
            raise GenerationError(f"pool_size {pool_size} is too small for T={temperature}: "
                                  f"it needs at least 1/T = {1 / temperature:.3g} draws")
    elif temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")


def _as_batch(input_ids: torch.Tensor | list[int] | list[list[int]], device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise GenerationError(f"prompt ids must be (length,) or (batch, length), got shape {tuple(ids.shape)}")
    return ids


@torch.no_grad()
def iter_generate(model: Any, input_ids: torch.Tensor | list[int] | list[list[int]], max_new_tokens: int = 64,
                  temperature: float = 1.0, num_samples: int = 1, top_k: int | None = None,
                  sampler: str = "batch", pool_size: int = 200, eos_token_id: int | None = None,
                  seed: int | None = None, use_cache: bool = True, stop_check_every: int = 8,
                  compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield new tokens as they are produced: (B * num_samples, K) per step for CALM, (B', 1) for the
    baseline. Sequences that produced EOS are padded with EOS afterwards; the loop stops early once all
    have (checked every ``stop_check_every`` steps; on GPUs the check reads a flag copied asynchronously
    at the previous check, so the decode loop never waits for the device).

    ``compile=True`` decodes on a static KV cache, every step after the prompt through one compiled step
    (:mod:`calmlm.sampling.step`; a CUDA graph on GPUs): the same tokens, faster once compiled; later calls with
    the same model and shapes reuse the compilation. It needs the cache (``use_cache=True``)."""
    check_options(model, temperature, max_new_tokens, num_samples, sampler, pool_size)
    device = next(model.parameters()).device
    ids = _as_batch(input_ids, device).repeat_interleave(num_samples, dim=0)
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if model.config.kind == "calm":
        yield from _calm_steps(model, ids, max_new_tokens, temperature, sampler, pool_size, eos, gen, use_cache,
                               stop_check_every, compile)
    else:
        yield from _baseline_steps(model, ids, max_new_tokens, temperature, top_k, eos, gen, use_cache,
                                   stop_check_every, compile)


def generate(model: Any, input_ids: torch.Tensor | list[int] | list[list[int]], max_new_tokens: int = 64,
             callback: Callable[[torch.Tensor], None] | None = None, **kwargs: Any) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after the prompt; returns (B * num_samples, T + new).

    ``callback`` receives each step's new tokens (for streaming). Options: temperature, num_samples,
    top_k (baseline), sampler / pool_size (CALM), eos_token_id, seed, use_cache, compile."""
    device = next(model.parameters()).device
    prompt = _as_batch(input_ids, device).repeat_interleave(kwargs.get("num_samples", 1), dim=0)
    pieces = [prompt]
    for new in iter_generate(model, input_ids, max_new_tokens, **kwargs):
        if callback is not None:
            callback(new)
        pieces.append(new)
    return torch.cat(pieces, dim=1)[:, : prompt.shape[1] + max_new_tokens]


def stop_after_eos(tokens: torch.Tensor, done: torch.Tensor, eos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad with EOS after a sequence's first EOS; return the tokens and the updated done flags."""
    if eos is None:
        return tokens, done
    is_eos = tokens == eos
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # positions after the first EOS in this step
    tokens = tokens.masked_fill(after | done[:, None], eos)
    return tokens, done | is_eos.any(-1)


def _head_and_decode(model: Any, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return model.decode_latents(model.head(hidden, noise))


def chunk_sampler(model: Any, compile: bool) -> Callable[..., torch.Tensor]:
    """``model.sample_chunks`` with the noise drawn eagerly and head + decoder optionally compiled (the same
    draws as the eager sampler for the same generator). Dynamo keeps the compilation per code object and
    guards on the model, so a later call reuses it."""
    if not compile:
        return model.sample_chunks
    decode = torch.compile(_head_and_decode)

    def sample(hidden: torch.Tensor, num_samples: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        lead = tuple(hidden.shape[:-1]) if num_samples is None else (num_samples, *hidden.shape[:-1])
        return decode(model, hidden, model.head.noise(lead, hidden.device, hidden.dtype, generator))

    return sample


# -- the decode steps (module-level functions: dynamo reuses their compilation across calls) ----------------

def calm_hidden(model: Any, cache: Any, ids: torch.Tensor) -> torch.Tensor:
    """New ids (B, T*K) -> CALM's hidden state (B, d) after them."""
    return model.hidden_states(ids, cache)[:, -1]


def baseline_logits(model: Any, cache: Any, ids: torch.Tensor) -> torch.Tensor:
    """New ids (B, T) -> the baseline's next-token logits (B, V) after them (the LM head at the last only)."""
    return model.lm_head(model.hidden_states(ids, cache)[:, -1])


def _calm_chunks(model: Any, cache: Any, ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The whole CALM step: backbone, head (on the given noise) and decoder -> chunks (..., B, K)."""
    return _head_and_decode(model, calm_hidden(model, cache, ids), noise)


def _calm_latents(model: Any, cache: Any, ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """CALM's step up to the head: backbone and head (on the given noise) -> latents (..., B, l)."""
    return model.head(calm_hidden(model, cache, ids), noise)


def _decode_latents(model: Any, z: torch.Tensor) -> torch.Tensor:
    return model.decode_latents(z)


def _baseline_tokens(model: Any, cache: Any, temperature: float, top_k: int | None, ids: torch.Tensor,
                     race: torch.Tensor | None = None) -> torch.Tensor:
    """The whole baseline step: backbone, LM head and the sampler (on the given race noise) -> (B, 1)."""
    return race_sample(baseline_logits(model, cache, ids), temperature, top_k, race)[:, None]


def _calm_steps(model: Any, ids: torch.Tensor, max_new_tokens: int, temperature: float, sampler: str,
                pool_size: int, eos: int | None, gen: torch.Generator | None, use_cache: bool,
                stop_check_every: int, compile: bool = False) -> Iterator[torch.Tensor]:
    cfg = model.config
    k = cfg.chunk_size
    pad = prompt_padding(ids.shape[1], k)
    if pad:
        ids = torch.cat([ids.new_full((ids.shape[0], pad), start_token(cfg, eos)), ids], dim=1)
    steps = math.ceil(max_new_tokens / k)
    prompt_chunks, context = ids.shape[1] // k, cfg.max_position_embeddings
    if prompt_chunks > context:
        raise GenerationError(f"prompt of {ids.shape[1] - pad} tokens is longer than the model's context of "
                              f"{context * k} tokens ({context} chunks of K={k}); shorten it")
    if prompt_chunks + steps > context:
        raise GenerationError(f"prompt + max_new_tokens exceed the context of {context * k} "
                              f"tokens; at most {(context - prompt_chunks) * k} new tokens fit after this prompt")
    if steps == 0:
        return
    b = ids.shape[0]
    cache = model.backbone.new_cache(b, prompt_chunks + steps, static=compile) if use_cache else None

    def propose(hidden: torch.Tensor) -> torch.Tensor:  # eager: the prompt's chunk, data-dependent samplers
        return next_chunk(model, hidden, temperature, sampler, pool_size, gen)

    step = None
    if compile and use_cache:
        step = _calm_static_step(model, cache, b, temperature, sampler, pool_size, gen, propose)
    forward = functools.partial(calm_hidden, model, cache)
    yield from _decode_loop(forward, propose, ids, steps, eos, stop_check_every, use_cache, step)


def _calm_static_step(model: Any, cache: Any, b: int, temperature: float, sampler: str, pool_size: int,
                      gen: torch.Generator | None,
                      propose: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """CALM's decode step on the static cache: the whole step (backbone, head, decoder) at T = 1 and, on GPUs,
    for the batch sampler's pool (then its sampler runs eagerly); the backbone only for the samplers whose
    sizes depend on the data (the exact sampler; the batch sampler on CPU)."""
    dtype = next(model.parameters()).dtype
    pool = (pool_size,) if temperature < 1 and sampler == "batch" and cache.k[0].device.type != "cpu" else ()
    if temperature < 1 and not pool:
        hidden = StaticStep(calm_hidden, cache, (model, cache))
        return lambda new: propose(hidden(new))
    if cache.k[0].device.type == "cpu":  # no graphs; the frozen decoder compiled apart, its weights pre-packed
        latents, decode = StaticStep(_calm_latents, cache, (model, cache)), compile_frozen(_decode_latents)

        def chunks(new: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
            return decode(model, latents(new, noise))
    else:
        chunks = StaticStep(_calm_chunks, cache, (model, cache))

    def step(new: torch.Tensor) -> torch.Tensor:
        out = chunks(new, model.head.noise((*pool, b), new.device, dtype, gen))
        if not pool:
            return out
        return sampling.batch_temperature_sample(out.transpose(0, 1), temperature, generator=gen,
                                                 num_values=model.config.vocab_size)

    return step


def _decode_loop(forward: Callable[[torch.Tensor], torch.Tensor], propose: Callable[[torch.Tensor], torch.Tensor],
                 ids: torch.Tensor, steps: int, eos: int | None, stop_check_every: int, cached: bool = True,
                 step: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """The decode loop shared by both families: ``forward(ids)`` gives the state at the last position (CALM
    hidden state, baseline logits), ``propose(state)`` the next (B, k) tokens. With a cache ``forward`` reads
    only the new ids; without one every step recomputes the whole sequence (the reference path the tests
    compare against). ``step(new)``, when given, does a decode step's forward and proposal in one (the static,
    compiled step); the prompt always goes through ``forward`` and ``propose``."""
    seq = ids
    new = propose(forward(ids))
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    all_done = _AsyncFlag(ids.device)
    for i in range(steps):
        if i and step is not None:
            new = step(new)
        elif i and cached:
            new = propose(forward(new))
        elif i:
            seq = torch.cat([seq, new], dim=1)
            new = propose(forward(seq))
        new, done = stop_after_eos(new, done, eos)
        yield new
        if eos is not None and (i + 1) % stop_check_every == 0 and all_done.update(done.all()):
            return


class _AsyncFlag:
    """A boolean computed on the device, read by the host without stalling the GPU queue: ``update``
    starts copying the new value to pinned memory and returns the value copied at the previous update
    (long finished by then). On CPU it returns the new value directly."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.host = torch.zeros((), dtype=torch.bool).pin_memory()
            self.event = torch.cuda.Event()
            self.pending = False

    def update(self, value: torch.Tensor) -> bool:
        if not self.cuda:
            return bool(value)
        previous = False
        if self.pending:
            self.event.synchronize()
            previous = bool(self.host)
        self.host.copy_(value, non_blocking=True)
        self.event.record()
        self.pending = True
        return previous


def next_chunk(model: Any, hidden: torch.Tensor, temperature: float, sampler: str, pool_size: int,
               gen: torch.Generator | None, sample_chunks: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """CALM's next chunk (B, K) at every hidden state (B, d): one draw at T = 1, else the batch approximation
    over ``pool_size`` draws or the exact sampler. ``sample_chunks``: the chunk sampler (default the model's)."""
    sample_chunks = sample_chunks or model.sample_chunks
    if temperature == 1.0:
        return sample_chunks(hidden, generator=gen)
    if sampler == "batch":
        if hidden.device.type == "cpu":
            # Draw and decode only the draws, and slots, the choice compares (models/pool.py). (Data-dependent
            # sizes: on GPUs the full pool is decoded, without synchronising.)
            pool = model.draw_pool(hidden, pool_size, gen)
            pick = sampling.lazy_batch_temperature_choice(pool, temperature, generator=gen)
            return pool.chunks(torch.arange(hidden.shape[0]) * pool_size + pick)
        pool = sample_chunks(hidden, num_samples=pool_size, generator=gen).transpose(0, 1)  # (B, N, K)
        return sampling.batch_temperature_sample(pool, temperature, generator=gen, num_values=model.config.vocab_size)

    def draw(m: int, active: torch.Tensor) -> torch.Tensor:  # (A, m, K) for the unfinished rows only
        return sample_chunks(hidden[active.to(hidden.device)], num_samples=m, generator=gen).transpose(0, 1)

    samples, _ = sampling.exact_temperature_sample_batch(draw, hidden.shape[0], temperature, generator=gen)
    return samples


def _baseline_steps(model: Any, ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                    eos: int | None, gen: torch.Generator | None, use_cache: bool,
                    stop_check_every: int, compile: bool = False) -> Iterator[torch.Tensor]:
    cfg = model.config
    if ids.shape[1] == 0:
        if start_token(cfg, eos) is None:
            raise GenerationError("an empty prompt needs a BOS or EOS token id to start from; give a prompt")
        ids = ids.new_full((ids.shape[0], 1), start_token(cfg, eos))
    context = cfg.max_position_embeddings
    if ids.shape[1] > context:
        raise GenerationError(f"prompt of {ids.shape[1]} tokens is longer than the model's context of "
                              f"{context} tokens; shorten it")
    if ids.shape[1] + max_new_tokens > context:
        raise GenerationError(f"prompt + max_new_tokens exceed the context of {context} "
                              f"tokens; at most {context - ids.shape[1]} new tokens fit")
    if max_new_tokens == 0:
        return
    b = ids.shape[0]
    cache = model.backbone.new_cache(b, ids.shape[1] + max_new_tokens, static=compile) if use_cache else None
    step = None
    if compile and use_cache:  # the whole step: backbone, LM head and sampler (its noise drawn eagerly)
        tokens = StaticStep(_baseline_tokens, cache, (model, cache, temperature, top_k))

        def step(new: torch.Tensor) -> torch.Tensor:
            if temperature == 0:  # greedy: no noise
                return tokens(new)
            return tokens(new, race_noise((b, cfg.vocab_size), new.device, gen))
    yield from _decode_loop(functools.partial(baseline_logits, model, cache),
                            lambda logits: sample_logits(logits, temperature, top_k, gen)[:, None],
                            ids, max_new_tokens, eos, stop_check_every, use_cache, step)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids; temperature 0 is greedy."""
    race = race_noise(logits.shape, logits.device, generator) if temperature else None
    return race_sample(logits, temperature, top_k, race)


def race_noise(shape: tuple[int, ...] | torch.Size, device: torch.device,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The Exp(1) draws :func:`race_sample` needs, one per logit (float32)."""
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(generator=generator)


def race_sample(logits: torch.Tensor, temperature: float, top_k: int | None,
                race: torch.Tensor | None) -> torch.Tensor:
    """(B, V) logits -> (B,) ids drawn from softmax(logits / T) over the top ``top_k``, given the race noise
    (:func:`race_noise`; None for greedy, T = 0). Exponential race: argmax p_i / E_i with E_i ~ Exp(1) is an
    exact draw from p, and unlike torch.multinomial it never synchronises with the host on GPUs."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return (probs / race.clamp_min(torch.finfo(probs.dtype).tiny)).argmax(-1)
