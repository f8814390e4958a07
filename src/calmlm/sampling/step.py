"""The decode step on static buffers: compiled once, and on CUDA replayed as one CUDA graph.

At batch 1 a decode step is hundreds of small kernels; on a GPU launching them from Python costs more than
running them (eagerly a CALM-M step takes about 10 ms on an H200). With ``compile=True`` (``generate``,
``calm generate --compile``, ``calm serve --compile``) every step after the prompt goes through a
:class:`StaticStep`: a function of fixed-shape inputs over a static KV cache (``KVCache(static=True)``: the
write position lives on the device and attention reads the whole buffer under a mask), so that

* ``torch.compile`` (inductor) compiles it once, with no recompilation as the sequence grows;
* on CUDA it is then captured in a CUDA graph, after two warm-up runs, and a step is one graph replay.

The prompt (prefill) runs eagerly, apart from the step. Random draws stay outside the step: they are drawn
eagerly with the caller's generator and passed in, so the step makes exactly the draws of the eager loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

StepFn = Callable[..., torch.Tensor]


class StaticStep:
    """``step(*inputs)`` = ``fn(*args, *inputs)`` -> a tensor, for fixed input shapes, advancing ``cache`` (one of
    ``args``) by ``width`` positions per call. ``args`` are the fixed arguments (model, cache, options).

    ``compile``: run ``fn`` through ``torch.compile``. Dynamo keeps its compilations on ``fn``'s code, guarded
    by the arguments (the model, the shapes), so later steps and later calls with the same shapes reuse them;
    ``fn`` is therefore a module-level function, never a fresh closure. ``graph``: capture the step in a CUDA
    graph at the first call and replay it afterwards (default: when the cache is on a CUDA device)."""

    def __init__(self, fn: StepFn, cache: Any, args: tuple[Any, ...], width: int = 1, compile: bool = True,
                 graph: bool | None = None) -> None:
        self.fn, self.args = (torch.compile(fn) if compile else fn), args
        self.cache, self.width = cache, width
        self.graph = cache.k[0].device.type == "cuda" if graph is None else graph
        if self.graph and not cache.static:
            raise ValueError("a CUDA graph needs a static KV cache (new_cache(..., static=True))")
        self._graph: Any = None
        self._inputs: list[torch.Tensor] = []
        self._output: torch.Tensor | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.cache.check_room(self.width)
        if not self.graph:
            length = self.cache.length
            out = self.fn(*self.args, *inputs)
            if self.cache.length == length:  # compiled code leaves the Python length (KVCache.advance): count here
                self.cache.length += self.width
            return out
        if self._graph is None:
            self._capture(inputs)
        for buf, x in zip(self._inputs, inputs):
            buf.copy_(x)
        self._graph.replay()  # advances the cache's device position itself
        self.cache.length += self.width
        return self._output.clone()  # the next replay overwrites the output buffer

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        cache = self.cache
        self._inputs = [x.clone() for x in inputs]
        length, position = cache.length, cache.position.clone()

        def rewind() -> None:  # a warm-up or the capture must leave the cache where it was
            cache.length = length
            cache.position.copy_(position)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compilation, cuBLAS workspaces, the allocator's pools
            for _ in range(2):
                self.fn(*self.args, *self._inputs)  # writes this step's keys/values; the first replay rewrites them
                rewind()
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._output = self.fn(*self.args, *self._inputs)
        rewind()  # the capture ran the Python once; replays advance the cache in __call__


def compile_frozen(fn: StepFn) -> StepFn:
    """``torch.compile(fn)`` with the weights it reads frozen into the compiled code (inductor's ``freezing``): on
    CPU inductor then pre-packs them for its matrix products (for the small preset's decoder at batch 1, about
    8 % of a compiled CALM step on our CPU). Only for weights that never change once compiled, such as CALM's
    frozen autoencoder: an in-place update of a frozen weight would go unnoticed. It applies when gradients
    are off."""
    compiled = torch.compile(fn)

    def call(*args: Any) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=True):  # read when (re)compiling, which any call may do
            return compiled(*args)

    return call
