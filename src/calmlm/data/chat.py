"""Chat messages -> the prompt text a model continues: one renderer for fine-tuning data and ``calm serve``.

Without a template, every message becomes a ``Role: content`` line and the prompt ends with ``Assistant:``;
with a tokenizer's Jinja ``chat_template`` (Hugging Face's convention), the template renders it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, NoReturn

from ..errors import DataError


def _raise_exception(message: str) -> NoReturn:
    raise ValueError(message)


@lru_cache(maxsize=8)
def compile_chat_template(template: str) -> Any:
    """A Jinja chat template compiled once, in a sandbox with Hugging Face's ``raise_exception`` global."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment()
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def chat_prompt(messages: Sequence[Mapping[str, Any]], template: str | None = None, tokenizer: Any = None) -> str:
    """The prompt of a chat before the assistant's reply (see the module docstring), rendered by the tokenizer's Jinja
    ``template`` with ``add_generation_prompt=True`` when given; ``calm serve`` builds its prompts with it too.
    Raises DataError when the template refuses the messages (e.g. by ``raise_exception``)."""
    if template is None:
        return "".join(f"{str(m['role']).capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    specials = {f"{r}_token": getattr(tokenizer, f"{r}_token", None) or "" for r in ("bos", "eos", "pad")}
    compiled = compile_chat_template(template)
    try:
        return compiled.render(messages=list(messages), add_generation_prompt=True, **specials)
    except Exception as e:  # e.g. a template that raises on roles it does not support
        raise DataError(f"the model's chat template refused these messages: {e}") from None
