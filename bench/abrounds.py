"""Shared by the A/B benches (bench/phases.py, sampler_logprob_ab.py, lean_ab.py,
backward_ab.py and others): interleaved rounds, medians, and the JSON record of every timing."""
from __future__ import annotations

import json
import statistics
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def decoder_before_dec04(on: bool = True):
    """Within it, agro.fast_decode decodes as before 2026-12-04: an fp32 cache read over all its
    columns whatever the weights (``on=False``: the code as it is). Restores the settings."""
    import agro.fast_decode as fd

    now = (fd.SLICE_COLUMNS, fd.BF16_CACHE)
    if on:
        fd.SLICE_COLUMNS, fd.BF16_CACHE = 10 ** 9, False
    try:
        yield
    finally:
        fd.SLICE_COLUMNS, fd.BF16_CACHE = now


def order(r: int, a, b) -> tuple:
    """Round ``r``'s order of two arms: a, b on even rounds, b, a on odd ones (so neither arm
    always runs first, after the same thing)."""
    return (a, b) if r % 2 == 0 else (b, a)


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls of ``fn`` after two warm-up calls."""
    import time

    fn(), fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def medians(rows: dict[str, list]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in rows.items()}


def code_version() -> str:
    """The agro commit measured (``git rev-parse --short HEAD``, ``+dirty`` with uncommitted
    changes under src/ or bench/), or "unknown" outside a git checkout."""
    import subprocess

    here = Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--", "src", "bench")
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(path: str | None, cpu: str, precision: str, torch_version: str,
               rows: dict[str, list], med: dict[str, float], **extra) -> None:
    """Every round's timings and their medians, with the CPU and torch they ran on, the agro
    commit (:func:`code_version`) and any ``extra`` fields the bench records."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"cpu": cpu, "precision": precision, "torch": torch_version,
                                      "commit": code_version(), "rounds": rows, "medians": med,
                                      **extra}, indent=1))


def bench_trainer(name: str, *overrides: str):
    """The default job's Trainer for a bench (output in runs/bench-<name>; no evaluation, saves,
    plots or progress bar), with ``key=value`` overrides; prints the CPU it runs on."""
    import torch

    from agro.config import TrainConfig, load_config
    from agro.perf import machine_key
    from agro.trainer import Trainer

    cfg = load_config(TrainConfig, None, [
        "eval_prompts=0", f"output_dir=runs/bench-{name}", "overwrite=true", "progress=false",
        "plot=false", "tensorboard=false", "save_every=0", "save_final=false", *overrides])
    print(f"CPU: {machine_key()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{', '.join(overrides)}")
    return Trainer(cfg)


def one_step_groups(tr, seed: int | None = None) -> list:
    """One step's scored groups sampled by ``tr``'s collector (seeded if ``seed`` is given)."""
    import torch

    examples, prompt_ids = tr.collector.prompts(tr.cfg.prompts_per_step)
    if seed is not None:
        torch.manual_seed(seed)
    return tr.collector.collect(examples, prompt_ids, tr.version)
