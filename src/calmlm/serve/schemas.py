"""Request bodies of the OpenAI API subset ``calm serve`` implements (validated by pydantic).

Unknown fields are ignored (pydantic's default), as the OpenAI API does for fields a model does not use."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ValidationInfo, field_validator
from pydantic_core import PydanticUndefined


class _Sampling(BaseModel):
    model: str
    temperature: float = 1.0
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    top_k: int | None = None  # baseline only (not in the OpenAI API; vLLM-style extra)
    calm_sampler: Literal["batch", "exact"] = "batch"  # CALM, T < 1: batch approximation or exact rejection
    calm_pool_size: int = 200  # CALM batch sampler: draws per step

    @field_validator("*", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Clients send ``null`` for options they leave unset: treat it as the default."""
        if value is None and info.field_name is not None:
            default = cls.model_fields[info.field_name].default
            if default is not PydanticUndefined:
                return default
        return value


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = ""
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content or [] if part.get("type") == "text")


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
