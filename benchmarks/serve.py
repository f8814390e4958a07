"""Serving throughput: ``calm serve`` for CALM and the baseline with the same backbone, side by side.

A real uvicorn server on 127.0.0.1 per model (random weights: speed does not depend on them), and C client
threads that each send completion requests back to back over HTTP (token-id prompts of ``--prompt-len``,
exactly ``--max-tokens`` new tokens: no EOS). Reports requests/s, generated tokens/s, median latency and the
mean number of sequences per decode step (continuous batching), at each concurrency. Usage:
    python benchmarks/serve.py [--calm-preset base --baseline-preset base] [--concurrency 1,4,16]
        [--requests-per-client 4] [--max-tokens 128] [--out bench_out/serve.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from benchmarks.generation import build_pair, resolve_dtype  # noqa: E402


def word_tokenizer(vocab_size: int):
    """A tokenizer with one word per id (t0 t1 ...), so any id a random model draws decodes; no EOS."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from calmlm.data.tokenizer import Tokenizer

    backend = Backend(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return Tokenizer(backend)


class LocalServer:
    """``calm serve``'s app for ``model`` in a uvicorn thread on a free loopback port."""

    def __init__(self, model, name: str, max_batch_size: int, batch_wait_ms: float) -> None:
        import uvicorn

        from calmlm.serve.app import Server, create_app

        model.config.eos_token_id = None  # every request generates exactly max_tokens
        self.server = Server(model, word_tokenizer(model.config.vocab_size), name, max_batch_size=max_batch_size,
                             batch_wait=batch_wait_ms / 1000)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.server), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.server.engine.close()


def load(server: LocalServer, name: str, concurrency: int, per_client: int, prompt_len: int, max_tokens: int,
         options: dict) -> dict:
    """C clients x ``per_client`` requests; throughput over the whole wall time."""
    import httpx

    vocab = server.server.model.config.vocab_size
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        g = torch.Generator().manual_seed(c)
        with httpx.Client(timeout=600) as http:
            for i in range(per_client):
                prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
                body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "seed": c * 1000 + i, **options}
                t0 = time.perf_counter()
                r = http.post(server.url, json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code != 200:
                        errors.append(r.text[:200])
                        continue
                    latencies.append(dt)
                    tokens.append(r.json()["usage"]["completion_tokens"])

    engine = server.server.engine
    steps0, rows0 = engine.steps, engine.rows_stepped
    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    steps = engine.steps - steps0
    return {"concurrency": concurrency, "requests": len(latencies), "wall_s": wall,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "median_latency_s": statistics.median(latencies), "decode_steps": steps,
            "mean_batch": (engine.rows_stepped - rows0) / steps if steps else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calm-preset", default="base")
    ap.add_argument("--baseline-preset", default="base")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0, help="CALM at T<1 uses the batch sampler")
    ap.add_argument("--pool-size", type=int, default=200)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto = bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--out", default="bench_out/serve.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    calm, base = build_pair(args.calm_preset, args.baseline_preset, device, resolve_dtype(args.dtype, device))
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict = {"settings": vars(args), "rows": []}
    for kind, model, options in [("calm", calm, {"calm_pool_size": args.pool_size}), ("baseline", base, {})]:
        server = LocalServer(model, kind, args.max_batch_size, args.batch_wait_ms)
        try:
            load(server, kind, 1, 1, args.prompt_len, min(args.max_tokens, 16), {"temperature": args.temperature,
                                                                                 **options})  # warm-up
            for c in levels:
                row = load(server, kind, c, args.requests_per_client, args.prompt_len, args.max_tokens,
                           {"temperature": args.temperature, **options})
                results["rows"].append({"model": kind, **row})
                print(json.dumps({"model": kind, **{k: round(v, 3) if isinstance(v, float) else v
                                                    for k, v in row.items()}}), flush=True)
        finally:
            server.stop()
    by = {(r["model"], r["concurrency"]): r for r in results["rows"]}
    print("\n| concurrency | CALM req/s | CALM tokens/s | baseline req/s | baseline tokens/s | CALM / baseline |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        a, b = by[("calm", c)], by[("baseline", c)]
        print(f"| {c} | {a['requests_per_s']:.2f} | {a['tokens_per_s']:,.0f} | {b['requests_per_s']:.2f} | "
              f"{b['tokens_per_s']:,.0f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x |")
    path = write_json(args.out, results, device)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
