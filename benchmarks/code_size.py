"""Size of ``src/`` at git revisions: lines per package, split into code, docstrings, comments and blank lines.

Code size is a figure the project tracks (issue 11: one way to do each thing, src/ measurably smaller). A line
counts as a docstring when it lies in a module, class or function docstring, as a comment when it holds only a
comment, as blank when it is empty; every other line is code. Usage:
    python benchmarks/code_size.py [REV ...] [--out bench_out/code_size.json]      (default REV: HEAD)
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from benchmarks.common import REPO, write_json  # noqa: E402

KINDS = ("code", "docstring", "comment", "blank")


def line_kinds(source: str) -> Counter[str]:
    """How many lines of ``source`` are code, docstring, comment and blank."""
    lines = source.splitlines()
    kinds = ["blank" if not line.strip() else "comment" if line.strip().startswith("#") else "code" for line in lines]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                kinds[first.lineno - 1:first.end_lineno] = ["docstring"] * (first.end_lineno - first.lineno + 1)
    return Counter({kind: kinds.count(kind) for kind in KINDS})


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def revision_size(rev: str, root: str = "src") -> dict[str, dict[str, int]]:
    """Line kinds of every ``*.py`` file under ``root`` at ``rev``, summed per package folder and in total."""
    packages: dict[str, Counter[str]] = {}
    for path in _git("ls-tree", "-r", "--name-only", rev, root).split():
        if path.endswith(".py"):
            counts = line_kinds(_git("show", f"{rev}:{path}"))
            for key in (str(Path(path).parent.relative_to(root)), "total"):
                packages.setdefault(key, Counter()).update(counts)
    return {name: {"lines": sum(c.values()), **{k: c[k] for k in KINDS}} for name, c in sorted(packages.items())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="*", default=["HEAD"], help="git revisions (commits, tags, branches)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "code_size.json")
    args = parser.parse_args(argv)
    result = {rev: {"commit": _git("rev-parse", "--short", rev).strip(), "src": revision_size(rev)}
              for rev in args.revs}
    for rev, r in result.items():
        total = r["src"]["total"]
        print(f"{rev} ({r['commit']}): {total['lines']} lines, {total['code']} code, {total['docstring']} docstring, "
              f"{total['comment']} comment, {total['blank']} blank")
    write_json(args.out, {"revisions": result})
    return result


if __name__ == "__main__":
    main()
