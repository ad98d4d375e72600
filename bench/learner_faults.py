"""Page faults and kernel time of the learner step: what the C allocator costs.

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/learner_faults.py bf16 [--steps 8] [--parts]
    MALLOC_CONF=dirty_decay_ms:-1 LD_PRELOAD=<jemalloc> .venv/bin/python bench/learner_faults.py bf16
    .venv/bin/python bench/learner_faults.py bf16 --retain --parts      # AGRO_ALLOCATOR=retain's malloc

(``agro train`` runs on jemalloc, agro.allocator; run in-process, preload it as the command line
does: ``.venv/bin/python -c "from agro.allocator import find_jemalloc; print(find_jemalloc())"``.
``MALLOC_CONF`` passes jemalloc options.)

Builds the default job's trainer in the given precision, samples one step's groups (seed 1),
attaches their reference log-probs, runs two warm-up learner steps and then ``--steps`` more on
the same groups, printing for each its wall seconds, minor page faults, and system and user CPU
seconds (``getrusage``), then the process's peak resident memory. ``--parts`` also splits each
step's faults, system CPU and wall seconds over its parts (the loss's forward, ``backward``, the
bf16 gradients into fp32, clipping, the optimizer step, the cast back to bf16; each wrapped where
the trainer calls it). ``--retain`` first tells glibc's malloc to keep freed memory
(agro.allocator.retain_freed_memory, what ``AGRO_ALLOCATOR=retain`` does; run it without
LD_PRELOAD). ``--huge-arena-decay MS`` sets ``dirty_decay_ms`` of jemalloc's arena for blocks of
``oversize_threshold`` (8 MiB) and more -- the one jemalloc purges at once (its decay 0) -- to MS
through ``mallctl`` after the sampling call and again after the warm-up steps. Run it alone.
"""
from __future__ import annotations

import argparse
import resource
import time

from abrounds import bench_trainer, code_version, one_step_groups  # bench/abrounds.py (bench/ is on sys.path)

from agro.allocator import in_use, retain_freed_memory


def split_into_parts(tr) -> dict[str, list]:
    """Wrap the learner step's parts so each adds its [faults, system s, wall s] to the dict
    returned (clear it before a step)."""
    import torch

    rec: dict[str, list] = {}

    def wrap(obj, name, label):
        f = getattr(obj, name)

        def timed_part(*a, **k):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            out = f(*a, **k)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            x = rec.setdefault(label, [0, 0.0, 0.0])
            x[0] += r1.ru_minflt - r0.ru_minflt
            x[1] += r1.ru_stime - r0.ru_stime
            x[2] += time.perf_counter() - t0
            return out
        setattr(obj, name, timed_part)
    wrap(tr, "micro_batch_loss", "forward")
    wrap(torch.Tensor, "backward", "backward")
    wrap(torch.nn.utils, "clip_grad_norm_", "clip")
    wrap(tr.optimizer, "step", "optimizer")
    if tr.mixed:
        wrap(tr.mixed, "accumulate_grads", "grads->fp32")
        wrap(tr.mixed, "refresh", "cast->bf16")
    return rec


def set_huge_arena_decay(ms: int) -> int:
    """Set ``dirty_decay_ms`` to ``ms`` on every jemalloc arena whose own is 0 (the arena for
    blocks of ``oversize_threshold`` and more; jemalloc's defaults give every other arena
    10,000), print what was set and return how many arenas that was. (jemalloc purges a decaying
    arena's freed pages gradually over ``ms``; that arena's ``muzzy_decay_ms`` stays 0.)"""
    import ctypes
    import os

    from agro.allocator import loaded_jemalloc

    lib = loaded_jemalloc()
    if lib is None:
        raise SystemExit("--huge-arena-decay: jemalloc is not loaded (LD_PRELOAD it)")
    m = ctypes.CDLL(lib, mode=os.RTLD_NOLOAD).mallctl
    m.restype = ctypes.c_int
    m.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                  ctypes.c_void_p, ctypes.c_size_t]

    def get(name, typ=ctypes.c_ssize_t):
        v, n = typ(0), ctypes.c_size_t(ctypes.sizeof(typ))
        return v.value if m(name.encode(), ctypes.byref(v), ctypes.byref(n), None, 0) == 0 else None

    n = get("arenas.narenas", ctypes.c_uint)
    if n is None:
        raise SystemExit("--huge-arena-decay: jemalloc's arenas.narenas cannot be read")
    found = 0
    for i in range(n):
        if get(f"arena.{i}.dirty_decay_ms") == 0:
            v = ctypes.c_ssize_t(ms)
            rc = m(f"arena.{i}.dirty_decay_ms".encode(), None, None, ctypes.byref(v),
                   ctypes.sizeof(v))
            if rc != 0:
                raise SystemExit(f"--huge-arena-decay: mallctl arena.{i}.dirty_decay_ms returned {rc}")
            print(f"jemalloc arena {i}: dirty_decay_ms 0 -> {ms} (mallctl returned {rc})", flush=True)
            found += 1
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("precision", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--parts", action="store_true", help="split each step's faults over its parts")
    ap.add_argument("--retain", action="store_true", help="glibc's malloc keeps freed memory")
    ap.add_argument("--huge-arena-decay", type=int, default=None, metavar="MS",
                    help="jemalloc's arena for large blocks keeps freed pages MS ms (its default 0)")
    a = ap.parse_args()
    if a.retain:
        retain_freed_memory()
    tr = bench_trainer("learner-faults", f"precision={a.precision}")
    groups = one_step_groups(tr, seed=1)
    tr.collector.attach_ref_logprobs(groups)
    found = set_huge_arena_decay(a.huge_arena_decay) if a.huge_arena_decay is not None else 0
    for _ in range(2):
        tr.learn(groups)
    if a.huge_arena_decay is not None:
        found += set_huge_arena_decay(a.huge_arena_decay)
        if not found:       # e.g. under oversize_threshold:0 there is no such arena
            raise SystemExit("--huge-arena-decay: no jemalloc arena with dirty_decay_ms 0")
    parts = split_into_parts(tr) if a.parts else None
    print(f"allocator: {in_use()}; agro {code_version()}")
    print("step  wall s  minor faults  sys s  user s")
    for i in range(a.steps):
        if parts is not None:
            parts.clear()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        tr.learn(groups)
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        print(f"{i + 1:4d}  {dt:6.2f}  {r1.ru_minflt - r0.ru_minflt:12d}  "
              f"{r1.ru_stime - r0.ru_stime:5.2f}  {r1.ru_utime - r0.ru_utime:6.2f}", flush=True)
        for name, (faults, sys_s, wall) in (parts or {}).items():
            print(f"      {name:12s} {wall:6.2f}  {faults:12d}  {sys_s:5.2f}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
    tr.close_generator()


if __name__ == "__main__":
    main()
