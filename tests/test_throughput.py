"""agro.throughput: the event simulation of generation ahead of the learner matches the closed
form on separate devices, never beats the synchronous loop on shared cores, and never trains on
a batch staler than max_staleness."""
from __future__ import annotations

import itertools
import random

import pytest

from agro.throughput import simulate, steady_state_step


def test_simulation_matches_the_closed_form_on_separate_devices():
    rng = random.Random(0)
    for _ in range(60):
        G, L = rng.uniform(0.5, 10), rng.uniform(0.5, 10)
        A, k, P = rng.randint(1, 4), rng.randint(0, 4), rng.choice([0.0, rng.uniform(0, 1)])
        r = simulate(G, L, actors=A, max_staleness=k, push_seconds=P, steps=300, warmup=40)
        # a window of 260 steps may cut a periodic pattern: at most one cycle G + P + L off
        tol = (G + P + L) / 260
        assert r.step_seconds == pytest.approx(steady_state_step(G, L, A, k, P), abs=tol), (G, L, A, k, P)


@pytest.mark.parametrize("k,A", itertools.product([0, 1, 2, 4], [1, 2]))
def test_staleness_is_bounded_and_shared_cores_gain_nothing(k, A):
    G, L = 3.0, 5.0
    r = simulate(G, L, actors=A, max_staleness=k)
    assert max(r.staleness) <= k and sum(r.staleness.values()) == 200
    shared = simulate(G, L, actors=A, max_staleness=k, shared=True)
    assert shared.step_seconds >= G + L - 1e-9        # processor sharing: no overlap gain
    if k == 0:
        assert set(r.staleness) == {0} and r.step_seconds == pytest.approx(G + L)
    else:
        assert r.step_seconds == pytest.approx(max(L, G / A, (G + L) / (k + 1)))
