"""The temperature samplers of two git revisions, side by side: identical outputs, and time per call.

A refactor of ``calmlm.sampling.temperature`` should change neither what it samples nor how fast. This loads
the module from ``--base`` (exported with ``git archive``) and from the working tree, runs each case on the same
seeds, checks the outputs are equal, and times both alternately in one process (median of ``--repeats`` calls
each, one thread). Cases: the exact batch sampler (64 positions, K=4 token rows from a Zipf over 40 rows) at
T=0.6 (stage 1 + Bernoulli factories) and T=0.5 (stage 1 only), and the batch approximation on a pool of 200
draws (numpy and torch paths, and torch with ``num_values``). Usage:
    python benchmarks/sampler_revisions.py --base REV [--repeats 41] [--out bench_out/sampler_revisions.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.common import REPO, write_json  # noqa: E402

MODULE = "src/calmlm/sampling/temperature.py"


def load_module(path: Path, name: str) -> ModuleType:
    """``temperature.py`` as a module of the package ``calmlm.sampling`` (its relative imports resolve there)."""
    spec = importlib.util.spec_from_file_location(f"calmlm.sampling.{name}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up there
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def export(rev: str, folder: Path) -> Path:
    """The module's file at ``rev``, written under ``folder``."""
    path = folder / "temperature.py"
    path.write_bytes(subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=REPO, capture_output=True,
                                    check=True).stdout)
    return path


def cases(positions: int = 64) -> dict[str, Callable[[ModuleType], object]]:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50, (positions, 40, 4), generator=g)
    probs = torch.arange(1, 41, dtype=torch.float64) ** -1.5
    picks = torch.multinomial(probs, 200 * positions, replacement=True, generator=g).view(positions, 200, 1)
    pool = rows.gather(1, picks.expand(-1, -1, 4))

    def exact(t: ModuleType, temperature: float) -> object:
        draws = torch.Generator().manual_seed(1)

        def draw(m: int, active: torch.Tensor) -> torch.Tensor:
            idx = torch.multinomial(probs, len(active) * m, replacement=True, generator=draws).view(len(active), m)
            return rows[active][torch.arange(len(active))[:, None], idx]

        return t.exact_temperature_sample_batch(draw, positions, temperature, torch.Generator().manual_seed(2))

    def batch(t: ModuleType, **kw: object) -> object:
        return t.batch_temperature_sample(pool, 0.5, torch.Generator().manual_seed(3), **kw)

    return {"exact_batch_T0.6": lambda t: exact(t, 0.6), "exact_batch_T0.5": lambda t: exact(t, 0.5),
            "batch_T0.5_numpy": lambda t: batch(t),
            "batch_T0.5_torch": lambda t: batch(t, use_numpy=False),
            "batch_T0.5_torch_num_values": lambda t: batch(t, use_numpy=False, num_values=50)}


def _equal(a: object, b: object) -> bool:
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    return torch.equal(a, b)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "sampler_revisions.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import calmlm.sampling  # noqa: F401  (the package both copies of the module load into)

    with tempfile.TemporaryDirectory() as tmp:
        base = load_module(export(args.base, Path(tmp)), "temperature_base")
    new = load_module(REPO / MODULE, "temperature_new")
    rows = {}
    for name, fn in cases().items():
        same = _equal(fn(base), fn(new))
        times: dict[str, list[float]] = {"base": [], "new": []}
        for _ in range(args.repeats):
            for key, module in (("base", base), ("new", new)):
                start = time.perf_counter()
                fn(module)
                times[key].append(time.perf_counter() - start)
        base_s, new_s = statistics.median(times["base"]), statistics.median(times["new"])
        rows[name] = {"identical_output": same, "base_ms": 1e3 * base_s, "new_ms": 1e3 * new_s,
                      "new_over_base": new_s / base_s}
        print(f"{name:<30} identical={same}  base {1e3 * base_s:.3f} ms  new {1e3 * new_s:.3f} ms  "
              f"ratio {new_s / base_s:.3f}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True, text=True)
    result = {"base": args.base, "base_commit": commit.stdout.strip(), "cases": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
