"""calmlm models in EleutherAI's lm-evaluation-harness (the ``calmlm[lm_eval]`` extra).

Importing this module registers the model ``calmlm`` with the harness; ``python -m calmlm.evaluation.lm_eval``
is the harness's own command line with it registered (lm-eval 0.4 discovers no installed plugins), e.g.::

    python -m calmlm.evaluation.lm_eval run --model calmlm --model_args pretrained=runs/calm --tasks gsm8k

``generate_until`` decodes in batches through the serving engine (left-padded prompts, one KV-cached loop,
stop strings end a request early) for both model kinds. CALM is likelihood-free, so its ``loglikelihood``
and ``loglikelihood_rolling`` raise an error pointing to BrierLM; the baseline implements them.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch

from ..errors import CalmError
from ..io.loading import load_model_and_tokenizer
from ..serve.engine import Engine, Request

try:
    import lm_eval.models  # noqa: F401  (the harness registers its own models lazily on first use; do it first)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-evaluation-harness integration needs lm_eval: pip install 'calmlm[lm_eval]'") from e

LIKELIHOOD_FREE = ("CALM is likelihood-free: it samples chunks without computing token probabilities, so it has no "
                   "{what} for lm-eval's multiple-choice / perplexity tasks. Evaluate it on generate_until tasks "
                   "here, and measure its language modelling with BrierLM (`calm eval`), the paper's "
                   "likelihood-free metric.")


class CalmLMEval(LM):
    """``--model_args`` (all optional but ``pretrained``): ``device``, ``dtype`` (auto | float32 | bfloat16),
    ``batch_size`` (sequences decoded at once), ``max_gen_toks`` (default when a task sets none), ``seed``
    (request i uses seed + i), ``calm_sampler`` (batch | exact), ``calm_pool_size`` and
    ``greedy_temperature``: the CALM temperature used for tasks that ask for greedy decoding (temperature 0
    / do_sample false), since a likelihood-free model has no argmax."""

    def __init__(self, pretrained: str, device: str | None = None, dtype: str = "auto", batch_size: int | str = 16,
                 max_gen_toks: int = 256, seed: int = 1234, calm_sampler: str = "batch", calm_pool_size: int = 200,
                 greedy_temperature: float = 0.5, tokenizer: str | None = None, **_: Any) -> None:
        super().__init__()
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line passes device=cuda:0 unless told otherwise
            warnings.warn(f"device {device!r} requested but CUDA is not available; running on the CPU", stacklevel=2)
            device = "cpu"
        self.model, self.tok = load_model_and_tokenizer(str(pretrained), device, tokenizer, dtype, purpose="lm-eval")
        self._device = next(self.model.parameters()).device
        self.is_calm = self.model.config.kind == "calm"
        if self.model.config.eos_token_id is None:
            self.model.config.eos_token_id = self.tok.eos_id
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.engine = Engine(self.model, max_batch_size=self.batch_size)
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self.sampler, self.pool_size = calm_sampler, int(calm_pool_size)
        self.greedy_temperature = float(greedy_temperature)

    # -- generation ----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        jobs = [_Job(self, i, *r.args) for i, r in enumerate(requests)]
        # Longest prompts first, so that each batch holds prompts of similar length (little padding).
        for job in sorted(jobs, key=lambda j: -len(j.request.prompt_ids)):
            self.engine.submit(job.request)  # the engine batches whatever is queued
        out = []
        for job in jobs:
            out.append(job.wait())
            self.cache_hook.add_partial("generate_until", job.args, out[-1])
        return out

    def _sampling(self, kwargs: dict[str, Any]) -> float:
        """A request's engine temperature; a greedy one gets 0 (baseline) or ``greedy_temperature`` (CALM)."""
        temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample", False) else 0.0))
        if temperature == 0 or kwargs.get("do_sample") is False:
            return self.greedy_temperature if self.is_calm else 0.0
        return temperature

    # -- likelihoods ---------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        if self.is_calm:
            raise CalmError(LIKELIHOOD_FREE.format(what="log-likelihoods"))
        items = []
        for r in requests:
            context, continuation = r.args
            spaces = len(context) - len(context.rstrip())  # the harness's convention: spaces go with the answer
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx, whole = self.tok.encode(context), self.tok.encode(context + continuation)
            if len(whole) <= len(ctx):  # the continuation merged into the context's last token
                whole = ctx + self.tok.encode(continuation)
            n = len(whole) - len(ctx)
            items.append(([self._start()] + whole if not ctx else whole, n))
        results = self._score(items)
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        if self.is_calm:
            raise CalmError(LIKELIHOOD_FREE.format(what="log-likelihoods (perplexity)"))
        window = self.model.config.max_position_embeddings
        out = []
        for r in requests:
            ids = [self._start(), *self.tok.encode(r.args[0])]
            # Disjoint windows of `window` targets, each predicted from the `window` tokens before it (the
            # harness's rolling windows with context_len=1).
            pieces = [(ids[max(0, s - 1):s + window], min(window, len(ids) - s)) for s in range(1, len(ids), window)]
            out.append(sum(lp for lp, _ in self._score(pieces)))
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, out[-1])
        return out

    def _start(self) -> int:
        """The token a text with no context is predicted from: BOS, else EOS (the document separator)."""
        cfg = self.model.config
        start = cfg.eos_token_id if cfg.bos_token_id is None else cfg.bos_token_id
        if start is None:
            raise CalmError("scoring a text without context needs a BOS or EOS token id in the model config")
        return start

    @torch.no_grad()
    def _score(self, items: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(ids, n): the log-probability of the last n ids given the rest, and whether each was the argmax."""
        limit, device = self.model.config.max_position_embeddings, self._device
        out: list[tuple[float, bool]] = []
        for b in range(0, len(items), self.batch_size):
            chunk = [(ids[-(limit + 1):], min(n, len(ids) - 1, limit)) for ids, n in items[b:b + self.batch_size]]
            width = max(len(ids) for ids, _ in chunk) - 1
            # Right padding: causal attention keeps it out of every real position.
            x = torch.tensor([ids[:-1] + [0] * (width - len(ids) + 1) for ids, _ in chunk], device=device)
            logp = torch.log_softmax(self.model.logits(x).float(), dim=-1)
            for row, (ids, n) in enumerate(chunk):
                positions = torch.arange(len(ids) - 1 - n, len(ids) - 1, device=device)
                target = torch.tensor(ids[-n:], device=device)
                lp = logp[row, positions]
                out.append((float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out


class _Job:
    """One generate_until request: the engine request, its stop strings and the text so far."""

    def __init__(self, lm: CalmLMEval, index: int, context: str, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs or {})
        until = kwargs.get("until") or []
        self.until = [until] if isinstance(until, str) else list(until)
        self.args = (context, kwargs)
        self.lm, self.ids, self.text = lm, [], ""
        self.finished = threading.Event()
        self.error: Exception | None = None
        max_tokens = int(kwargs.get("max_gen_toks", lm.max_gen_toks))
        room = lm.engine.context - max_tokens
        if room < 1:
            raise CalmError(f"max_gen_toks={max_tokens} leaves no room for a prompt in the model's context of "
                            f"{lm.engine.context} tokens; lower it")
        prompt = lm.tok.encode(context)[-room:]  # keep the end of a context that is too long, as HF models do
        max_tokens = min(max_tokens, lm.engine.room(len(prompt)))
        self.request = Request(prompt, max_tokens, self._emit, temperature=lm._sampling(kwargs), n=1,
                               seed=lm.seed + index, top_k=None if lm.is_calm else kwargs.get("top_k"),
                               sampler=lm.sampler, pool_size=lm.pool_size)

    def _emit(self, item: Any) -> None:
        if isinstance(item, Exception):
            self.error = item
            self.finished.set()
        elif item is None:
            self.finished.set()
        elif not self.request.cancelled.is_set():
            eos = self.lm.model.config.eos_token_id
            tokens = item.tokens[0]
            if eos in tokens:
                tokens = tokens[:tokens.index(eos)]
                self.request.cancel()
            self.ids.extend(tokens)
            self.ids = self.ids[:self.request.max_tokens]
            self.text = self.lm.tok.decode(self.ids, skip_special_tokens=True)
            hits = [i for i in (self.text.find(s) for s in self.until) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.request.cancel()

    def wait(self) -> str:
        self.finished.wait()
        if self.error is not None:
            raise self.error
        return self.text


# Registered by name (resolved on first use), so that running this file as __main__ and importing it agree.
model_registry.register("calmlm", target="calmlm.evaluation.lm_eval:CalmLMEval")

if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
