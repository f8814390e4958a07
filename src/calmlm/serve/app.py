"""The OpenAI-compatible HTTP API of ``calm serve`` (FastAPI; streaming as server-sent events).

``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true``; CALM streams one
K-token chunk per event), ``GET /v1/models``, ``GET /health``. Decoding happens in :class:`Engine`'s worker
thread; handlers only validate, queue and turn token ids into text. Every bad request gets an OpenAI-style
``{"error": {...}}`` with a 4xx status and a message that names the problem.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

from ..data.chat import chat_prompt, compile_chat_template
from ..data.tokenizer import read_tokenizer_config
from ..errors import CalmError, DataError
from .engine import Engine, Request
from .schemas import ChatMessage, ChatRequest, CompletionRequest


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def simple_chat_prompt(messages: list[ChatMessage]) -> str:
    """``Role: content`` lines (System / User / Assistant), then ``Assistant:`` for the model to continue."""
    return chat_prompt(_as_dicts(messages))


def _as_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.text()} for m in messages]


def read_chat_template(directory: str | Path) -> str | None:
    """The Jinja ``chat_template`` of ``tokenizer_config.json`` beside the weights, if any."""
    template = read_tokenizer_config(Path(directory)).get("chat_template")
    return template if isinstance(template, str) else None


class Server:
    """The model, its tokenizer and the engine, and the OpenAI request handling on top of them."""

    def __init__(self, model: Any, tokenizer: Any, model_name: str, max_batch_size: int = 32,
                 chat_template: str | None = None, batch_wait: float = 0.002, compile: bool = False) -> None:
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.is_calm = model.config.kind == "calm"
        if model.config.eos_token_id is None:  # the engine stops on the tokenizer's EOS, as `calm generate`
            model.config.eos_token_id = tokenizer.eos_id
        self.eos = model.config.eos_token_id
        self.engine = Engine(model, max_batch_size, batch_wait, compile)
        self.created = int(time.time())
        self.chat_template = chat_template
        if chat_template is not None:
            compile_chat_template(chat_template)  # a template with a syntax error fails here, not per request

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r} "
                                "(see GET /v1/models)", "model", "model_not_found")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "calmlm"}

    def _check_common(self, req: CompletionRequest | ChatRequest, max_tokens: int | None) -> None:
        self.check_model(req.model)
        t = req.temperature
        if not math.isfinite(t) or t <= 0:
            raise APIError(400, f"temperature must be a finite number > 0, got {t}", "temperature")
        if self.is_calm and t > 1:
            raise APIError(400, f"CALM temperature must be in (0, 1], got {t}: likelihood-free sampling can only "
                                "sharpen the model's distribution (use 1 for plain sampling)", "temperature")
        if req.top_p is not None and req.top_p != 1:
            raise APIError(400, "top_p is not supported by calm serve; use temperature (and top_k for the "
                                "baseline)", "top_p")
        if self.is_calm and req.top_k is not None:
            raise APIError(400, "top_k applies to the baseline only; CALM has no token distribution to truncate",
                           "top_k")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")

    def _check_logprobs(self, req: CompletionRequest | ChatRequest, top: int, most: int) -> None:
        if self.is_calm:
            raise APIError(400, "CALM is likelihood-free: it samples the next chunk without computing token "
                                "probabilities, so there are no logprobs to return. Measure CALM with BrierLM "
                                "instead (`calm eval`).", "logprobs")
        if not 0 <= top <= most:
            raise APIError(400, f"the number of top logprobs must be between 0 and {most}, got {top}", "logprobs")
        if req.stream:
            raise APIError(400, "logprobs are not supported with stream: true; ask without streaming", "logprobs")

    def _decode(self, req: CompletionRequest | ChatRequest, prompts: list[list[int]], max_tokens: int | None,
                logprobs: int | None, prefixes: list[str] | None = None) -> _Decode:
        """A _Decode for ``prompts`` with its engine requests, checked but not yet submitted."""
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings", "stop")
        decode = _Decode(self, len(prompts), req.n, stops, prefixes)
        for i, ids in enumerate(prompts):
            r = Request(ids, max_tokens if max_tokens is not None else self.engine.room(len(ids)), decode.emit_for(i),
                        temperature=req.temperature, n=req.n, seed=req.seed, top_k=req.top_k,
                        sampler=req.calm_sampler, pool_size=req.calm_pool_size, logprobs=logprobs)
            try:
                self.engine.check(r)
            except CalmError as e:
                raise APIError(400, str(e)) from None
            decode.requests.append(r)
        return decode

    def completion(self, req: CompletionRequest) -> _Decode:
        self._check_common(req, req.max_tokens)
        if req.logprobs is not None:
            self._check_logprobs(req, req.logprobs, 5)
            if req.echo:
                raise APIError(400, "echo with logprobs (the prompt's log-probabilities) is not implemented by calm "
                                    "serve; score prompts with lm-evaluation-harness (`--model calmlm`)", "echo")
        prompt = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompt:
            raise APIError(400, "prompt must not be an empty list", "prompt")
        if all(isinstance(p, int) for p in prompt):  # one prompt of token ids
            prompts, texts = [list(prompt)], [self.tokenizer.decode(prompt)]
        else:
            prompts, texts = self.tokenizer.encode_batch(prompt), list(prompt)
        return self._decode(req, prompts, req.max_tokens, req.logprobs, texts if req.echo else None)

    def chat(self, req: ChatRequest) -> _Decode:
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        self._check_common(req, max_tokens)
        top = None
        if req.logprobs or req.top_logprobs:
            if not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            top = req.top_logprobs or 0
            self._check_logprobs(req, top, 20)
        if not req.messages:
            raise APIError(400, "messages must not be empty", "messages")
        return self._decode(req, [self.tokenizer.encode(self.chat_prompt(req.messages))], max_tokens, top)

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        try:
            return chat_prompt(_as_dicts(messages), self.chat_template, self.tokenizer)
        except DataError as e:
            raise APIError(400, str(e), "messages") from None


@dataclass
class _Choice:
    """One choice's tokens and text (``_Decode._add`` applies EOS, max_tokens and stop strings)."""

    prefix: str = ""
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    sent: int = 0  # characters of prefix + text already streamed
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per token in ids, if asked


class _Decode:
    """Collects the engine's tokens for one HTTP request (several prompts x n choices) from the worker thread
    into an asyncio queue, and turns them into choices."""

    def __init__(self, server: Server, prompts: int, n: int, stops: list[str],
                 prefixes: list[str] | None = None) -> None:
        self.server, self.n, self.stops = server, n, stops
        self.hold = max((len(s) for s in stops), default=1) - 1  # characters that may start a stop string
        self.choices = [_Choice(prefixes[i // n] if prefixes else "") for i in range(prompts * n)]
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.requests: list[Request] = []
        self.pending = prompts

    def emit_for(self, index: int) -> Any:
        """The engine's ``emit`` for prompt ``index``: called from the worker thread, so hand over to the loop."""
        return lambda item: self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events(self) -> AsyncIterator[list[int]]:
        """Yield the indices of choices that changed, until every prompt is finished."""
        while self.pending:
            index, item = await self.queue.get()
            request = self.requests[index]
            group = self.choices[index * self.n:(index + 1) * self.n]
            if isinstance(item, Exception):
                self.cancel()
                raise APIError(500, f"generation failed: {type(item).__name__}: {item}", kind="server_error")
            if item is None:
                self.pending -= 1
                for c in group:
                    c.finish = c.finish or "length"
            else:
                for j, (c, tokens) in enumerate(zip(group, item.tokens)):
                    self._add(c, tokens, request.max_tokens, item.logprobs[j] if item.logprobs else None)
                if all(c.finish for c in group):
                    request.cancel()  # e.g. every choice met a stop string: free its batch rows
            yield list(range(index * self.n, (index + 1) * self.n))

    def _add(self, c: _Choice, tokens: list[int], max_tokens: int, logprobs: list[Any] | None = None) -> None:
        if c.finish:
            return
        for i, t in enumerate(tokens):
            if t == self.server.eos:
                c.finish = "stop"
                break
            c.ids.append(t)
            if logprobs is not None:
                c.logprobs.append(logprobs[i])
            if len(c.ids) >= max_tokens:
                c.finish = "length"
                break
        c.text = self.server.tokenizer.decode(c.ids, skip_special_tokens=True)
        hits = [i for i in (c.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            c.text, c.finish = c.text[:min(hits)], "stop"

    def delta(self, c: _Choice) -> str:
        """New text safe to stream: all of it once finished, else without what might begin a stop string or
        an incomplete UTF-8 character."""
        full = c.prefix + c.text
        safe = full if c.finish else full[:len(full) - self.hold].rstrip("\ufffd")
        out = safe[c.sent:]
        c.sent = max(c.sent, len(safe))
        return out

    def logprobs(self, c: _Choice, chat: bool) -> dict[str, Any] | None:
        """The OpenAI ``logprobs`` object of a choice, or None: every token it generated (after a stop string,
        up to the end of the step that met it)."""
        if not c.logprobs:
            return None
        name = self.server.tokenizer.decode
        pieces = [(name([t]), lp, [(name([i]), v) for i, v in top]) for t, (lp, top) in zip(c.ids, c.logprobs)]
        if chat:
            def entry(tok: str, lp: float) -> dict[str, Any]:
                return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}
            return {"content": [{**entry(tok, lp), "top_logprobs": [entry(a, v) for a, v in top]}
                                for tok, lp, top in pieces]}
        tokens = [tok for tok, _, _ in pieces]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in pieces],
                "top_logprobs": [dict(top) for _, _, top in pieces],
                "text_offset": list(accumulate(map(len, tokens[:-1]), initial=len(c.prefix)))}

    def usage(self, prompt_tokens: int) -> dict[str, int]:
        completion = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}


def create_app(server: Server) -> Any:
    """The FastAPI application for ``server``."""
    from fastapi import FastAPI
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="calm serve", description="OpenAI-compatible API for calmlm models")

    @app.exception_handler(APIError)
    async def api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            problems.append("the request body is not valid JSON" if err.get("type") == "json_invalid"
                            else f"{where}: {err.get('msg')}")
        param = next((str(err["loc"][-1]) for err in e.errors() if err.get("loc")), None)
        return await api_error(request, APIError(400, "invalid request: " + "; ".join(problems), param))

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def crashed(request: HTTPRequest, e: Exception) -> JSONResponse:
        return await api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return server.model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        return await respond(req, server.completion(req), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        return await respond(req, server.chat(req), chat=True)

    async def respond(req: CompletionRequest | ChatRequest, decode: _Decode, chat: bool) -> Any:
        prompt_tokens = sum(len(r.prompt_ids) for r in decode.requests)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        for r in decode.requests:
            server.engine.submit(r)
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(server, decode, rid, created, chat, include_usage, prompt_tokens),
                                     media_type="text/event-stream")
        try:
            async for _ in decode.events():
                pass
        finally:
            decode.cancel()
        choices = []
        for i, c in enumerate(decode.choices):
            content = {"message": {"role": "assistant", "content": c.text}} if chat else {"text": c.prefix + c.text}
            choices.append({"index": i, **content, "logprobs": decode.logprobs(c, chat), "finish_reason": c.finish})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": server.model_name, "choices": choices, "usage": decode.usage(prompt_tokens)}

    return app


async def _stream(server: Server, decode: _Decode, rid: str, created: int, chat: bool, include_usage: bool,
                  prompt_tokens: int) -> AsyncIterator[str]:
    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": created, "model": server.model_name, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def piece(i: int, text: str, finish: str | None) -> dict[str, Any]:
        content = {"delta": {"content": text} if text else {}} if chat else {"text": text}
        return {"index": i, **content, "logprobs": None, "finish_reason": finish}

    reported: set[int] = set()
    try:
        if chat:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(decode.choices))])
        async for changed in decode.events():
            out = []
            for i in changed:
                c = decode.choices[i]
                text = decode.delta(c)
                finish = c.finish if c.finish and i not in reported else None
                if finish:
                    reported.add(i)
                if text or finish:
                    out.append(piece(i, text, finish))
            if out:
                yield event(out)
        if include_usage:
            yield event([], decode.usage(prompt_tokens))
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        decode.cancel()  # the client went away, or we are done: free the batch rows
