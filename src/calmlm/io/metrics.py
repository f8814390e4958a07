"""A training run's ``metrics.jsonl``: one JSON record per line (train, eval, ...), appended as the run goes.

The one reader of that file, for the trainer's resume, ``calm compare``, the quickstart and model cards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (none when it does not exist); a line cut by a crash is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_eval(path: Path, key: str | None = None) -> dict[str, Any] | None:
    """The last evaluation record (holding ``key``, if given) of a run's metrics.jsonl, or None. ``path``: the
    metrics.jsonl file, or a run or checkpoint folder (its metrics.jsonl, else the one in the folder above)."""
    files = [path] if path.is_file() else [path / METRICS_FILE, path.parent / METRICS_FILE]
    for metrics in files:
        evals = [r for r in read_metrics(metrics) if r.get("type") == "eval" and (key is None or key in r)]
        if evals:
            return evals[-1]
    return None
