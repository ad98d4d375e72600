"""Asynchronous generation: Ray rollout actors that run ahead of the learner by a bounded number of
policy versions (``async_generation=true``, ``max_staleness=k``).

Data flow (one learner, ``A`` actors, each a separate process with its own copy of the policy, the
reference, the sampler and the grader)::

    learner step v:  push weights v (ray.put once, every actor's set_weights)
                     draw the prompts of step v+k (never past the run's last step), split them
                     over the actors (collect requests)
                     wait for the groups of step v (sampled at version v-k, or newer after a restart)
                     learn on them -> weights v+1

A Ray actor runs its calls one at a time in the order one caller sent them, so a request sent
after the push of version v is sampled with exactly version v (each request names the version it
expects and the actor refuses any other): the groups learned at version v are ``min(v, k)``
versions old, fewer only for a request sent again after its actor died (it samples with the
weights last pushed, and is dated so). The prompts are drawn by the learner (its sampler's state is in the
checkpoint) and every request carries its own seed, so a run is reproducible whatever the timing,
and a resumed run is bit-identical to an uninterrupted one of the same ``steps`` (no request is
sent for a step past the end): a checkpoint waits for the requests in
flight and stores their groups (:meth:`AsyncSource.state_dict`); that wait is the price of the
bit-identical resume (reported as ``async_checkpoint_wait_seconds``).

Why Ray (docs/DESIGN.md): the engine verl, OpenRLHF, SkyRL and NeMo-RL build on; one code path
from a laptop (a local instance) to a cluster (``ray_address``); actor restart on failure
(``max_restarts``); weights through the shared-memory object store (one ``ray.put`` per push,
zero-copy reads by the actors of one node). A vLLM server with torch.distributed weight transfer
(TRL's route) would not cover agro's own cached/HF samplers.

Departures from the paper: none in the loss. Groups keep the version that sampled them
(``policy_version``); the learner's existing rule switches on-policy-only terms off for stale ones
(:meth:`agro.rollouts.Group.is_on_policy`), and no loss gets importance weights from this module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import random
import time
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .collect import CollectStats
from .faults import maybe_crash
from .rollouts import Group
from .sources import _rng_state, _set_rng_state
from .tasks import Example

__all__ = ["RolloutWorker", "AsyncSource", "ActorPool", "init_ray", "learner_threads",
           "keep_actors"]


# ------------------------------------------------------------------------------- actor side
class WrongWeights(RuntimeError):
    """An actor got a request for another version than the weights it holds (a push was lost,
    e.g. around a restart): the learner pushes again and re-sends."""


class WrongRun(RuntimeError):
    """An actor got a request of another run than the one it was set up for: an idle actor taken
    from an earlier run (:func:`keep_actors`) that Ray restarted, unseen, with that run's
    arguments. The learner handles it as a restart: reset, weights, re-send."""


class RolloutWorker:
    """What runs inside one actor process: the learner's parts, built from the learner's config
    (the concrete precision it chose), minus the optimizer. Plain Python, so tests can run it
    without Ray; :class:`ActorPool` wraps it in ``ray.remote``."""

    def __init__(self, cfg_dict: dict, index: int, threads: int, grader=None, run: str = ""):
        """``run``: the pool's token; every request names it and a worker of another run refuses
        it (:class:`WrongRun`)."""
        from .builders import (build_collector, build_generator, build_grader, build_models,
                               choose_linear_backend, setup_runtime)
        from .config import TrainConfig, config_from_dict
        from .models import MasterWeights, is_peft

        torch.set_num_threads(max(1, threads))
        cfg = config_from_dict(TrainConfig, {**cfg_dict, "num_threads": max(1, threads)},
                               where=f"rollout actor {index}")
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.cfg = cfg = setup_runtime(cfg, device=device)
        self.index = index
        self.run = run
        self.policy, self.tok, self.reference = build_models(cfg, device=device)
        # the learner's choice (concrete in the config it sends): the same products as its own
        self.cfg = cfg = choose_linear_backend(cfg, self.policy, self.reference.model,
                                               bf16=cfg.precision == "bf16", follow=True)[0]
        if cfg.precision == "bf16":
            self.reference.store_bf16(keep_digest=False)
        self.mixed = (MasterWeights(self.policy)
                      if cfg.precision == "bf16" and not is_peft(self.policy) else None)
        self.sampler_model = self.mixed.work if self.mixed else self.policy
        self.params = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        self.generator = build_generator(cfg, self.sampler_model, self.tok)
        self.grader = build_grader(cfg, grader)
        from .perf import FlopModel

        self.collector = build_collector(cfg, tokenizer=self.tok, generator=self.generator,
                                         grader=self.grader, reference=self.reference, sampler=None,
                                         flop_model=FlopModel.of(self.policy))
        self.version = -1          # no weights pushed yet: the initial model's
        self.busy = 0.0            # seconds spent in set_weights and collect since the last collect

    def ping(self) -> dict:
        return {"pid": os.getpid(), "index": self.index, "threads": torch.get_num_threads(),
                "precision": self.cfg.precision, "run": self.run}

    def check_sampler(self, prompts: list[list[int]], rule: str, tol: float, previous) -> dict:
        """Measure this actor's sampler against its own copy of the policy (the learner's weights
        at this point) and apply the run's rule (``sampler_on_policy``); the same check the
        learner runs when it samples itself (:mod:`agro.sampler_check`). ``previous``: the decision a resumed run
        recorded, kept as it was."""
        check = getattr(self.generator, "check_against", None)
        if check is None:
            return {"lines": [], "record": None}
        from .builders import sampling_params

        cfg = self.cfg
        from .sampler_check import keep_random_state

        with keep_random_state(next(self.sampler_model.parameters()).device):
            lines = check(self.sampler_model, cfg.precision, prompts, cfg.group_size,
                          sampling_params(cfg), rule, tol, previous=previous)
        return {"lines": lines, "record": getattr(self.generator, "record", None),
                "exact": getattr(self.generator, "exact", True)}

    def set_exact(self, exact: bool) -> None:
        """The run's decision on whether this sampler's groups count as draws from pi."""
        if hasattr(self.generator, "exact"):
            self.generator.exact = bool(exact)

    @torch.no_grad()
    def set_weights(self, version: int, weights: dict) -> None:
        """Copy the learner's trainable tensors (fp32 masters / LoRA adapters) into this copy."""
        t0 = time.perf_counter()
        missing = set(self.params) - set(weights)
        if missing:
            raise KeyError(f"rollout actor {self.index}: pushed weights lack {sorted(missing)[:3]}")
        with warnings.catch_warnings():   # the object store's arrays are read-only; we only read
            warnings.simplefilter("ignore", UserWarning)
            for name, p in self.params.items():
                p.copy_(torch.as_tensor(np.asarray(weights[name])).to(p.device))
        if self.mixed:
            self.mixed.refresh()
        sync = getattr(self.generator, "force_sync", None)
        (sync or self.generator.sync_weights)(self.sampler_model)
        self.version = int(version)
        self.busy += time.perf_counter() - t0

    def collect(self, request: dict) -> dict:
        """Sample, grade and score one request's prompts with the weights held now."""
        t0 = time.perf_counter()
        maybe_crash("actor")
        if request.get("run", self.run) != self.run:
            raise WrongRun(f"rollout actor {self.index} was set up for run {self.run or '?'}, "
                           f"request {request['id']} is of run {request['run']}")
        if self.version != request["version"]:   # a push was lost, or a new life got none yet
            raise WrongWeights(f"rollout actor {self.index} holds weights of version "
                               f"{self.version}, request {request['id']} expects version "
                               f"{request['version']}")
        if request.get("exact") is not None:   # the run's sampler decision, also for a life
            self.set_exact(request["exact"])    # that Ray restarted unseen (it starts at True)
        from .builders import seed_everything

        seed_everything(int(request["seed"]))
        examples = [Example(**e) for e in request["examples"]]
        groups = self.collector.collect(examples, request["prompt_ids"], self.version,
                                        source="fresh")
        for g in groups:
            g.meta["actor"] = self.index
        stats = dataclasses.asdict(self.collector.pop_stats())
        self.busy += time.perf_counter() - t0
        busy, self.busy = self.busy, 0.0
        return {"groups": [g.to_dict() for g in groups], "version": self.version,
                "stats": stats, "busy_seconds": busy, "actor": self.index,
                "request": request["id"]}

    def close(self, keep_grader: bool = False) -> None:
        """Close the sampler and the grader (``keep_grader``: the grader stays up, for
        :meth:`reset`)."""
        for obj in (self.generator, None if keep_grader else self.grader):
            close = getattr(obj, "close", None)
            if close is not None:
                close()

    def reset(self, cfg_dict: dict, index: int, threads: int, grader=None, run: str = "") -> dict:
        """Become the worker a new actor with these arguments would be (an idle actor taken by
        the next run of the same process: :func:`keep_actors`); the old parts are closed and
        dropped first, except agro's own sandboxed grader when the new config builds an equal
        one (its sandbox then need not start again). Returns :meth:`ping`'s answer."""
        from .grading import Grader

        old = getattr(self, "grader", None)
        keep = (grader is None and type(old) is Grader
                and old.timeout == float(cfg_dict.get("reward_timeout", -1)))
        if hasattr(self, "collector"):
            self.close(keep_grader=keep)
        self.__dict__.clear()
        gc.collect()
        self.__init__(cfg_dict, index, threads, old if keep else grader, run)
        return self.ping()


# ------------------------------------------------------------------------------- Ray plumbing
def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Start a local Ray instance (``address=''``) or join a cluster; quiet and dashboard-less."""
    import logging

    import ray

    if ray.is_initialized():
        return
    kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kw)


def learner_threads(cfg) -> int | None:
    """On a local Ray instance with num_threads=0, the learner keeps the cores the actors do not
    take (two torch processes on the same cores slow each other 10-20x). None: leave torch's
    setting alone (a cluster, or num_threads set explicitly)."""
    if cfg.ray_address or cfg.num_threads:
        return None
    return max(1, (os.cpu_count() or 1) - cfg.async_actors * cfg.async_actor_cpus)


# Idle actors a finished run of this process left for the next one (keep_actors), by the Ray
# options they were created with: (actor, pid of its process when it was left).
_IDLE: dict[tuple, list] = {}
_KEEP = [False]


@contextlib.contextmanager
def keep_actors():
    """Within this block, a run that took all its steps leaves its rollout actors idle for the
    next run of this process with the same actor options, which resets them to its own config
    (:meth:`RolloutWorker.reset`) instead of starting new processes: an actor's start (a Python
    process importing torch and transformers) took ~6 s here, and ``agro repro`` runs many
    async runs in one process. The idle actors are killed when the block ends."""
    prev, _KEEP[0] = _KEEP[0], True
    try:
        yield
    finally:
        _KEEP[0] = prev
        if not prev and _IDLE:
            import ray

            for actors in _IDLE.values():
                for a, _ in actors:
                    _kill(ray, a)
            _IDLE.clear()


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:   # already dead, or a handle of an earlier Ray session
        pass


def actor_env(cfg, environ=os.environ) -> dict[str, str]:
    """Environment variables every rollout actor starts with (Ray ``runtime_env``): its OpenMP
    threads, this process's oneDNN cache capacities (``agro.allocator.onednn_cache_env``: the
    cap the ``agro`` command sets, which actors on a cluster would not inherit), and fault
    injection (agro.faults) when set."""
    from .allocator import onednn_cache_env

    env = {"OMP_NUM_THREADS": str(cfg.async_actor_cpus), **onednn_cache_env(environ)}
    if environ.get("AGRO_FAULT"):
        env["AGRO_FAULT"] = environ["AGRO_FAULT"]
    return env


class ActorError(RuntimeError):
    """An actor died more often than async_max_restarts, or did not answer in async_timeout."""


class ActorPool:
    """``cfg.async_actors`` Ray actors running :class:`RolloutWorker`; Ray restarts a dead one up
    to ``async_max_restarts`` times (its lost requests are sent again by :class:`AsyncSource`)."""

    def __init__(self, cfg, cfg_dict: dict, grader=None):
        """``grader``: None builds the real sandboxed grader in each actor; an object (it must
        pickle) is sent to every actor instead (tests use a deterministic fake)."""
        import ray

        init_ray(cfg.ray_address, None)
        self.ray = ray
        self.timeout = float(cfg.async_timeout)
        self.max_restarts = int(cfg.async_max_restarts)
        env = actor_env(cfg)
        remote = ray.remote(RolloutWorker).options(
            num_cpus=cfg.async_actor_cpus, num_gpus=cfg.async_actor_gpus,
            max_restarts=self.max_restarts, max_task_retries=0, runtime_env={"env_vars": env})
        # An idle actor (keep_actors) has the same options, so the same resources and restart
        # budget. Ray restarts an actor with the arguments it was created with, another run's
        # for a kept one: every request names this pool's run token, a worker of another run
        # refuses it (WrongRun) and revive() resets it. vLLM actors are never kept (an engine
        # is not rebuilt in the same process).
        self.key = (cfg.ray_address, cfg.async_actor_cpus, cfg.async_actor_gpus,
                    self.max_restarts, tuple(sorted(env.items())))
        self.keepable = cfg.generator != "vllm"
        idle = _IDLE.pop(self.key, []) if _KEEP[0] and self.keepable else []
        for a, _ in [x for actors in _IDLE.values() for x in actors] + idle[cfg.async_actors:]:
            _kill(ray, a)                    # not taken by this run: their resources freed first
        _IDLE.clear()
        idle = idle[:cfg.async_actors]
        self.run = uuid.uuid4().hex[:12]
        self.args = [(cfg_dict, i, cfg.async_actor_cpus, grader, self.run)
                     for i in range(cfg.async_actors)]
        self.actors, self.reused, self.info = [], [], []
        self.restarted = False
        try:
            starting = []
            for args in self.args:
                if idle:
                    a, pid = idle.pop()
                    starting.append((pid, a.reset.remote(*args)))
                else:
                    a, pid = remote.remote(*args), None
                    starting.append((None, a.ping.remote()))
                self.actors.append(a)
                self.reused.append(pid is not None)
            for i, (pid, ref) in enumerate(starting):
                try:
                    info = self.get(ref, what="actor start-up")
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                    if not self.reused[i]:   # a kept actor that died, or failed its reset:
                        raise                # a new one instead (which fails on its own if
                    info = None              # this run's config cannot be built)
                if self.reused[i] and (info is None or info["pid"] != pid):
                    # a kept actor that died while idle (restarted or not): a new one instead
                    _kill(ray, self.actors[i])
                    self.actors[i], self.reused[i] = remote.remote(*self.args[i]), False
                    info = self.get(self.actors[i].ping.remote(), what="actor start-up")
                self.info.append(info)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.actors)

    def get(self, refs, what: str):
        try:
            return self.ray.get(refs, timeout=self.timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise ActorError(f"async_generation: no answer from the rollout actors in "
                             f"async_timeout={self.timeout:.0f} s ({what}); stopped. Checkpoints "
                             "already written are intact (--resume continues from the last).") from None

    def revive(self, i: int) -> None:
        """Wait until Ray has restarted actor ``i`` (it answers a ping), at most async_timeout.
        An actor taken idle from an earlier run (:func:`keep_actors`) restarts with that run's
        arguments, so it is reset to this run's."""
        ray = self.ray
        self.restarted = True
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                info = self.get(self.actors[i].ping.remote(), what=f"restart of actor {i}")
                if info.get("run") == self.run:
                    return
                self.get(self.actors[i].reset.remote(*self.args[i]),
                         what=f"reset of restarted actor {i}")
                return
            except ray.exceptions.ActorUnavailableError:   # restarting: its calls fail for now
                if time.monotonic() > deadline:
                    raise ActorError(f"async_generation: rollout actor {i} did not come back "
                                     f"in async_timeout={self.timeout:.0f} s; stopped. The last "
                                     "checkpoint is intact: --resume continues.") from None
                time.sleep(0.5)
            except ray.exceptions.RayActorError as e:     # dead for good (restarts used up)
                raise ActorError(f"async_generation: rollout actor {i} is dead and Ray will not "
                                 f"restart it (async_max_restarts={self.max_restarts}): {e}. The "
                                 "last checkpoint is intact: --resume continues.") from None

    def push(self, version: int, weights_ref) -> None:
        for a in self.actors:
            a.set_weights.remote(version, weights_ref)

    def submit(self, i: int, request: dict):
        return self.actors[i].collect.remote(request)

    def close(self, idle: bool = False) -> None:
        """Let each actor close its sampler and grader (a vLLM engine, the grading sandbox), for
        at most 10 s, then kill it; or, with ``idle`` (nothing in flight) inside
        :func:`keep_actors` and after no restart, leave it for the next run of this process."""
        keep = idle and _KEEP[0] and self.keepable and not self.restarted
        try:
            self.ray.get([a.close.remote(keep_grader=keep) for a in self.actors], timeout=10)
            closed = True
        except Exception:
            closed = False
        if keep and closed:
            _IDLE.setdefault(self.key, []).extend(
                (a, info["pid"]) for a, info in zip(self.actors, self.info))
            self.actors = []
            return
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []


# ------------------------------------------------------------------------------- learner side
@dataclass
class _Part:
    actor: int
    request: dict                 # {"id", "seed", "examples", "prompt_ids"}: enough to send again
    ref: object = None            # Ray ObjectRef while in flight
    result: dict | None = None    # the actor's answer once received
    life: int = 0                 # which life of its actor it was sent to (restarts so far)
    refused: int = 0              # times the actor refused it (it held other weights)


@dataclass
class AsyncStats:
    """Counters of the async pipeline since the last :meth:`AsyncSource.pop_stats`."""

    wall_seconds: float = 0.0      # since the previous pop_stats (the learner's wall clock)
    wait_seconds: float = 0.0      # learner blocked on the actors' groups for a step
    checkpoint_wait_seconds: float = 0.0   # learner waiting for in-flight groups to checkpoint
    push_seconds: float = 0.0      # learner putting weights into the object store
    actor_busy_seconds: float = 0.0
    actor_gen_seconds: float = 0.0
    actor_tokens: int = 0
    resent: int = 0                # requests sent again after an actor died
    restarts: int = 0


class AsyncSource:
    """The ``fresh`` source with generation in actors, ``max_staleness`` versions ahead.

    ``take(k, v)`` pushes weights ``v`` if not yet pushed, tops the pipeline up to the steps
    ``v .. v + max_staleness`` (new requests are sampled with weights ``v``), and returns the
    groups of step ``v`` (waiting for them if the actors are behind). The groups are labelled
    ``fresh`` with the version that sampled them, so the trainer's rule (on-policy-only terms
    need ``policy_version == v``) decides per group.
    """

    name = "fresh"

    def __init__(self, pool: ActorPool, collector, policy, max_staleness: int, seed: int,
                 note=print, steps: int | None = None):
        """``steps``: the run's number of steps; no request is sent for a step past it (None:
        no bound), so a finished run leaves nothing in flight."""
        self.pool = pool
        self.collector = collector         # the learner's: draws prompts, receives the counters
        self.policy = policy
        self.k = int(max_staleness)
        self.rng = random.Random(seed + 2_147_483)
        self.queue: list[list[_Part]] = []   # oldest first; one entry per future step
        self.steps = steps
        self.taken = 0                       # steps whose groups take() has returned
        self.pushed = None                   # version the actors were last sent
        self.next_request = 0
        self.stats = AsyncStats()
        self.lives = [0] * len(pool)         # deaths seen per actor
        self.note = note
        self._last_take = None
        self._weights = None                 # object-store ref of the last push (version pushed)
        self._exact = None                   # the sampler check's decision, re-sent after a restart
        self._t_pop = time.perf_counter()

    # -- weights ----------------------------------------------------------------------
    def _trainable(self) -> dict:
        return {n: p.detach().float().cpu().numpy() for n, p in self.policy.named_parameters()
                if p.requires_grad}

    def push(self, version: int) -> None:
        t0 = time.perf_counter()
        self._weights = self.pool.ray.put(self._trainable())
        self.pool.push(version, self._weights)
        self.pushed = version
        self.stats.push_seconds += time.perf_counter() - t0

    # -- requests ---------------------------------------------------------------------
    def _submit_step(self, k: int) -> list[_Part]:
        examples, prompt_ids = self.collector.prompts(k)
        parts = []
        a = len(self.pool)
        for i in range(a):
            ex, ids = examples[i::a], prompt_ids[i::a]
            if not ex:
                continue
            req = {"id": self.next_request, "seed": self.rng.randrange(2**31),
                   "version": self.pushed, "run": getattr(self.pool, "run", ""),
                   "exact": self._exact,
                   "examples": [dataclasses.asdict(e) for e in ex], "prompt_ids": ids}
            self.next_request += 1
            parts.append(self._send(i, req))
        return parts

    def _send(self, actor: int, request: dict) -> _Part:
        return _Part(actor, request, self.pool.submit(actor, request), None, self.lives[actor])

    def _push_and_wait(self, actor: int) -> None:
        """Push the last pushed weights to one actor again and wait for it: pushes are otherwise
        fire-and-forget, so a push that fails in the actor (not a lost one) would only show as
        refused requests; its own error stops the run instead. A death is left to the request
        sent next, which meets it (and the restart logic)."""
        ref = self.pool.actors[actor].set_weights.remote(self.pushed, self._weights)
        try:
            self.pool.get(ref, what=f"weights of version {self.pushed} to actor {actor}")
        except self.pool.ray.exceptions.RayActorError:
            pass
        except ActorError:
            raise
        except Exception as e:
            raise ActorError(f"async_generation: rollout actor {actor} could not take the "
                             f"weights of version {self.pushed}: {e}") from None

    def _wait(self, part: _Part, during_checkpoint: bool = False) -> dict:
        ray = self.pool.ray
        while part.result is None:
            t0 = time.perf_counter()
            try:
                part.result = self.pool.get(part.ref, what=f"request {part.request['id']} "
                                                            f"on actor {part.actor}")
            except WrongWeights as e:   # a lost push: push the same object again, re-send
                part.refused += 1
                if part.refused > 3:
                    raise ActorError(f"async_generation: {e}, still after 3 pushes") from None
                self._push_and_wait(part.actor)
                part.request = {**part.request, "version": self.pushed}
                fresh = self._send(part.actor, part.request)
                part.ref, part.life = fresh.ref, fresh.life
                self.stats.resent += 1
            except (ray.exceptions.RayActorError, WrongRun) as e:   # died (seen, or unseen:
                a = part.actor                                         # a kept actor restarted)
                if part.life == self.lives[a]:   # a death not seen before (not a later request
                    self.lives[a] += 1           # of the same life failing with it)
                    self.stats.restarts += 1
                    if self.lives[a] > self.pool.max_restarts:
                        raise ActorError(
                            f"async_generation: rollout actor {a} died {self.lives[a]} times "
                            f"(async_max_restarts={self.pool.max_restarts}): {e}. Checkpoints "
                            "already written are intact (--resume continues from the "
                            "last).") from None
                    self.note(f"rollout actor {a} died; Ray restarts it, and its lost requests "
                              f"are sent again with the weights last pushed (version "
                              f"{self.pushed})")
                self.pool.revive(a)
                # the new life holds the initial weights: the last pushed ones go first (the
                # same object as that push, so the version label stays true mid-checkpoint)
                actor = self.pool.actors[a]
                actor.set_weights.remote(self.pushed, self._weights)
                if self._exact is not None:
                    actor.set_exact.remote(self._exact)
                part.request = {**part.request, "version": self.pushed}
                fresh = self._send(a, part.request)
                part.ref, part.life = fresh.ref, fresh.life
                self.stats.resent += 1
            finally:
                dt = time.perf_counter() - t0
                if during_checkpoint:
                    self.stats.checkpoint_wait_seconds += dt
                else:
                    self.stats.wait_seconds += dt
        return part.result

    def _step_left(self) -> bool:
        """Is there a step of the run not yet requested?"""
        return self.steps is None or self.taken + len(self.queue) < self.steps

    def take(self, k: int, version: int) -> list[Group]:
        if k <= 0:
            return []
        if self._last_take is not None and k != self._last_take:
            raise ValueError(f"async source: asked for {k} groups after {self._last_take}; the "
                             "pipeline holds whole steps (source=fresh only)")
        self._last_take = k
        if not self.queue and self.steps is not None and self.taken >= self.steps:
            raise ValueError(f"async source: asked for step {self.taken + 1} of a run of "
                             f"{self.steps} steps")
        if self.pushed != version and self._step_left():   # weights only before requests
            self.push(version)
        while len(self.queue) < self.k + 1 and self._step_left():
            self.queue.append(self._submit_step(k))
        parts = self.queue[0]
        groups: list[Group] = []
        for part in parts:
            res = self._wait(part)
            groups += [Group.from_dict(g) for g in res["groups"]]
            self._account(res)
        self.queue.pop(0)        # only once its groups arrived: a failed step is not taken
        self.taken += 1
        return groups

    def _account(self, res: dict) -> None:
        """Actor counters -> the learner collector's (so the trainer's per-step metrics and
        run counters include them) and this source's pipeline statistics."""
        st = self.collector.stats
        for f in dataclasses.fields(CollectStats):
            if f.name != "extra":
                setattr(st, f.name, getattr(st, f.name) + res["stats"][f.name])
        self.stats.actor_busy_seconds += res["busy_seconds"]
        self.stats.actor_gen_seconds += res["stats"]["gen_seconds"]
        self.stats.actor_tokens += res["stats"]["completion_tokens"]

    def pop_stats(self) -> AsyncStats:
        now = time.perf_counter()
        s, self.stats = self.stats, AsyncStats()
        s.wall_seconds, self._t_pop = now - self._t_pop, now
        return s

    def check_sampler(self, prompts, rule: str, tol: float, previous, version: int) -> dict:
        """Every actor checks its own sampler on the learner's current weights
        (pushed first); their groups count as draws from pi only if every actor passes, and every
        actor is told the run's decision. Returns actor 0's report with that decision."""
        self.push(version)
        reports = self.pool.get([a.check_sampler.remote(prompts, rule, tol, previous)
                                 for a in self.pool.actors], what="sampler check")
        exact = all(r.get("exact", True) for r in reports)
        self._exact = exact
        self.pool.get([a.set_exact.remote(exact) for a in self.pool.actors], what="set_exact")
        report = dict(reports[0], exact=exact)
        if isinstance(report.get("record"), dict):
            report["record"] = dict(report["record"], exact=exact)
        return report

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Waits for the requests in flight and stores their groups: a resumed run then learns
        on exactly the groups the uninterrupted run would have."""
        queue = []
        for parts in self.queue:
            step = []
            for part in parts:
                res = self._wait(part, during_checkpoint=True)
                step.append({"actor": part.actor, "request": part.request, "result": res})
            queue.append(step)
        return {"kind": "async", "rng": _rng_state(self.rng), "queue": queue,
                "next_request": self.next_request, "last_take": self._last_take,
                "taken": self.taken if self.steps is not None else None, "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        if d.get("kind") != "async":
            raise ValueError("--resume: the checkpoint was written without async_generation; "
                             "resume with async_generation=false (the setting the run began with)")
        _set_rng_state(self.rng, d["rng"])
        self.queue = [[_Part(p["actor"] % len(self.pool), p["request"], None, p["result"])
                       for p in step] for step in d["queue"]]   # all answered before the save
        self.next_request = int(d["next_request"])
        self._last_take = d.get("last_take")
        self.pushed = None
        if d.get("taken") is not None:
            self.taken = int(d["taken"])
        else:   # a checkpoint from before the step bound: its queue may reach past the end
            self.steps = None
        held = self.taken + len(self.queue)      # steps already requested
        last = min(self.taken + self.k, self.steps or 0)
        if d.get("steps") is not None and self.steps is not None and last > held:
            self.note(f"async_generation: the checkpoint's run had steps={d['steps']} and sent "
                      f"no request past it; steps {held + 1}-{last} are sampled with newer "
                      f"weights than in a run of {self.steps} steps from the start")

    def close(self) -> None:
        """Close the actors; a run that took all its steps has nothing in flight, and leaves
        them idle for the next run inside :func:`keep_actors`."""
        done = self.steps is not None and self.taken >= self.steps and not self.queue
        self.pool.close(idle=done)


class FollowerSource:
    """Data-parallel ranks > 0: rank 0 owns the actors and hands every rank its slice."""

    name = "fresh"

    def __init__(self, dist):
        self.dist = dist

    def take(self, k: int, version: int) -> list[Group]:
        return scatter_groups(self.dist, None, k)

    def state_dict(self) -> dict:
        return {"kind": "async"}

    def load_state_dict(self, d: dict) -> None:
        if d.get("kind") != "async":
            raise ValueError("--resume: the checkpoint was written without async_generation; "
                             "resume with async_generation=false (the setting the run began with)")

    def pop_stats(self) -> AsyncStats:
        return AsyncStats()

    def check_sampler(self, prompts, rule: str, tol: float, previous, version: int) -> dict:
        return {"lines": [], "record": None}

    def close(self) -> None:
        pass


class LeaderSource:
    """Data-parallel rank 0: takes every rank's groups from the actors, keeps its own slice."""

    name = "fresh"

    def __init__(self, inner: AsyncSource, dist):
        self.inner, self.dist = inner, dist

    def take(self, k: int, version: int) -> list[Group]:
        groups = self.inner.take(k * self.dist.world, version)
        return scatter_groups(self.dist, groups, k)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.inner.load_state_dict(d)

    def pop_stats(self) -> AsyncStats:
        return self.inner.pop_stats()

    def check_sampler(self, prompts, rule: str, tol: float, previous, version: int) -> dict:
        return self.inner.check_sampler(prompts, rule, tol, previous, version)

    def close(self) -> None:
        self.inner.close()


def scatter_groups(dist, groups: list[Group] | None, k: int) -> list[Group]:
    """Rank 0's ``k * world`` groups -> each rank's contiguous slice of ``k`` (fewer if rank 0
    got fewer, e.g. prompts skipped as too long)."""
    payload = [g.to_dict() for g in groups] if groups is not None else None
    everything = dist.broadcast(payload)
    mine = everything[dist.rank * k:(dist.rank + 1) * k]
    return [Group.from_dict(g) for g in mine]

