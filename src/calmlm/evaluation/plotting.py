"""PNG figures: accuracy against diversity under temperature (paper figures 10-11) and the autoencoder's
accuracy against latent noise, and `calm compare`'s BrierLM against training compute. matplotlib is imported
only when a figure is drawn, with the Agg backend so no display is needed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import CalmError

Points = Sequence[Mapping[str, Any]]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise CalmError("plotting needs matplotlib, which is not installed; install it with: "
                        "pip install 'calmlm[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _finish(plt: Any, fig: Any, ax: Any, title: str, path: str | Path) -> Path:
    """Title, grid and legend shared by every figure; save it and free it even if saving fails."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise CalmError(f"the figure file {path} should end in .png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
        return path
    finally:
        plt.close(fig)


def _temperature_label(t: float) -> str:
    inv = 1.0 / t
    return f"T=1/{round(inv)}" if abs(inv - round(inv)) < 1e-6 and round(inv) > 1 else f"T={t:g}"


def plot_accuracy_diversity(series: Mapping[str, Points] | Points, path: str | Path,
                            title: str | None = None) -> Path:
    """Accuracy (mean 1{x=y}) against collision rate (mean 1{x1=x2}) for one or more models.

    ``series`` maps a label (e.g. the model path) to the points of
    :func:`calmlm.evaluation.brierlm.accuracy_diversity`, or is one such list. Points with a pool size are joined
    per pool size (lines across temperatures); each point is annotated with its temperature."""
    plt = _pyplot()
    if not isinstance(series, Mapping):
        series = {"model": series}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, points in series.items():
        groups: dict[Any, list[Mapping[str, Any]]] = {}
        for p in points:
            groups.setdefault(p.get("pool_size"), []).append(p)
        plain = groups.pop(None, [])
        lines = {f"{label} (N={pool})": pts + plain for pool, pts in sorted(groups.items())} or {label: plain}
        for name, pts in lines.items():
            pts = sorted(pts, key=lambda p: -p["temperature"])  # T=1 starts every pool's line
            ax.plot([p["collision"] for p in pts], [p["accuracy"] for p in pts], marker="o", label=name)
        for p in points:
            ax.annotate(_temperature_label(p["temperature"]), (p["collision"], p["accuracy"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("collision rate  P(x1 = x2)  (lower = more diverse)")
    ax.set_ylabel("accuracy  P(x = y)")
    return _finish(plt, fig, ax, title or "Accuracy vs diversity under temperature", path)


def plot_accuracy_vs_noise(results: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Token and chunk reconstruction accuracy of an autoencoder against the latent noise sigma.

    ``results`` is :func:`calmlm.evaluation.autoencoder.evaluate_autoencoder`'s dict (``sigmas``, ``token_accuracy``
    and ``chunk_accuracy`` keyed by ``str(sigma)``), or a mapping of labels to such dicts to compare
    several autoencoders."""
    plt = _pyplot()
    runs = {"": results} if "sigmas" in results else dict(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, r in runs.items():
        if "sigmas" not in r:
            raise CalmError(f"results {label!r} have no 'sigmas'; pass evaluate_autoencoder's output")
        sigmas = [float(s) for s in r["sigmas"]]
        for key, style in (("token_accuracy", "-o"), ("chunk_accuracy", "--s")):
            values = r[key]
            ys = [100 * (values[str(s)] if isinstance(values, Mapping) else values[i])
                  for i, s in enumerate(r["sigmas"])]
            ax.plot(sigmas, ys, style, label=f"{label} {key.replace('_', ' ')}".strip())
    ax.set_xlabel("latent noise std sigma")
    ax.set_ylabel("reconstruction accuracy (%)")
    ax.set_ylim(0, 100.5)
    return _finish(plt, fig, ax, title or "Autoencoder robustness to latent noise", path)


def plot_compare(result: Mapping[str, Any], path: str | Path, x: str = "flops") -> Path:
    """BrierLM against training FLOPs (log x) or training minutes for every run of a ``calm compare`` result,
    with the baseline's final score as a dashed line. CALM's cost includes its autoencoder's training."""
    if x not in ("flops", "time"):
        raise CalmError(f"x must be 'flops' or 'time', got {x!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, run in result["runs"].items():
        pts = sorted(run["points"], key=lambda p: p["train_flops"])
        xs = [p["train_flops"] if x == "flops" else p["train_seconds"] / 60 for p in pts]
        label = f"CALM K={run['chunk_size']}" if run["kind"] == "calm" else "baseline"
        ax.plot(xs, [p["brierlm"] for p in pts], marker="o", label=label)
    ax.axhline(result["baseline_final"]["brierlm"], color="gray", linestyle="--", linewidth=0.8,
               label="baseline, final")
    if x == "flops":
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (CALM: with its autoencoder)")
    else:
        ax.set_xlabel("training wall-clock minutes (CALM: with its autoencoder)")
    ax.set_ylabel(f"BrierLM (block {result['block_size']})")
    return _finish(plt, fig, ax, "BrierLM against training compute", path)
