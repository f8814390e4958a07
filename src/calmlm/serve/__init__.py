"""``calm serve``: an OpenAI-compatible HTTP server with continuous batching (the ``calmlm[serve]`` extra)."""

from .engine import Engine, Request

__all__ = ["Engine", "Request"]
