"""Training curves from one or more run directories (``agro plot``).

A 2x2 figure: accuracy and mean reward against the step, and against KL(pi || pi_ref) (the
``kl_k1`` estimator, see agro_math.md §5), with several runs overlaid. Noisy per-step values are
drawn faintly and a centred moving average (``smooth`` points) on top; held-out evaluation points
(``eval_accuracy``, written at some steps) are drawn as markers on the accuracy panels.

Uses matplotlib's object-oriented API on an Agg canvas, so it never touches pyplot's global
backend (safe in notebooks and headless machines alike).

Departure from the paper: none; the paper's Figure 1 also plots reward against KL.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from agro.logging_utils import METRICS_FILE, read_metrics

__all__ = ["plot_runs", "plot_main", "moving_average"]

KL_KEY = "kl_k1"
_PANELS = (   # (row, col, y key, x key, y label)
    (0, 0, "accuracy", "step", "accuracy (train samples)"),
    (0, 1, "reward_mean", "step", "mean reward"),
    (1, 0, "accuracy", KL_KEY, "accuracy (train samples)"),
    (1, 1, "reward_mean", KL_KEY, "mean reward"),
)
_XLABEL = {"step": "step", KL_KEY: "KL(π ‖ π_ref)  (k1 estimate)"}


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of ``y`` ([N]) over ``window`` points, NaN-aware, same length.

    Near the ends the window shrinks to the points available; NaNs are left out of each mean.
    ``window <= 1`` returns ``y`` unchanged.
    """
    y = np.asarray(y, dtype=float)
    if window <= 1 or y.size == 0:
        return y
    ok = np.isfinite(y)
    vals = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    cnts = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(y.size)
    lo = np.clip(i - (window - 1) // 2, 0, y.size)
    hi = np.clip(i + window // 2 + 1, 0, y.size)
    n = cnts[hi] - cnts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (vals[hi] - vals[lo]) / np.maximum(n, 1), np.nan)


def _column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    out = np.full(len(rows), np.nan)
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[i] = v
    return out


def _default_labels(run_dirs: list[Path]) -> list[str]:
    """Run directory names; parent/name where names collide."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n
            for p, n in zip(run_dirs, names)]


def plot_runs(
    run_dirs: Sequence[Path | str],
    out_path: Path | str,
    labels: Sequence[str] | None = None,
    smooth: int = 5,
) -> Path:
    """Plot the training curves of ``run_dirs`` into one PNG (or any format by suffix).

    Args:
        run_dirs: run directories, each holding a ``metrics.jsonl``.
        out_path: the image to write (parent directories are created).
        labels: legend labels, one per run (default: the run directory names).
        smooth: moving-average window in steps for the curves (1 = no smoothing).

    Returns ``out_path``. Raises ``FileNotFoundError`` naming a run directory without
    ``metrics.jsonl`` and ``ValueError`` for one whose metrics file has no rows.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise ValueError("plot_runs: no run directories given")
    if labels is None:
        labels = _default_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"plot_runs: {len(labels)} labels for {len(run_dirs)} runs")
    runs = []
    for d in run_dirs:
        if not (d / METRICS_FILE).is_file():
            raise FileNotFoundError(f"{d}: no {METRICS_FILE} here (is it an agro run directory?)")
        rows = read_metrics(d)
        if not rows:
            raise ValueError(f"{d / METRICS_FILE}: no rows to plot")
        rows = sorted(rows, key=lambda r: r.get("step", 0))
        runs.append(rows)

    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    drawn = np.zeros((2, 2), dtype=bool)
    for rows, label, color in zip(runs, labels, colors):
        cols = {k: _column(rows, k) for k in ("step", "accuracy", "reward_mean", KL_KEY,
                                               "eval_accuracy")}
        smoothed = {k: moving_average(v, smooth) for k, v in cols.items() if k != "eval_accuracy"}
        smoothed["step"] = cols["step"]
        for r, c, ykey, xkey, _ in _PANELS:
            ax = axes[r, c]
            x, y = cols[xkey], cols[ykey]
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                drawn[r, c] = True
                if smooth > 1:
                    ax.plot(x[ok], y[ok], color=color, alpha=0.2, lw=0.8, marker=".", ms=2)
                xs, ys = smoothed[xkey], smoothed[ykey]
                oks = ok & np.isfinite(xs) & np.isfinite(ys)   # no line where no raw data
                ax.plot(xs[oks], ys[oks], color=color, lw=1.8, label=label)
            if ykey == "accuracy":
                ev = cols["eval_accuracy"]
                xe = cols[xkey] if xkey == "step" else smoothed[xkey]
                oke = np.isfinite(ev) & np.isfinite(xe)
                if oke.any():
                    drawn[r, c] = True
                    ax.plot(xe[oke], ev[oke], ls="none", marker="o", ms=6, mfc="white",
                            color=color, mew=1.5, label=f"{label} (held-out eval)")
    for r, c, ykey, xkey, ylabel in _PANELS:
        ax = axes[r, c]
        ax.set_xlabel(_XLABEL[xkey])
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs {_XLABEL[xkey].split('  ')[0]}", fontsize="medium")
        ax.grid(alpha=0.3)
        if drawn[r, c]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {ykey} / {xkey} data", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    if smooth > 1:
        fig.suptitle(f"moving average over {smooth} steps (raw values faint)", fontsize="small")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    return out_path


def plot_main(argv: list[str] | None = None) -> int:
    """``agro plot RUN_DIR... [--out FILE] [--smooth K] [--label NAME ...]``; returns an exit code."""
    p = argparse.ArgumentParser(
        prog="agro plot",
        description="Plot accuracy and reward against step and against KL(pi||pi_ref) for one "
                    "or more run directories (each with a metrics.jsonl).")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--out", type=Path, default=None,
                   help="Output image (default: RUN_DIR/curves.png for one run, ./agro_runs.png "
                        "for several).")
    p.add_argument("--smooth", type=int, default=5,
                   help="Moving-average window in steps (1 = raw curves only). Default: 5.")
    p.add_argument("--label", action="append", default=None, dest="labels",
                   help="Legend label for each run, in order (repeat once per run; default: the "
                        "run directory names).")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error("--smooth must be >= 1")
    if args.labels is not None and len(args.labels) != len(args.run_dirs):
        p.error(f"{len(args.labels)} --label for {len(args.run_dirs)} run directories")
    out = args.out
    if out is None:
        out = args.run_dirs[0] / "curves.png" if len(args.run_dirs) == 1 else Path("agro_runs.png")
    try:
        path = plot_runs(args.run_dirs, out, labels=args.labels, smooth=args.smooth)
    except (FileNotFoundError, ValueError) as e:
        print(f"agro plot: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
