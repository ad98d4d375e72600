"""A model of step throughput with generation ahead of the learner by at most ``max_staleness``
policy versions (issue 10 part 2's "model the rest"): pure Python, no torch.

The pipeline: ``actors`` generators each produce one step's batch of groups in ``gen_seconds``
(using whatever weights they hold); one learner consumes the batches in order, ``learn_seconds``
per step, and its step ``t`` makes version ``t + 1``; pushing new weights to an actor costs the
actor ``push_seconds``. A batch for step ``t`` may be started only with weights of version
``>= t - max_staleness`` (``max_staleness = 0``: the synchronous loop, generation waits for the
previous update). When generation and learning share the same cores (``shared=True``, this
2-core CPU), whatever runs at the same time runs at ``1 / (number running)`` of its speed, so
overlap cannot beat the synchronous loop; on separate devices they run at full speed.

:func:`simulate` is an event-driven simulation of exactly that; :func:`steady_state_step` is
the closed form for separate devices, which the simulation must match in steady state
(tests/test_throughput.py).

Departure from the paper: none (the paper has no asynchronous pipeline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PipelineResult:
    step_seconds: float                 # mean learner step time in steady state (after warm-up)
    learner_idle: float                 # fraction of wall time the learner waited for a batch
    actor_idle: float                   # fraction of actor time spent waiting (weights or slots)
    staleness: dict[int, int] = field(default_factory=dict)  # learned-at minus sampled-with version


def steady_state_step(gen_seconds: float, learn_seconds: float, actors: int = 1,
                      max_staleness: int = 1, push_seconds: float = 0.0) -> float:
    """Closed-form steady-state step time on separate devices:
    ``max(L, (G + P) / A, (G + P + L) / (k + 1))``.

    Three bounds: the learner does one step per L; A actors finish one batch per (G + P) each;
    and the staleness window: the batch for step b can start only once step b - k - 1 is done
    and must then be generated (G + P) and learned (L) before step b ends, so k + 1 steps take at
    least G + P + L. k = 0 gives the synchronous loop G + P + L; k >= 1 with one actor gives
    max(L, G + P): generation hidden behind learning, or the reverse.
    """
    G, L, P, A, k = gen_seconds, learn_seconds, push_seconds, actors, max_staleness
    return max(L, (G + P) / A, (G + P + L) / (k + 1))


def simulate(gen_seconds: float, learn_seconds: float, *, actors: int = 1, max_staleness: int = 1,
             push_seconds: float = 0.0, shared: bool = False, steps: int = 200,
             warmup: int = 20) -> PipelineResult:
    """Event-driven simulation of the pipeline (see the module docstring); returns steady-state
    figures over steps ``warmup .. steps``."""
    if steps <= warmup:
        raise ValueError("steps must exceed warmup")
    if actors < 1 or max_staleness < 0 or gen_seconds <= 0 or learn_seconds <= 0:
        raise ValueError("need actors >= 1, max_staleness >= 0, positive times")
    # Each running task has remaining work (seconds at full speed). Time advances to the next
    # task end; with shared=True every running task progresses at 1 / (number running).
    version = 0                       # learner's current version (= steps done)
    ready: dict[int, int] = {}        # step -> version it was sampled with
    next_batch = 0                    # next step index an actor may claim
    actor_task: list[tuple[str, float, int, int] | None] = [None] * actors  # (kind, left, step, ver)
    actor_version = [0] * actors
    learner_task: tuple[float, int] | None = None   # (left, step)
    t = 0.0
    step_ends: list[float] = []
    learner_wait = 0.0
    actor_wait = [0.0] * actors
    stale: dict[int, int] = {}
    wait_from = 0.0
    while version < steps:
        # start whatever can start
        for a in range(actors):
            if actor_task[a] is not None:
                continue
            if actor_version[a] < version:               # newer weights exist: take them first
                actor_task[a] = ("push", push_seconds, -1, version)
                continue
            if next_batch - actor_version[a] <= max_staleness:   # it will be learned at next_batch
                actor_task[a] = ("gen", gen_seconds, next_batch, actor_version[a])
                next_batch += 1
        if learner_task is None and version in ready:
            if t > wait_from and version >= warmup:
                learner_wait += t - wait_from
            lag = version - ready.pop(version)
            stale[lag] = stale.get(lag, 0) + 1
            learner_task = (learn_seconds, version)
        running = sum(x is not None for x in actor_task) + (learner_task is not None)
        if running == 0:
            raise RuntimeError("pipeline deadlock (a bug in the model)")
        speed = 1.0 / running if shared else 1.0
        lefts = [x[1] for x in actor_task if x is not None]
        if learner_task is not None:
            lefts.append(learner_task[0])
        dt = min(lefts) / speed
        t += dt
        if version >= warmup:
            for a in range(actors):
                if actor_task[a] is None:
                    actor_wait[a] += dt
        # progress and finish
        for a in range(actors):
            x = actor_task[a]
            if x is None:
                continue
            left = x[1] - dt * speed
            if left <= 1e-12:
                if x[0] == "push":
                    actor_version[a] = x[3]
                else:
                    ready[x[2]] = x[3]
                actor_task[a] = None
            else:
                actor_task[a] = (x[0], left, x[2], x[3])
        if learner_task is not None:
            left = learner_task[0] - dt * speed
            if left <= 1e-12:
                version += 1
                step_ends.append(t)
                learner_task = None
                wait_from = t
            else:
                learner_task = (left, learner_task[1])
    span = step_ends[-1] - step_ends[warmup - 1] if warmup > 0 else step_ends[-1]
    n = len(step_ends) - max(warmup, 0)
    total = span if span > 0 else math.nan
    return PipelineResult(step_seconds=span / n, learner_idle=learner_wait / total,
                          actor_idle=sum(actor_wait) / (actors * total), staleness=stale)
