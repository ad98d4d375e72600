"""Where each training group comes from: fresh, replay, offline, stale, and a per-group mixer.

Every source hands the learner whole :class:`~agro.rollouts.Group` records that carry their
provenance (``source``, ``policy_version``, sampling settings). The learner never needs to know
which source a group came from, except that on-policy-only loss terms apply to fresh groups of
the current policy sampled at temperature 1 (``Group.is_on_policy``).

- ``fresh``: groups sampled now from the current policy (one ``rollout(k)`` call per step).
- ``replay``: the paper's §8.3 setting — a FIFO buffer of past fresh groups (``capacity``); each
  fresh slot is, with probability ``replay_prob``, filled by a stored group chosen uniformly at
  random instead (groups are replayed whole). Every fresh group is added to the buffer.
- ``offline``: groups read from files written by ``agro generate``; sampled without replacement
  in epochs; no generation at all.
- ``stale``: emulates asynchronous actors: the groups trained on at policy version v were
  generated at version ``max(0, v - lag)`` (a FIFO pipeline of depth ``lag``).

Every source keeps its state (buffer, queue, RNG) in plain types so that a checkpoint restores it
exactly and a resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Callable, Protocol

from .rollouts import Group

RolloutFn = Callable[[int, int], list[Group]]   # (num_groups, policy_version) -> fresh groups


def _rng_state(rng: random.Random) -> list:
    v, internal, gauss = rng.getstate()
    return [v, list(internal), gauss]


def _set_rng_state(rng: random.Random, s: list) -> None:
    rng.setstate((s[0], tuple(s[1]), s[2]))


class GroupSource(Protocol):
    name: str

    def take(self, k: int, version: int) -> list[Group]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, d: dict) -> None: ...


class FreshSource:
    name = "fresh"

    def __init__(self, rollout: RolloutFn):
        self.rollout = rollout

    def take(self, k: int, version: int) -> list[Group]:
        return self.rollout(k, version) if k > 0 else []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


class ReplaySource:
    """Fresh generation with a replay buffer (§8.3): each slot is replayed with prob. p."""

    name = "replay"

    def __init__(self, rollout: RolloutFn, capacity: int, replay_prob: float, seed: int):
        self.rollout = rollout
        self.capacity = int(capacity)
        self.replay_prob = float(replay_prob)
        self.rng = random.Random(seed + 7919)
        self.buffer: list[Group] = []

    def take(self, k: int, version: int) -> list[Group]:
        replay_slots = sum(
            1 for _ in range(k) if self.buffer and self.rng.random() < self.replay_prob
        )
        replayed = [
            self.buffer[self.rng.randrange(len(self.buffer))].with_source("replay")
            for _ in range(replay_slots)
        ]
        fresh = self.rollout(k - replay_slots, version) if k - replay_slots > 0 else []
        for g in fresh:
            self.buffer.append(g)
        if len(self.buffer) > self.capacity:
            del self.buffer[: len(self.buffer) - self.capacity]
        return fresh + replayed

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng), "buffer": [g.to_dict() for g in self.buffer]}

    def load_state_dict(self, d: dict) -> None:
        _set_rng_state(self.rng, d["rng"])
        self.buffer = [Group.from_dict(g) for g in d["buffer"]]


class OfflineSource:
    """Groups from offline files; without replacement within an epoch, reshuffled per epoch."""

    name = "offline"

    def __init__(self, groups: list[Group], seed: int, rank: int = 0, world: int = 1):
        if not groups:
            raise ValueError("offline source: no groups to train on")
        self.groups = [g.with_source("offline") for g in groups]
        # Data parallel: every process walks the same shuffled order and keeps its slice of
        # each step's draw, so N processes see exactly the groups one process would.
        self.rank, self.world = rank, world
        self.rng = random.Random(seed + 104729)
        self.order: list[int] = []
        self.epoch = 0

    def take(self, k: int, version: int) -> list[Group]:
        out = []
        for _ in range(k * self.world):
            if not self.order:
                self.order = list(range(len(self.groups)))
                self.rng.shuffle(self.order)
                self.epoch += 1
            out.append(self.groups[self.order.pop()])
        return out[self.rank::self.world]

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng), "order": list(self.order), "epoch": self.epoch}

    def load_state_dict(self, d: dict) -> None:
        _set_rng_state(self.rng, d["rng"])
        self.order = list(d["order"])
        self.epoch = int(d["epoch"])


class StaleSource:
    """Asynchronous-actor emulation: train at version v on groups generated at v - lag."""

    name = "stale"

    def __init__(self, rollout: RolloutFn, lag: int):
        self.rollout = rollout
        self.lag = int(lag)
        self.queue: list[list[Group]] = []   # oldest first; each entry one step's groups

    def take(self, k: int, version: int) -> list[Group]:
        if k <= 0:
            return []
        while len(self.queue) < self.lag:   # pipeline fill at start: actors ran ahead at v0
            self.queue.append(self.rollout(k, version))
        self.queue.append(self.rollout(k, version))
        out = self.queue.pop(0)
        if len(out) != k:   # the mix may ask for a different k than was queued
            extra = self.rollout(k - len(out), version) if len(out) < k else []
            out = (out + extra)[:k]
        return [g.with_source("stale") for g in out]

    def state_dict(self) -> dict:
        return {"queue": [[g.to_dict() for g in step] for step in self.queue]}

    def load_state_dict(self, d: dict) -> None:
        self.queue = [[Group.from_dict(g) for g in step] for step in d["queue"]]


class Mixer:
    """Per-group mix of sources: each of the k groups of a step picks a source by weight."""

    def __init__(self, sources: dict[str, GroupSource], weights: dict[str, float], seed: int):
        missing = set(weights) - set(sources)
        if missing:
            raise ValueError(f"mixer: no source built for {sorted(missing)}")
        self.sources = sources
        self.names = sorted(weights)
        self.weights = [weights[n] for n in self.names]
        self.rng = random.Random(seed + 15485863)

    def take(self, k: int, version: int) -> list[Group]:
        if len(self.names) == 1:
            counts = {self.names[0]: k}
        else:
            picks = self.rng.choices(self.names, weights=self.weights, k=k)
            counts = {n: picks.count(n) for n in self.names}
        out: list[Group] = []
        for n in self.names:
            out.extend(self.sources[n].take(counts[n], version))
        return out

    def state_dict(self) -> dict:
        return {
            "rng": _rng_state(self.rng),
            "sources": {n: s.state_dict() for n, s in self.sources.items()},
        }

    def load_state_dict(self, d: dict) -> None:
        _set_rng_state(self.rng, d["rng"])
        for n, s in self.sources.items():
            s.load_state_dict(d["sources"][n])


def build_mixer(
    weights: dict[str, float],
    rollout: RolloutFn,
    *,
    offline_groups: list[Group] | None,
    replay_capacity: int,
    replay_prob: float,
    stale_lag: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
) -> Mixer:
    """Build the sources named in `weights` (from config.parse_source) and their mixer."""
    sources: dict[str, GroupSource] = {}
    for name in weights:
        if name == "fresh":
            sources[name] = FreshSource(rollout)
        elif name == "replay":
            sources[name] = ReplaySource(rollout, replay_capacity, replay_prob, seed + 31 * rank)
        elif name == "offline":
            sources[name] = OfflineSource(offline_groups or [], seed, rank, world)
        elif name == "stale":
            sources[name] = StaleSource(rollout, stale_lag)
        else:  # config validation lists the valid names; this guards library callers
            raise ValueError(f"unknown source {name!r}")
    return Mixer(sources, weights, seed)
