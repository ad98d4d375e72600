"""The C memory allocator the `agro` command runs on: jemalloc where one is found, else the system's.

Why: PyTorch on a CPU allocates every activation from the C heap. With glibc's malloc the
learner's forward and backward leave free fragments that its later tensors (of other sizes) do
not fit, so the process holds more than it uses: on the default job's first 14 steps (one
micro-batch of 8 groups, ~1,260 tokens, bf16, 2 cores, AMD EPYC Zen 4) the learner peaked at
4.56-4.62 GB resident with glibc, 4.15 GB with jemalloc, at the same speed; glibc with
``MALLOC_TRIM_THRESHOLD_=0`` or a 128 KB ``MALLOC_MMAP_THRESHOLD_`` reached 4.06-4.07 GB but ran
1.4-1.6x slower (every freed page returned and faulted in again). Intel's CPU guidance for
PyTorch and ``python -m torch.backends.xeon.run_cpu --enable-jemalloc`` do the same thing.

How: the allocator must be in place before the process starts, so the command line (the
``agro`` console script and ``python -m agro.cli``; never a library call) re-executes itself once
with ``LD_PRELOAD`` naming a jemalloc shared library. ``AGRO_ALLOCATOR`` chooses: ``auto``
(default: jemalloc if found, on Linux), ``jemalloc`` (an error if none is found), ``system``
(never re-execute), ``retain`` or ``keep`` (below). Where it looks, in order: ``AGRO_JEMALLOC`` (a path),
the copy bundled in the ``ray`` package (``agro[async]``, which ``make setup`` installs), the system's ``libjemalloc.so.2``
(Debian/Ubuntu ``libjemalloc2``). A user's own preloaded allocator is kept (``keep`` refuses
it). Only the command's own process runs on it: the re-executed process restores the user's
``LD_PRELOAD`` (and under ``keep`` their ``MALLOC_CONF``) for its children. The run's log names the allocator in use (:func:`in_use`). The command also caps
oneDNN's shape caches (:func:`cap_onednn_caches`).

``AGRO_ALLOCATOR=retain`` trades memory for speed: the system's (glibc) malloc, told through
``mallopt`` to keep what is freed (:func:`retain_freed_memory`; no re-exec, and only the command's
own process: a library caller can call the function itself). Under jemalloc every learner step's
activations, gradients and logits come back from the kernel as fresh pages: ~200,000 minor page
faults a bf16 step and ~450,000 an fp32 one on the default job (Zen 5), 0.3-1.7 s of kernel CPU.
Telling jemalloc never to hand memory back (``dirty_decay_ms:-1``, with or without
``muzzy_decay_ms:-1``) did not stop it: it still faulted and grew the process to 6.2-6.9 GiB;
``keep`` (below) is the set of its options that does. Retained, the learner
steps take next to no faults after the first (0-19 a step); the fp32 default job ran 0.90x as long
and peaked 0.54 GiB higher (docs/RESULTS.md, "the allocator"). Not the default, because the
default job must stay under 4 GiB; a machine with memory to spare takes it.

``AGRO_ALLOCATOR=keep`` trades the same memory on jemalloc: the command re-executes on it with
:data:`KEEP_CONF` in ``MALLOC_CONF`` (before any ``MALLOC_CONF`` of the user's, which so wins),
so freed pages are handed to the kernel lazily (``MADV_FREE``: still mapped and, as measured,
reused without a fault; by MADV_FREE's definition the kernel may reclaim them under memory
pressure, which was not measured here) and never purged by jemalloc itself. Its log line says so (:func:`in_use` reads the options back from jemalloc). Measured
against ``retain`` and the default in docs/RESULTS.md, "(fourth)".
"""
from __future__ import annotations

import ctypes.util
import importlib.util
import os
import sys
from pathlib import Path

ENV = "AGRO_ALLOCATOR"
PATH_ENV = "AGRO_JEMALLOC"
_DONE = "AGRO_ALLOCATOR_REEXEC"       # set in the re-executed process: never twice
_ORIG_CONF = "AGRO_ALLOCATOR_MALLOC_CONF"   # keep: the user's MALLOC_CONF, restored for children
KEEP_CONF = "oversize_threshold:0,dirty_decay_ms:100,muzzy_decay_ms:-1"
"""jemalloc's options under ``AGRO_ALLOCATOR=keep``. ``muzzy_decay_ms:-1``: pages handed back
lazily (``MADV_FREE``) are never purged for good, so a later block reuses them without a page
fault. ``dirty_decay_ms:100``: freed pages become such lazily-freed pages within ~0.1 s; on the
fp32 learner bench (``bench/learner_faults.py``, Zen 5), -1 (never) still faulted 108,000-138,000
pages a step and grew to 5.91 GiB, and 0 faulted ~3 million a step. ``oversize_threshold:0``: no
separate arena for blocks of 8 MiB and more, which otherwise hands its pages back at once
(docs/RESULTS.md, "(fourth)")."""


def find_jemalloc() -> str | None:
    """A loadable jemalloc shared library's path (or soname), or None."""
    p = os.environ.get(PATH_ENV, "")
    if p:
        return p if Path(p).is_file() else None
    spec = importlib.util.find_spec("ray")          # no import: ray is slow to import
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "core" / "libjemalloc.so"
        if bundled.is_file():
            return str(bundled)
    return ctypes.util.find_library("jemalloc")


_OTHER_MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")
_ORIG = "AGRO_ALLOCATOR_PRELOAD"      # the LD_PRELOAD the user had, restored for child processes


CHOICES = ("auto", "jemalloc", "system", "retain", "keep")
_ON_JEMALLOC = ("jemalloc", "keep")      # the choices that need jemalloc


def preloaded_allocator(preload: str) -> str | None:
    """The entry of an ``LD_PRELOAD`` value (space- or colon-separated) whose file name names an
    allocator (jemalloc, tcmalloc, mimalloc), or None."""
    return next((e for e in preload.replace(":", " ").split()
                 if any(m in Path(e).name for m in _OTHER_MALLOCS)), None)


def choice(environ=os.environ) -> str:
    """``AGRO_ALLOCATOR``'s value (auto if unset or empty); ValueError on anything else."""
    c = environ.get(ENV, "auto") or "auto"
    if c not in CHOICES:
        raise ValueError(f"{ENV}={c!r}: valid values are {', '.join(CHOICES)}")
    return c


def reexec_env(environ: dict, platform: str = sys.platform, find=find_jemalloc) -> dict | None:
    """The environment to re-execute the command with, or None to run as is. Raises
    RuntimeError if ``AGRO_ALLOCATOR=jemalloc`` and none is found, ValueError on a bad value.
    A user's own preloaded allocator (jemalloc, tcmalloc, mimalloc) is left alone.
    ``retain`` runs as is (on the system's malloc, :func:`retain_freed_memory`); ``keep`` is
    jemalloc with :data:`KEEP_CONF` put first in ``MALLOC_CONF`` (RuntimeError where it cannot:
    another allocator preloaded, no jemalloc, not Linux)."""
    chosen = choice(environ)
    preload = environ.get("LD_PRELOAD", "")
    if chosen in ("system", "retain") or environ.get(_DONE):
        return None
    other = preloaded_allocator(preload)
    if other:
        if chosen == "keep":
            raise RuntimeError(f"{ENV}=keep starts the command on jemalloc with its own options, "
                               f"but LD_PRELOAD already names an allocator ({other}): unset it "
                               f"(or, preloading jemalloc yourself, set MALLOC_CONF={KEEP_CONF} "
                               f"and leave {ENV} unset)")
        return None
    if not platform.startswith("linux"):
        if chosen in _ON_JEMALLOC:
            raise RuntimeError(f"{ENV}={chosen}: only supported on Linux (LD_PRELOAD)")
        return None
    lib = find()
    if lib is not None and any(c in lib for c in " \t:"):   # LD_PRELOAD cannot name it
        lib = None
    if lib is None:
        if chosen in _ON_JEMALLOC:
            raise RuntimeError(f"{ENV}={chosen} but no usable jemalloc library was found: install "
                               f"agro[async] (ray bundles one) or libjemalloc2, or set {PATH_ENV}"
                               + (f" ({ENV}=retain keeps freed memory on the system's malloc)"
                                  if chosen == "keep" else ""))
        return None
    env = dict(environ, LD_PRELOAD=f"{lib} {preload}".strip(), **{_DONE: "1", _ORIG: preload})
    env.pop(_ORIG_CONF, None)
    if chosen == "keep":
        user = environ.get("MALLOC_CONF")
        env["MALLOC_CONF"] = f"{KEEP_CONF},{user}" if user else KEEP_CONF
        if user is not None:            # restored as it was; absent: removed for the children
            env[_ORIG_CONF] = user
    return env


def started_as_command(orig_argv: list[str] | None = None) -> bool:
    """True if this process is the ``agro`` console script or ``python -m agro.cli`` (what can
    be re-executed as is; ``python -c``, ``python - < file`` and other scripts cannot)."""
    argv = list(sys.orig_argv if orig_argv is None else orig_argv)
    if "-m" in argv:
        i = argv.index("-m")
        return i + 1 < len(argv) and argv[i + 1] == "agro.cli"
    return len(argv) > 1 and Path(argv[1]).name == "agro"


def _names_keep_options(conf: str | None) -> bool:
    """True if a ``MALLOC_CONF`` value sets one of :data:`KEEP_CONF`'s options itself (then
    jemalloc runs on the user's choice, and ``keep``'s check does not apply)."""
    keys = {kv.split(":", 1)[0].strip() for kv in (conf or "").split(",")}
    return bool(keys & set(KEEP_OPTIONS))


def maybe_reexec() -> None:
    """Re-execute this command on jemalloc (:func:`reexec_env`); returns only if it does not.
    ``AGRO_ALLOCATOR=retain`` instead tunes this process's malloc in place (no re-exec).
    In the re-executed process, the user's own ``LD_PRELOAD`` (and under ``keep`` their own
    ``MALLOC_CONF``, or none) is put back for child processes (the grader's sandbox, Ray's
    workers, compilers): only this process runs on jemalloc. An explicit ``jemalloc`` or
    ``keep`` that cannot be had (no re-exec, jemalloc not loaded, ``keep``'s options not taken
    (:func:`keeps_freed_pages`) where the user's ``MALLOC_CONF`` sets none of them) is a
    RuntimeError, not a silent fallback; an invalid ``AGRO_ALLOCATOR`` is a ValueError
    (:func:`choice`), also where the process is not the command."""
    if os.environ.get(_DONE):
        os.environ["LD_PRELOAD"] = os.environ.pop(_ORIG, "")
        if not os.environ["LD_PRELOAD"]:
            del os.environ["LD_PRELOAD"]
        chosen = os.environ.get(ENV)
        user_conf = os.environ.pop(_ORIG_CONF, None)
        if chosen == "keep":    # jemalloc read MALLOC_CONF as it started: children get the user's
            if user_conf is None:
                os.environ.pop("MALLOC_CONF", None)
            else:
                os.environ["MALLOC_CONF"] = user_conf
        lib = loaded_jemalloc()
        if chosen in _ON_JEMALLOC and lib is None:
            raise RuntimeError(f"{ENV}={chosen}: LD_PRELOAD was set but jemalloc is not loaded")
        if chosen == "keep" and not _names_keep_options(user_conf) \
                and not keeps_freed_pages(jemalloc_options(lib)):
            raise RuntimeError(f"{ENV}=keep: jemalloc did not take {KEEP_CONF} (too old a "
                               f"jemalloc? oversize_threshold needs 5.2): {in_use()}")
        os.environ.pop(_DONE)
        return
    if not started_as_command():
        if choice() in (*_ON_JEMALLOC, "retain"):       # (an invalid value: ValueError)
            raise RuntimeError(f"{ENV}={os.environ[ENV]} needs the `agro` command or "
                               "`python -m agro.cli`")
        return
    if choice() == "retain":
        retain_freed_memory()
        return
    env = reexec_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, list(sys.orig_argv), env)
        except OSError as e:   # cannot re-execute: auto runs on the system's allocator
            if (chosen := choice()) in _ON_JEMALLOC:
                raise RuntimeError(f"{ENV}={chosen}: could not re-execute the command on "
                                   f"jemalloc ({e})") from e
            return


ONEDNN_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128", "LRU_CACHE_CAPACITY": "128"}
"""oneDNN's primitive cache and ideep's LRU cache (PyTorch's oneDNN wrapper): one entry per
distinct GEMM shape, 1024 each by default. Over 96 row counts x 15 SmolLM2-135M fp32 products
the two grew the process by 466 MiB, by 52 MiB capped at 128 each (``bench/onednn_cache_probe.py``,
Zen 5; PyTorch's own GEMM: 4 MiB), and a run meets a new row count at nearly every pass: with fp32
linear layers on oneDNN the default job peaked at 4.04 GiB uncapped and 3.95 GiB capped (one run
each, 5:06 and 5:14; docs/RESULTS.md). Those figures are from before the LM head's oneDNN backward
ran in slices (agro.onednn_linear.BACKWARD_SLICE_COLUMNS: 48 slices of one shape per product)."""


def cap_onednn_caches(environ=os.environ, machine: str | None = None) -> None:
    """Cap :data:`ONEDNN_CACHES` in ``environ`` unless the user set them (oneDNN's cache also
    under its older name ``DNNL_PRIMITIVE_CACHE_CAPACITY``). ideep's cache is only capped on
    x86-64: on aarch64 its default is already 1 entry. oneDNN reads its capacity when it makes
    its first primitive and ideep per thread on first use, so the command line sets them at its
    start (the re-executed process inherits them); a library user who wants the cap sets them
    before the first oneDNN op."""
    import platform

    machine = (machine or platform.machine()).lower()
    if "DNNL_PRIMITIVE_CACHE_CAPACITY" not in environ:
        environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_CACHES["ONEDNN_PRIMITIVE_CACHE_CAPACITY"])
    if machine in ("x86_64", "amd64"):
        environ.setdefault("LRU_CACHE_CAPACITY", ONEDNN_CACHES["LRU_CACHE_CAPACITY"])


def onednn_cache_env(environ=os.environ) -> dict[str, str]:
    """The oneDNN/ideep cache capacities set in ``environ`` (by :func:`cap_onednn_caches` or by
    the user), for processes that do not inherit this one's environment: Ray actors on a
    cluster (agro.async_actors passes them in the actors' ``runtime_env``). They are the
    driver's values: an aarch64 actor under an x86-64 driver gets ideep's cap of 128 where its own
    default is 1 entry."""
    names = (*ONEDNN_CACHES, "DNNL_PRIMITIVE_CACHE_CAPACITY")
    return {k: environ[k] for k in names if k in environ}


def mapped_allocator(maps: str, names=("jemalloc",)) -> str | None:
    """The path of a shared library among ``/proc/<pid>/maps``'s mappings whose file name holds
    one of ``names`` (``libjemalloc.so.2``, ``libtcmalloc.so.4``), or None. The file's own name
    must say so: a model file under a directory called jemalloc is not an allocator."""
    for line in maps.splitlines():
        f = line.split(maxsplit=5)
        name = Path(f[5].strip()).name if len(f) == 6 else ""
        if ".so" in name and any(n in name for n in names):
            return f[5].strip()
    return None


RETAIN_THRESHOLD = 2 ** 31 - 1
"""Bytes: glibc's ``M_TRIM_THRESHOLD`` and ``M_MMAP_THRESHOLD`` under ``retain`` (mallopt takes
an int). On the main thread's heap (where the learner allocates) no block under 2 GiB gets a
mapping of its own (unmapped, so faulted in afresh, when freed), and the heap's top is handed back
only past 2 GiB of free space. Other threads' heaps are 64 MiB each: glibc still unmaps one that
becomes wholly free, and maps a block too large for it on its own."""
OLD_GLIBC_MMAP_MAX = 32 * 2 ** 20
"""glibc before 2.35 refuses an ``M_MMAP_THRESHOLD`` above this (half its 64 MiB thread heap on
64-bit): there, blocks over 32 MiB still get their own mappings."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3       # glibc's <malloc.h>
_retaining: str | None = None       # what retain_freed_memory set, for in_use()


def retain_freed_memory(libc=None, maps: str | None = None) -> str:
    """Tell this process's glibc malloc to keep freed memory for reuse (:data:`RETAIN_THRESHOLD`):
    memory freed stays mapped, so the next step's tensors land on pages already faulted in. The
    process then holds its high-water mark and the holes between live blocks (glibc does not
    move blocks). Process-wide and from now on; the environment, and so child processes, are
    untouched. Returns what was set (also in :func:`in_use`). Where glibc refuses a 2 GiB mmap
    threshold (before 2.35), it takes :data:`OLD_GLIBC_MMAP_MAX` and says so. RuntimeError where
    it cannot apply: another allocator loaded (mallopt would tune a malloc nobody calls), or no
    glibc ``mallopt`` (musl, macOS, Windows)."""
    global _retaining
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            maps = ""
    other = mapped_allocator(maps, _OTHER_MALLOCS) \
        or preloaded_allocator(os.environ.get("LD_PRELOAD", ""))
    if other:
        raise RuntimeError(f"{ENV}=retain tunes the system's malloc, but another allocator is "
                           f"loaded ({other}); unset LD_PRELOAD or choose {ENV}=system")
    try:
        libc = ctypes.CDLL(None) if libc is None else libc
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):      # TypeError: CDLL(None) on Windows
        raise RuntimeError(f"{ENV}=retain needs glibc's malloc (mallopt); this C library has "
                           f"none: choose {ENV}=auto or system") from None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_max = next((v for v in (RETAIN_THRESHOLD, OLD_GLIBC_MMAP_MAX)
                     if mallopt(_M_MMAP_THRESHOLD, v) == 1), None)
    if mmap_max is None:
        raise RuntimeError(f"{ENV}=retain: mallopt(M_MMAP_THRESHOLD) was refused")
    if mallopt(_M_TRIM_THRESHOLD, RETAIN_THRESHOLD) != 1:
        raise RuntimeError(f"{ENV}=retain: mallopt(M_TRIM_THRESHOLD, {RETAIN_THRESHOLD}) was refused")
    _retaining = "retaining freed memory (AGRO_ALLOCATOR=retain)" if mmap_max == RETAIN_THRESHOLD \
        else (f"retaining freed memory (AGRO_ALLOCATOR=retain; blocks over "
              f"{OLD_GLIBC_MMAP_MAX // 2 ** 20} MiB still mapped apart: glibc before 2.35)")
    return _retaining


def jemalloc_option(lib: str, name: str) -> int | None:
    """An 8-byte integer option (``size_t`` or ``ssize_t``, e.g. ``opt.muzzy_decay_ms``) of the
    jemalloc library ``lib`` loaded in this process, read through its ``mallctl``; None where it
    cannot be read (not loaded: it is never loaded here; no such option)."""
    try:
        mallctl = ctypes.CDLL(lib, mode=os.RTLD_NOLOAD).mallctl   # only the one loaded
    except (OSError, AttributeError):
        return None
    mallctl.restype = ctypes.c_int
    mallctl.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                        ctypes.c_void_p, ctypes.c_size_t]
    v, n = ctypes.c_ssize_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    if mallctl(name.encode(), ctypes.byref(v), ctypes.byref(n), None, 0) != 0:
        return None
    return v.value


KEEP_OPTIONS = ("dirty_decay_ms", "muzzy_decay_ms", "oversize_threshold")
"""The jemalloc options :data:`KEEP_CONF` sets, as :func:`jemalloc_options` reads them back."""


def loaded_jemalloc() -> str | None:
    """The path of the jemalloc library mapped into this process, or None."""
    try:
        return mapped_allocator(Path("/proc/self/maps").read_text())
    except OSError:
        return None


def jemalloc_options(lib: str) -> dict[str, int | None]:
    """:data:`KEEP_OPTIONS` as the loaded jemalloc ``lib`` has them (None: not readable)."""
    return {o: jemalloc_option(lib, f"opt.{o}") for o in KEEP_OPTIONS}


def keeps_freed_pages(opts: dict[str, int | None]) -> bool:
    """True if jemalloc options (:func:`jemalloc_options`) are :data:`KEEP_CONF`'s kind: freed
    pages kept resident and reused (muzzy pages never purged, no eagerly purged arena for large
    blocks, dirty pages turned muzzy after a delay rather than at once)."""
    return (opts.get("muzzy_decay_ms") == -1 and opts.get("oversize_threshold") == 0
            and opts.get("dirty_decay_ms") not in (None, 0))


def in_use() -> str:
    """'jemalloc (<path>)' if a jemalloc library is mapped into this process (with the options
    that keep freed pages where jemalloc says they are set: ``AGRO_ALLOCATOR=keep``), else
    'system malloc', with what :func:`retain_freed_memory` set after it."""
    lib = loaded_jemalloc()
    if lib:
        opts = jemalloc_options(lib)
        if keeps_freed_pages(opts):
            return (f"jemalloc ({lib}), keeping freed pages (dirty_decay_ms "
                    f"{opts['dirty_decay_ms']}, muzzy_decay_ms -1, oversize_threshold 0)")
        return f"jemalloc ({lib})"
    return f"system malloc, {_retaining}" if _retaining else "system malloc"
