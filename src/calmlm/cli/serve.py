"""`calm serve`: an OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import CalmError
from ..io.loading import load_model_and_tokenizer, resolve
from .options import DEVICE_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a CALM or baseline checkpoint over an OpenAI-compatible HTTP API",
                       description="Serve POST /v1/completions and /v1/chat/completions (stream: true for "
                                   "server-sent events), GET /v1/models and GET /health. Live requests are decoded "
                                   "as one batch; new ones join it between decode steps. Needs the serve extra: "
                                   "pip install 'calmlm[serve]'.")
    p.add_argument("--model", required=True, help="checkpoint folder (native or reference format) or Hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as `model` (default: the name of the --model folder, e.g. `calm` "
                        "for runs/calm, or the Hub repo id)")
    p.add_argument("--max-batch-size", type=int, default=32, help="most sequences (requests x n) decoded at once")
    p.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long a new batch waits for more requests after its first one (later ones join "
                        "the running batch)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tokenizer", default=None, help="tokenizer file/folder if the checkpoint has none")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float64"], default="auto",
                   help="auto = bfloat16 on GPUs, the stored dtype on CPU")
    p.add_argument("--compile", action="store_true",
                   help="decode steps on static KV caches (one per batch-size and length bucket), compiled with "
                        "torch.compile and, on GPUs, replayed as CUDA graphs; each new bucket compiles first")
    p.set_defaults(func=run)


def build_server(model_path: str, device: str | None = None, tokenizer: str | None = None, dtype: str = "auto",
                 max_batch_size: int = 32, served_model_name: str | None = None, batch_wait_ms: float = 2.0,
                 compile: bool = False):
    """Load the checkpoint and wrap it in a :class:`calmlm.serve.app.Server` (also used by the tests)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise CalmError(f"calm serve needs FastAPI and uvicorn ({e.name} is missing); "
                        "install them with: pip install 'calmlm[serve]'") from None
    from ..serve.app import Server, read_chat_template

    model, tok = load_model_and_tokenizer(model_path, device, tokenizer, dtype, purpose="serving")
    folder = resolve(model_path)
    name = served_model_name or served_name(model_path)
    template = read_chat_template(Path(tokenizer) if tokenizer and Path(tokenizer).is_dir() else folder)
    return Server(model, tok, name, max_batch_size=max_batch_size, chat_template=template,
                  batch_wait=batch_wait_ms / 1000, compile=compile)


def served_name(model_path: str) -> str:
    """The default model name: what the user passed, as other OpenAI-compatible servers do: the folder's name
    (``runs/calm`` -> ``calm``, not its inner ``checkpoint``; a weights file names its folder), or the Hub id."""
    path = Path(model_path).expanduser()
    if not path.exists():
        return model_path
    return Path(os.path.abspath(path.parent if path.is_file() else path)).name  # abspath: "." and ".." have names


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve.app import create_app

    server = build_server(args.model, args.device, args.tokenizer, args.dtype, args.max_batch_size,
                          args.served_model_name, args.batch_wait_ms, args.compile)
    print(f"serving {'CALM' if server.is_calm else 'baseline'} model {server.model_name!r} on "
          f"http://{args.host}:{args.port}/v1 (max batch {args.max_batch_size} sequences)", flush=True)
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    finally:
        server.engine.close()
    return 0
