"""Shared by the A/B benches (bench/phases.py, bench/sampler_logprob_ab.py): interleaved rounds,
medians, and the JSON record of every timing."""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def order(r: int, a, b) -> tuple:
    """Round ``r``'s order of two arms: a, b on even rounds, b, a on odd ones (so neither arm
    always runs first, after the same thing)."""
    return (a, b) if r % 2 == 0 else (b, a)


def medians(rows: dict[str, list]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in rows.items()}


def write_json(path: str | None, cpu: str, precision: str, torch_version: str,
               rows: dict[str, list], med: dict[str, float]) -> None:
    """Every round's timings and their medians, with the CPU and torch they ran on."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"cpu": cpu, "precision": precision, "torch": torch_version,
                                      "rounds": rows, "medians": med}, indent=1))
