"""Decoding speed of two git revisions side by side: the same tokens, and tokens/s at batch 1.

A change to the decode path (KV cache, generation loop, compiled step) should keep every token and make decoding
faster. This exports ``src/calmlm`` at ``--base`` (``git archive``) as the package ``calmlm_base``, builds CALM and
the baseline there and in the working tree with the same random weights, checks that ``generate`` gives the
same tokens for the same seed (old eager, new eager and new ``compile=True``), then times them alternately in
one process: each repeat generates ``--new-tokens`` tokens with every variant in turn (the order rotated).
Reports tokens/s from the median wall time and CPU time per call (and the best of each); the CPU-time figure
is the one to trust on a machine shared with other work (time spent waiting for a core is not counted; with
several threads it includes their spinning). Usage:
    python benchmarks/decode_revisions.py --base REV [--preset small] [--batch 1] [--repeats 9] [--no-compile]
        [--out bench_out/decode_revisions.json]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.common import REPO, write_json  # noqa: E402
from benchmarks.generation import build_pair  # noqa: E402


def import_revision(rev: str, folder: Path, name: str = "calmlm_base"):
    """``src/calmlm`` at ``rev`` imported as the package ``name`` (its imports are relative)."""
    archive = subprocess.run(["git", "archive", rev, "src/calmlm"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "src" / "calmlm").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def base_models(base, calm, baseline):
    """The base revision's CALM and baseline with the weights of ``calm`` and ``baseline``."""
    old_calm = base.models.calm.CALM(base.config.CALMConfig.from_dict(calm.config.to_dict()))
    old_base = base.models.baseline.BaselineLM(base.config.BaselineConfig.from_dict(baseline.config.to_dict()))
    for old, new in ((old_calm, calm), (old_base, baseline)):
        old.load_state_dict(new.state_dict())
        old.to(next(new.parameters()).dtype).eval()
    return old_calm, old_base


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--preset", default="small", help="CALM and baseline preset (default small)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--no-compile", action="store_true", help="skip the new revision's compile=True")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "decode_revisions.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from calmlm.sampling.generation import generate

    with tempfile.TemporaryDirectory() as tmp:  # the base revision's files stay until the end (lazy imports)
        base = import_revision(args.base, Path(tmp))
        return _compare(args, base, generate)


def _compare(args: argparse.Namespace, base, generate) -> dict:
    for module in ("models.baseline", "models.calm", "sampling.generation"):
        importlib.import_module(f"{base.__name__}.{module}")
    base_generation = base.sampling.generation
    device = torch.device("cpu")
    calm, baseline = build_pair(args.preset, args.preset, device, torch.float32)
    old_calm, old_base = base_models(base, calm, baseline)
    rows = {}
    for kind, new_model, old_model in (("calm", calm, old_calm), ("baseline", baseline, old_base)):
        prompt = torch.randint(3, new_model.config.vocab_size, (args.batch, args.prompt_len))
        kw = dict(max_new_tokens=args.new_tokens, temperature=args.temperature)
        variants = {"base": lambda s, m=old_model: base_generation.generate(m, prompt, seed=s, **kw),
                    "new": lambda s, m=new_model: generate(m, prompt, seed=s, **kw)}
        if not args.no_compile:
            variants["new_compiled"] = lambda s, m=new_model: generate(m, prompt, seed=s, compile=True, **kw)
        start = time.perf_counter()
        outputs = {name: fn(0) for name, fn in variants.items()}  # also the warm-up (and compilation)
        warmup_s = time.perf_counter() - start
        same = {name: bool(torch.equal(out, outputs["base"])) for name, out in outputs.items()}
        times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
        names = list(variants)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no variant always goes first
                wall, cpu, _ = timed(functools.partial(variants[name], r + 1))
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
        tokens = args.batch * args.new_tokens
        row = {"identical_output": same, "warmup_and_compile_s": round(warmup_s, 1)}
        for name, t in times.items():
            wall, cpu = statistics.median(t["wall"]), statistics.median(t["cpu"])
            row[name] = {"tokens_per_s_wall": round(tokens / wall, 1), "tokens_per_s_cpu": round(tokens / cpu, 1),
                         "median_wall_s": round(wall, 4), "median_cpu_s": round(cpu, 4),
                         "best_wall_s": round(min(t["wall"]), 4), "best_cpu_s": round(min(t["cpu"]), 4)}
        for name in names[1:]:
            for clock in ("wall", "cpu"):
                ratio = row[name][f"tokens_per_s_{clock}"] / row["base"][f"tokens_per_s_{clock}"]
                row[f"{name}_over_base_{clock}"] = round(ratio, 3)
        rows[kind] = row
        print(kind, row, flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True, text=True)
    result = {"benchmark": "decode_revisions", "base": args.base, "base_commit": commit.stdout.strip(),
              "preset": args.preset, "batch": args.batch, "temperature": args.temperature,
              "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats,
              "dtype": "float32", "results": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
