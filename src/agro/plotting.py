"""Curves of one or more run directories in one image (``agro plot``, and ``curves.png`` at the end
of ``agro train``).

Six panels, several runs overlaid (one colour each), in the order of :data:`PANELS`:

* held-out accuracy (sampled, temperature 1) at the evaluation points: before training and after
  it (``kind == "eval"`` events in ``events.jsonl``, ``when`` = before/after) and every
  ``eval_every`` steps (``eval_sampled_accuracy`` in ``metrics.jsonl``);
* training reward (``reward_mean``; train-sample accuracy is drawn too only where it differs,
  i.e. with non-binary rewards, as with binary rewards the two are the same curve);
* completion length (``completion_len_mean``; held-out ``sampled_len_mean`` as markers);
* KL(pi || pi_ref) per completion (``kl_k1``, agro_math.md §5; held-out ``kl_pi_ref`` as markers,
  the same k1 estimate on held-out samples);
* the loss;
* training reward against KL, the view of the paper's Figure 1.

Per-step values are drawn faintly with a centred moving average (``smooth`` points) on top;
evaluations are hollow markers. Uses matplotlib's object-oriented API on an Agg canvas, so it never
touches pyplot's global backend (safe in notebooks and headless machines alike).

Departure from the paper: none (the paper plots reward against KL; the other panels are the
diagnostics a run is watched by).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from agro.logging_utils import EVENTS_FILE, METRICS_FILE, read_metrics

__all__ = ["PANELS", "Panel", "eval_points", "make_figure", "plot_runs", "moving_average"]

KL_KEY = "kl_k1"


class Panel(NamedTuple):
    """One axes of the figure: ``key`` is also the axes' label (``ax.get_label()``)."""

    key: str
    title: str
    ylabel: str
    x: str          # "step" or KL_KEY


PANELS = (
    Panel("heldout_accuracy", "held-out accuracy (sampled, T = 1)", "accuracy", "step"),
    Panel("reward", "training reward", "mean reward per sample", "step"),
    Panel("completion_len", "completion length", "tokens (mean)", "step"),
    Panel("kl", "KL(π ‖ π_ref)", "nats per completion (k1)", "step"),
    Panel("loss", "loss", "loss", "step"),
    Panel("reward_vs_kl", "training reward vs KL(π ‖ π_ref)", "mean reward per sample", KL_KEY),
)
_XLABEL = {"step": "step", KL_KEY: "KL(π ‖ π_ref), nats per completion (k1, smoothed)"}
# metrics.jsonl key drawn per step, and the held-out evaluation key drawn as markers
_SERIES = {"reward": ("reward_mean", None), "completion_len": ("completion_len_mean", "sampled_len_mean"),
           "kl": (KL_KEY, "kl_pi_ref"), "loss": ("loss", None)}


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


def _num(v: Any) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else math.nan


def _column(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([_num(r.get(key)) for r in rows], dtype=float)


def eval_points(run_dir: Path | str, rows: list[dict[str, Any]] | None = None) -> list[dict]:
    """The held-out evaluations of a run, sorted by step: ``[{"step", "when", "sampled_accuracy",
    "kl_pi_ref", "sampled_len_mean"}, ...]`` (missing values are NaN).

    Sources: ``kind == "eval"`` events in ``events.jsonl`` (an event without ``step`` is placed at
    step 0 for ``when == "before"`` and at the last metrics step otherwise) and the
    ``eval_sampled_accuracy`` / ``eval_kl_pi_ref`` / ``eval_sampled_len_mean`` columns of
    ``metrics.jsonl`` (``eval_every``). At one step an event wins over a metrics row, a later event
    over an earlier one. ``rows``: the run's metrics rows if already read.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir) if rows is None else rows
    steps = [s for s in (_num(r.get("step")) for r in rows) if not math.isnan(s)]
    last = int(max(steps)) if steps else 0
    keys = ("sampled_accuracy", "kl_pi_ref", "sampled_len_mean")
    points: dict[int, dict] = {}
    for r in rows:
        if math.isfinite(_num(r.get("eval_sampled_accuracy"))) and "step" in r:
            points[int(r["step"])] = {"step": int(r["step"]), "when": "during",
                                      **{k: _num(r.get(f"eval_{k}")) for k in keys}}
    events = run_dir / EVENTS_FILE
    if events.is_file():
        for line in events.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue                       # a partial line left by a killed process
            if not isinstance(ev, dict) or ev.get("kind") != "eval":
                continue
            when = str(ev.get("when", ""))
            step = _num(ev.get("step"))
            step = int(step) if not math.isnan(step) else (0 if when == "before" else last)
            points[step] = {"step": step, "when": when, **{k: _num(ev.get(k)) for k in keys}}
    return [points[s] for s in sorted(points)]


def _default_labels(run_dirs: list[Path]) -> list[str]:
    """Run directory names; parent/name where names collide."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n
            for p, n in zip(run_dirs, names)]


def _load(run_dir: Path) -> list[dict[str, Any]]:
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} here (is it an agro run directory?)")
    rows = [r for r in read_metrics(run_dir) if math.isfinite(_num(r.get("step")))]
    if not rows:
        raise ValueError(f"{run_dir / METRICS_FILE}: no rows to plot")
    return sorted(rows, key=lambda r: r["step"])


def make_figure(run_dirs: Sequence[Path | str], labels: Sequence[str] | None = None,
                smooth: int = 5):
    """The figure (a ``matplotlib.figure.Figure`` on an Agg canvas) for ``run_dirs``; one axes per
    entry of :data:`PANELS`, in that order, each labelled with the panel's key.

    Raises ``FileNotFoundError`` naming a run directory without ``metrics.jsonl``, ``ValueError``
    for one whose metrics file has no rows or for a wrong number of labels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise ValueError("plot: no run directories given")
    labels = list(labels) if labels is not None else _default_labels(run_dirs)
    if len(labels) != len(run_dirs):
        raise ValueError(f"plot: {len(labels)} labels for {len(run_dirs)} runs")
    runs = [_load(d) for d in run_dirs]

    fig = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = {p.key: ax for p, ax in zip(PANELS, fig.subplots(2, 3).ravel())}
    drawn = {p.key: False for p in PANELS}

    def curve(ax, x, y, color, label=None, ls="-"):
        """Raw values faintly, the moving average on top (same x; no line where no raw data)."""
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            return False
        if smooth > 1:
            ax.plot(x[ok], y[ok], color=color, alpha=0.2, lw=0.8, marker=".", ms=2, ls=ls)
        ys = moving_average(y, smooth)
        ok &= np.isfinite(ys)
        ax.plot(x[ok], ys[ok], color=color, lw=1.8, label=label, ls=ls)
        return True

    def markers(ax, x, y, color, label=None, connect=False):
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            return False
        ax.plot(x[ok], y[ok], color=color, ls="-" if connect else "none", lw=1.2, marker="o",
                ms=7, mfc="white", mew=1.6, label=label, zorder=3)
        return True

    last_step = 0.0
    for i, (rows, label, run_dir) in enumerate(zip(runs, labels, run_dirs)):
        color = f"C{i % 10}"
        step = _column(rows, "step")
        evals = eval_points(run_dir, rows)
        ev = {k: np.array([e[k] for e in evals], dtype=float)
              for k in ("step", "sampled_accuracy", "kl_pi_ref", "sampled_len_mean")}

        acc = ev["sampled_accuracy"]
        ok = np.isfinite(acc)
        text = f"{label}: " + " → ".join(f"{a:.3f}" for a in (acc[ok][0], acc[ok][-1])) \
            if ok.sum() >= 2 else label
        drawn["heldout_accuracy"] |= markers(axes["heldout_accuracy"], ev["step"], acc, color,
                                             text, connect=True)
        if ok.sum() <= 12:                   # few points: print the values next to them
            for x, a in zip(ev["step"][ok], acc[ok]):
                axes["heldout_accuracy"].annotate(f"{a:.3f}", (x, a), textcoords="offset points",
                                                  xytext=(0, 8), ha="center", fontsize="small",
                                                  color=color)
        last_step = max(last_step, np.nanmax(step), np.nanmax(ev["step"], initial=0))

        for key, (mkey, ekey) in _SERIES.items():
            drawn[key] |= curve(axes[key], step, _column(rows, mkey), color, label)
            if ekey is not None:
                drawn[key] |= markers(axes[key], ev["step"], ev[ekey], color)
        train_acc, reward = _column(rows, "accuracy"), _column(rows, "reward_mean")
        both = np.isfinite(train_acc) & np.isfinite(reward)
        if both.any() and np.abs(train_acc[both] - reward[both]).max() > 1e-9:
            curve(axes["reward"], step, train_acc, color, f"{label} (train accuracy)", ls="--")

        kl = moving_average(_column(rows, KL_KEY), smooth)
        ok = np.isfinite(kl) & np.isfinite(reward)
        if ok.any():
            drawn["reward_vs_kl"] = True
            axes["reward_vs_kl"].plot(kl[ok], moving_average(reward, smooth)[ok], color=color,
                                      lw=1.8, label=label)

    for p in PANELS:
        ax = axes[p.key]
        ax.set_label(p.key)
        ax.set_title(p.title, fontsize="medium")
        ax.set_xlabel(_XLABEL[p.x])
        ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
        if p.x == "step":
            ax.set_xlim(-0.03 * max(last_step, 1), max(last_step, 1) * 1.03)
        if p.key == "heldout_accuracy":
            ax.set_ylim(-0.03, 1.08)
        if p.key in ("heldout_accuracy", "reward") and drawn[p.key]:   # colours -> runs
            ax.legend(fontsize="small")
        if not drawn[p.key]:
            why = "no held-out evaluations in this run" if p.key == "heldout_accuracy" \
                else f"no {p.key} data"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
    note = "○ = held-out evaluation (before, every eval_every steps, after)"
    if smooth > 1:
        note = f"lines: moving average over {smooth} steps (raw values faint);  " + note
    fig.suptitle(note, fontsize="small")
    return fig


def plot_runs(
    run_dirs: Sequence[Path | str],
    out_path: Path | str,
    labels: Sequence[str] | None = None,
    smooth: int = 5,
) -> Path:
    """Write the figure of :func:`make_figure` for ``run_dirs`` to ``out_path`` (PNG, or any
    format matplotlib knows by the suffix; parent directories are created). Returns ``out_path``.

    Args:
        run_dirs: run directories, each holding a ``metrics.jsonl`` (and optionally
            ``events.jsonl``, read for the before/after evaluations).
        labels: legend labels, one per run (default: the run directory names).
        smooth: moving-average window in steps for the per-step curves (1 = no smoothing).
    """
    fig = make_figure(run_dirs, labels, smooth)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    return out_path
