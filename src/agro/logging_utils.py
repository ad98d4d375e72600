"""Run logging: ``metrics.jsonl`` (the source of truth), TensorBoard, W&B, events, a progress bar.

* :class:`MetricsLogger` appends one JSON object per step to ``output_dir/metrics.jsonl`` (keys
  sorted, numbers as floats, NaN/inf as ``null``, each line flushed and fsync-ed so a ``kill -9``
  loses at most the line being written), mirrors the numbers to TensorBoard (``output_dir/tb``)
  and optionally to Weights & Biases, and appends discrete events (skipped steps, warnings,
  evaluations, resumes) to ``output_dir/events.jsonl``. On resume it first cuts ``metrics.jsonl``
  back to the checkpoint's step, and TensorBoard purges the events after it.
* :class:`TrainProgress` shows a rich progress bar with one readable line per step above it, or
  plain lines (no control characters) when stdout is not a terminal, e.g. in CI logs.
* :func:`read_metrics` reads ``metrics.jsonl`` back, skipping (and counting) a partial last line.

Departure from the paper: none (the paper does not discuss logging). Besides the caller's
metrics, each row records ``step`` (int) and ``time`` (Unix seconds).
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, TextIO

from .fileio import atomic_write_text

__all__ = [
    "MetricsLogger",
    "MetricsRows",
    "TrainProgress",
    "format_step_line",
    "read_metrics",
    "truncate_metrics",
]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


# --------------------------------------------------------------------------- value conversion
def _metric_value(key: str, v: Any) -> float | str | None:
    """A metric as stored in a row: a finite float, None (missing or non-finite) or a string."""
    if v is None or isinstance(v, str):
        return v
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:     # 0-d tensor / numpy scalar
        v = v.item()
    if isinstance(v, numbers.Real):
        f = float(v)
        return f if math.isfinite(f) else None
    raise TypeError(f"metric {key!r}: expected a number, None or a string, got "
                    f"{type(v).__name__} {v!r:.80}")


def _json_safe(v: Any) -> Any:
    """Any value made JSON-serialisable for events: non-finite floats -> None, arrays -> lists."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "tolist"):                                  # tensors, numpy arrays and scalars
        return _json_safe(v.tolist())
    return str(v)


def _append_line(f: TextIO, obj: dict[str, Any]) -> None:
    f.write(json.dumps(obj, sort_keys=True, allow_nan=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _repair_tail(path: Path) -> None:
    """Make ``path`` end with a newline before appending: drop a partial last line (killed writer)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start = size
        while start > 0:                       # find the start of the last line
            step = min(1 << 16, start)
            f.seek(start - step)
            chunk = f.read(step)
            i = chunk.rfind(b"\n")
            if i >= 0:
                start = start - step + i + 1
                break
            start -= step
        f.seek(start)
        tail = f.read()
        try:
            json.loads(tail)
            f.write(b"\n")                     # a complete record that only lacks its newline
        except ValueError:
            log.warning("%s: dropping a partial last line (%d bytes) left by a killed process",
                        path, len(tail))
            f.truncate(start)
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: Path | str, resume_step: int) -> int:
    """Keep only the rows of a metrics file with ``step <= resume_step``; return how many dropped.

    Rows without a step are kept; unparseable lines (a partial line from a killed process) are
    dropped. The file is replaced atomically (written to a temporary file, fsync-ed, renamed).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) \
                and row["step"] > resume_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(x + "\n" for x in kept))
        log.info("%s: resuming at step %d, dropped %d later row(s)", path, resume_step, dropped)
    return dropped


# --------------------------------------------------------------------------- metrics logger
class MetricsLogger:
    """Log per-step metrics to ``metrics.jsonl``, TensorBoard and (optionally) W&B.

    Args:
        output_dir: the run directory (created if needed).
        tensorboard: also write scalars to ``output_dir/tb`` (warns once and goes on without it if
            tensorboard is not installed).
        wandb: also log to Weights & Biases, imported lazily; if it is not installed, a warning is
            printed and the run goes on. The W&B run id is kept in ``output_dir/wandb_run_id.txt``
            so a resumed run continues the same W&B run.
        wandb_project: the W&B project.
        config: the run's config, passed to W&B.
        resume_step: when resuming from a checkpoint at this step: rows with a larger step are
            first removed from ``metrics.jsonl`` and TensorBoard purges its events after it.
    """

    def __init__(
        self,
        output_dir: Path | str,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "agro",
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.events_path = self.output_dir / EVENTS_FILE
        if resume_step is not None:
            truncate_metrics(self.metrics_path, resume_step)
        _repair_tail(self.metrics_path)
        self._metrics_f: TextIO | None = open(self.metrics_path, "a", encoding="utf-8")
        self._events_f: TextIO | None = None
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                _warn_once("tensorboard", f"TensorBoard logging is off: cannot import it ({e}); "
                           "metrics still go to metrics.jsonl")
            else:
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(log_dir=str(self.output_dir / "tb"), purge_step=purge)
        self._wandb = self._init_wandb(wandb_project, config) if wandb else None
        if resume_step is not None:
            self.log_event("resume", step=resume_step)

    def _init_wandb(self, project: str, config: dict[str, Any] | None) -> Any:
        try:
            import wandb
        except ImportError:
            msg = ("wandb=True but Weights & Biases is not installed (pip install wandb); "
                   "continuing without it: metrics still go to metrics.jsonl and TensorBoard")
            log.warning(msg)
            return None
        id_file = self.output_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        return wandb.init(project=project, config=_json_safe(config or {}), id=run_id,
                          resume="allow", dir=str(self.output_dir))

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Append one row for ``step``; return the row as written.

        ``metrics`` maps names to numbers (Python, numpy or 0-d tensors), None or strings.
        Numbers are stored as floats, non-finite ones as null. A ``step`` key in ``metrics`` is
        ignored in favour of the argument.
        """
        if self._metrics_f is None:
            raise RuntimeError("MetricsLogger is closed")
        row: dict[str, Any] = {k: _metric_value(k, v) for k, v in metrics.items() if k != "step"}
        row["step"] = int(step)
        row.setdefault("time", round(time.time(), 3))
        _append_line(self._metrics_f, row)
        scalars = {k: v for k, v in row.items()
                   if isinstance(v, float) and k not in ("step", "time")}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=row["step"])
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])
        return row

    def log_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Append ``{"kind": kind, "time": ..., **fields}`` to ``events.jsonl``; return it."""
        if self._metrics_f is None:
            raise RuntimeError("MetricsLogger is closed")
        if self._events_f is None:
            _repair_tail(self.events_path)
            self._events_f = open(self.events_path, "a", encoding="utf-8")
        event = {"time": round(time.time(), 3), **_json_safe(fields), "kind": str(kind)}
        _append_line(self._events_f, event)
        return event

    def close(self) -> None:
        """Close the files and writers (idempotent)."""
        for f in (self._metrics_f, self._events_f):
            if f is not None:
                f.close()
        self._metrics_f = self._events_f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- reading back
class MetricsRows(list):
    """The rows of a metrics file (a list of dicts); ``skipped_lines`` counts unreadable lines."""

    skipped_lines: int = 0


def read_metrics(run_dir: Path | str) -> MetricsRows:
    """Read ``run_dir/metrics.jsonl`` (or the file ``run_dir`` itself) as a list of dicts.

    A partial last line (a process killed mid-write) is skipped and counted in
    ``rows.skipped_lines``, as is any other unparseable line (with a warning, as that is not
    expected). Raises ``FileNotFoundError`` if there is no metrics file.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such metrics file (is {run_dir} an agro run "
                                "directory?)")
    rows = MetricsRows()
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            rows.skipped_lines += 1
            if i < len(lines) - 1:
                log.warning("%s:%d: skipping an unreadable line", path, i + 1)
            continue
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- progress
def _fixed(x: Any, digits: int) -> str:
    if x is None or not math.isfinite(x):
        return "nan"
    return f"{x:.{digits}f}"


def _small(x: Any) -> str:
    """Three decimals, or scientific notation for tiny/huge magnitudes (KL, loss)."""
    if x is None or not math.isfinite(x):
        return "nan"
    return f"{x:.3f}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _human(x: Any) -> str:
    if x is None or not math.isfinite(x):
        return "nan"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.1f}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def format_step_line(step: int, total: int, metrics: Mapping[str, Any]) -> str:
    """One readable line for a training step, e.g.

    ``step 12/40 | reward 0.41 acc 0.38 | kl 0.012 | loss -0.031 | 14.2 s (1.9k tok/s) | fresh 1.00``

    Reads ``reward_mean``, ``accuracy``, ``kl_k1`` (else ``kl_k3``), ``loss``, ``step_seconds``,
    ``tokens_per_second``, ``fresh_fraction`` and ``eval_sampled_accuracy``; absent ones are left out,
    None/NaN print as ``nan``.
    """
    m = {k: (_metric_value(k, v) if not isinstance(v, str) else None) for k, v in metrics.items()}
    parts = [f"step {step:>{len(str(total))}}/{total}"]
    ra = []
    if "reward_mean" in m:
        ra.append(f"reward {_fixed(m['reward_mean'], 2)}")
    if "accuracy" in m:
        ra.append(f"acc {_fixed(m['accuracy'], 2)}")
    if ra:
        parts.append(" ".join(ra))
    kl_key = "kl_k1" if "kl_k1" in m else "kl_k3" if "kl_k3" in m else None
    if kl_key:
        parts.append(f"kl {_small(m[kl_key])}")
    if "loss" in m:
        parts.append(f"loss {_small(m['loss'])}")
    if "step_seconds" in m:
        t = f"{_fixed(m['step_seconds'], 1)} s"
        if "tokens_per_second" in m:
            t += f" ({_human(m['tokens_per_second'])} tok/s)"
        parts.append(t)
    elif "tokens_per_second" in m:
        parts.append(f"{_human(m['tokens_per_second'])} tok/s")
    if "fresh_fraction" in m:
        parts.append(f"fresh {_fixed(m['fresh_fraction'], 2)}")
    if "eval_sampled_accuracy" in m:
        parts.append(f"eval acc {_fixed(m['eval_sampled_accuracy'], 3)}")
    return " | ".join(parts)


class TrainProgress:
    """A rich progress bar (bar, step/total, elapsed, remaining) with one line per step above it.

    When ``enabled`` is False or ``file`` (default: stdout) is not a terminal, each
    :meth:`update` prints just the plain line (no colours, no cursor movement), so CI logs get
    one readable line per step.
    """

    def __init__(self, total_steps: int, enabled: bool = True, start_step: int = 0,
                 file: TextIO | None = None):
        self.total_steps = int(total_steps)
        self._file = file if file is not None else sys.stdout
        self._progress = None
        self._task = None
        if enabled and getattr(self._file, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            console = Console(file=self._file)
            if console.is_terminal:
                self._progress = Progress(
                    TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("elapsed"), TimeElapsedColumn(),
                    TextColumn("remaining"), TimeRemainingColumn(),
                    console=console)
                self._task = self._progress.add_task("train", total=self.total_steps,
                                                     completed=start_step)
                self._progress.start()

    @property
    def rich(self) -> bool:
        """True when the rich bar is shown (enabled and writing to a terminal)."""
        return self._progress is not None

    def update(self, step: int, metrics: Mapping[str, Any]) -> str:
        """Print the line for ``step`` (completed steps so far) and move the bar; return the line."""
        line = format_step_line(step, self.total_steps, metrics)
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
            self._progress.update(self._task, completed=step)
        else:
            print(line, file=self._file, flush=True)
        return line

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> "TrainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
