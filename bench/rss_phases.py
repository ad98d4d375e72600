"""Peak resident memory by phase, in this process: the sampler bench/memory_phases.py and
bench/learner_memory.py share.

:func:`start` runs a daemon thread that reads VmRSS from /proc/self/status every ``period``
seconds and attributes it to the phase running, ``phase[-1]``. :func:`label` wraps a callable
so that its calls are a phase. :func:`report` prints each phase's peak, highest first, the sum of
the rises of VmRSS seen while each phase ran, and each new high of VmRSS (by more than 16 MiB)
with its phase, ``tag`` and glibc malloc's bytes in use (:func:`malloc_in_use_kb`). Linux only.
"""
from __future__ import annotations

import functools
import threading
import time

phase = ["import"]
peak: dict[str, int] = {}          # phase -> peak VmRSS in kB
growth: dict[str, int] = {}        # phase -> sum of the rises of VmRSS seen while it ran, kB
timeline: list[tuple[float, str, int, int | None]] = []   # (seconds, phase, VmRSS kB,
#   malloc's bytes in use kB) at each new high of VmRSS
tag = [""]                         # appended to the phase in the timeline (e.g. the step number)


def mallinfo2():
    """glibc's ``mallinfo2()`` (all its arenas), or None where the C library has none (musl,
    glibc < 2.33). Under a preloaded allocator (jemalloc) it describes glibc's own heaps, unused."""
    global _mallinfo2
    if _mallinfo2 is None:
        import ctypes

        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]
        try:
            f = ctypes.CDLL(None).mallinfo2
        except AttributeError:
            _mallinfo2 = False
            return None
        f.restype = Info
        _mallinfo2 = f
    return None if _mallinfo2 is False else _mallinfo2()


def malloc_in_use_kb() -> int | None:
    """Bytes glibc's malloc has handed out and not had back (uordblks + hblkhd), in kB; None
    where glibc's malloc is not the one allocating (its heaps empty: jemalloc preloaded)."""
    i = mallinfo2()
    return None if i is None or i.arena == 0 else (i.uordblks + i.hblkhd) // 1024


def malloc_summary() -> str:
    """glibc malloc's heaps: their size, the bytes in use, and the free bytes and free chunks
    inside them (what the heap holds and nobody uses)."""
    i = mallinfo2()
    if i is None or i.arena == 0:
        return "malloc: no mallinfo2 figures (glibc's malloc is not the one allocating)"
    return (f"malloc heaps {i.arena / 1e9:.2f} GB: in use {i.uordblks / 1e9:.2f} GB, free "
            f"{i.fordblks / 1e9:.2f} GB in {i.ordblks} chunks; mmapped {i.hblkhd / 1e9:.2f} GB "
            f"in {i.hblks} chunks")


_mallinfo2 = None


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def start(period: float) -> None:
    t0, last, high = time.perf_counter(), rss_kb(), 0

    def sample_forever() -> None:
        nonlocal last, high
        while True:
            p, r = phase[-1], rss_kb()
            peak[p] = max(peak.get(p, 0), r)
            growth[p] = growth.get(p, 0) + max(0, r - last)
            last = r
            if r > high + 16384:     # a new high by more than 16 MiB
                high = r
                timeline.append((time.perf_counter() - t0, p + tag[0], r, malloc_in_use_kb()))
            time.sleep(period)
    threading.Thread(target=sample_forever, daemon=True).start()


def label(obj, name: str, what: str, after: str | None = None) -> None:
    """Replace ``obj.name`` by a wrapper under which the phase is ``what``; on return the phase
    becomes ``after``, or the one that was running (``None``: nested phases)."""
    f = getattr(obj, name)

    @functools.wraps(f)
    def g(*a, **k):
        prev = phase[-1]
        phase.append(what)
        try:
            return f(*a, **k)
        finally:
            phase.append(prev if after is None else after)
    setattr(obj, name, g)


def report(title: str, unit: str = "GiB", width: int = 12) -> None:
    """Each phase's peak, highest first, in GiB (2^30 bytes) or GB (10^9 bytes)."""
    div = {"GiB": 2**20, "GB": 1e9 / 1024}[unit]
    print(title)
    for k, v in sorted(peak.items(), key=lambda x: -x[1]):
        print(f"  {k:{width}s} {v / div:.2f} {unit}")
    print(f"sum of the rises of VmRSS while each phase ran ({unit}):")
    for k, v in sorted(growth.items(), key=lambda x: -x[1]):
        print(f"  {k:{width}s} {v / div:.2f}")
    print(f"each new high of VmRSS (by > 16 MiB): seconds, phase, VmRSS {unit}, glibc malloc's "
          f"bytes in use {unit} (mallinfo2; blank without it)")
    for t, p, r, m in timeline:
        print(f"  {t:7.1f} {p:{width}s} {r / div:.2f}" + ("" if m is None else f" {m / div:.2f}"))
