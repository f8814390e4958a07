"""Generation speed of two git revisions, side by side: the working tree's ``benchmarks/generation.py`` run with the
package of ``--base`` (exported with ``git archive``) and with the working tree's, alternately, ``--rounds`` times
each.

Each run times CALM and the baseline in one process, so its CALM / baseline ratio is robust to how busy the
machine is; alternating the revisions spreads any drift over both. Reports the median ratio of each
revision per (batch, temperature) and writes every run. Arguments after ``--`` go to generation.py. Usage:
    python benchmarks/generation_revisions.py --base REV [--rounds 2] [--threads N] [--out FILE] --
        --calm-preset small --baseline-preset small --temperatures 0.5 --batches 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.common import REPO, write_json  # noqa: E402


def export(rev: str, folder: Path) -> Path:
    """The tree of ``rev`` written under ``folder``."""
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def run(tree: Path, args: list[str], out: Path, threads: int | None) -> list[dict]:
    """generation.py with the package of ``tree``; its result rows."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "generation.py"), *args, "--out", str(out)],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["results"]


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ours, passed = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the runs (default: torch's own choice)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "generation_revisions.json")
    args = parser.parse_args(ours)
    runs: dict[str, list[list[dict]]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": export(args.base, Path(tmp) / "base"), "new": REPO}
        for _ in range(args.rounds):
            for name, tree in trees.items():
                rows = run(tree, passed, Path(tmp) / f"{name}.json", args.threads)
                runs[name].append(rows)
                for row in rows:
                    print(name, json.dumps(row), flush=True)
    summary = []
    for i, row in enumerate(runs["new"][0]):
        ratio = {name: statistics.median(r[i]["speedup"] for r in runs[name]) for name in runs}
        calm = {name: statistics.median(r[i]["calm_tokens_per_s"] for r in runs[name]) for name in runs}
        summary.append(dict(batch=row["batch"], temperature=row["temperature"], pool_size=row["pool_size"],
                            calm_over_baseline_base=ratio["base"], calm_over_baseline_new=ratio["new"],
                            calm_tokens_per_s_base=calm["base"], calm_tokens_per_s_new=calm["new"]))
        print(json.dumps(summary[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=REPO, capture_output=True, text=True)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    result = {"cpu_model": cpu, "threads": args.threads or torch_threads(), "base": args.base, "base_commit": commit.stdout.strip(), "generation_args": passed,
              "rounds": args.rounds, "summary": summary, "runs": runs}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
