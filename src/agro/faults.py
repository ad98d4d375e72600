"""Fault injection for crash tests: ``AGRO_FAULT=point:N`` SIGKILLs this process the N-th time
execution reaches ``point`` (1-based). Unset (the normal case) it costs one dict lookup.

Points: ``collect`` (after generation, before grading and reference log-probs), ``backward``
(after a micro-batch's backward, before the optimizer step), ``checkpoint`` (inside
``save_checkpoint``, after the weights are written and before the checkpoint is complete),
``actor`` (a Ray rollout actor, at the start of each request; async_generation passes
AGRO_FAULT on to its actors).
The kill -9 tests in tests/test_kill_resume.py use it to die at exact places; no code path
depends on it otherwise.
"""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def maybe_crash(point: str) -> None:
    spec = os.environ.get("AGRO_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
