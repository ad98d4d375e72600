"""agro.allocator: when the command re-executes itself on jemalloc, and that it then runs on it."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from agro import allocator


def test_reexec_env_rules():
    found = lambda: "/x/libjemalloc.so"          # noqa: E731
    none = lambda: None                          # noqa: E731
    env = allocator.reexec_env({"PATH": "/bin"}, "linux", found)
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so" and env["PATH"] == "/bin"
    assert env[allocator._DONE] == "1" and env[allocator._ORIG] == ""
    # an existing preload is kept, after jemalloc
    assert allocator.reexec_env({"LD_PRELOAD": "/y/a.so"}, "linux", found)["LD_PRELOAD"] == \
        "/x/libjemalloc.so /y/a.so"
    # never twice, never over a jemalloc already preloaded, never when told not to
    assert allocator.reexec_env({allocator._DONE: "1"}, "linux", found) is None
    assert allocator.reexec_env({"LD_PRELOAD": "/z/libjemalloc.so.2"}, "linux", found) is None
    assert allocator.reexec_env({"LD_PRELOAD": "/z/libtcmalloc.so.4"}, "linux", found) is None
    # ... named by the file, not by a directory on its path
    assert allocator.reexec_env({"LD_PRELOAD": "/opt/jemalloc-notes/libfoo.so"}, "linux", found)[
        "LD_PRELOAD"] == "/x/libjemalloc.so /opt/jemalloc-notes/libfoo.so"
    # a path LD_PRELOAD cannot hold is not used
    assert allocator.reexec_env({}, "linux", lambda: "/a b/libjemalloc.so") is None
    assert allocator.reexec_env({allocator.ENV: "system"}, "linux", found) is None
    # auto: nothing found, or not Linux -> run as is; jemalloc required -> a clear error
    assert allocator.reexec_env({}, "linux", none) is None
    assert allocator.reexec_env({}, "darwin", found) is None
    with pytest.raises(RuntimeError, match="no usable jemalloc library was found"):
        allocator.reexec_env({allocator.ENV: "jemalloc"}, "linux", none)
    with pytest.raises(ValueError, match="valid values are auto, jemalloc, system, retain, keep"):
        allocator.reexec_env({allocator.ENV: "tcmalloc"}, "linux", found)
    # retain: the system's malloc, tuned in place (retain_freed_memory), never a re-exec
    assert allocator.reexec_env({allocator.ENV: "retain"}, "linux", found) is None
    # keep: jemalloc with KEEP_CONF first in MALLOC_CONF (the user's options after it, so theirs
    # win), the user's MALLOC_CONF (or none) recorded for the children
    env = allocator.reexec_env({allocator.ENV: "keep"}, "linux", found)
    assert env["LD_PRELOAD"] == "/x/libjemalloc.so" and env["MALLOC_CONF"] == allocator.KEEP_CONF
    assert allocator._ORIG_CONF not in env           # none of the user's: none for the children
    env = allocator.reexec_env({allocator.ENV: "keep", "MALLOC_CONF": ""}, "linux", found)
    assert env["MALLOC_CONF"] == allocator.KEEP_CONF and env[allocator._ORIG_CONF] == ""
    # a stale marker in the user's environment never reaches auto's children
    assert allocator._ORIG_CONF not in allocator.reexec_env({allocator._ORIG_CONF: "x"}, "linux",
                                                            found)
    env = allocator.reexec_env({allocator.ENV: "keep", "MALLOC_CONF": "narenas:2"}, "linux", found)
    assert env["MALLOC_CONF"] == allocator.KEEP_CONF + ",narenas:2"
    assert env[allocator._ORIG_CONF] == "narenas:2"
    assert "MALLOC_CONF" not in allocator.reexec_env({}, "linux", found)     # auto: untouched
    with pytest.raises(RuntimeError, match="keep but no usable jemalloc.*retain keeps freed"):
        allocator.reexec_env({allocator.ENV: "keep"}, "linux", none)
    with pytest.raises(RuntimeError, match="keep: only supported on Linux"):
        allocator.reexec_env({allocator.ENV: "keep"}, "darwin", found)
    with pytest.raises(RuntimeError, match="already names an allocator .*libtcmalloc.so.4"):
        allocator.reexec_env({allocator.ENV: "keep", "LD_PRELOAD": "/z/libtcmalloc.so.4"},
                             "linux", found)
    assert allocator.reexec_env({allocator.ENV: "keep", allocator._DONE: "1"}, "linux",
                                found) is None


def test_jemalloc_is_named_by_the_library_mapped_not_by_any_path():
    lib = "7f12-7f13 r-xp 00000000 fe:01 123 /v/lib/python3.11/site-packages/ray/core/libjemalloc.so"
    model = "7f14-7f15 r--s 00000000 fe:01 456 /runs/cache-jemalloc/gguf/model.safetensors"
    anon = "7f16-7f17 rw-p 00000000 00:00 0 "
    assert allocator.mapped_allocator("\n".join([anon, model])) is None
    assert allocator.mapped_allocator("\n".join([model, lib, anon])) == \
        "/v/lib/python3.11/site-packages/ray/core/libjemalloc.so"
    assert allocator.mapped_allocator("1-2 r-xp 0 fe:01 9 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2") \
        == "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def test_find_jemalloc_honours_the_path_variable(tmp_path, monkeypatch):
    lib = tmp_path / "libjemalloc.so"
    lib.write_bytes(b"")
    monkeypatch.setenv(allocator.PATH_ENV, str(lib))
    assert allocator.find_jemalloc() == str(lib)
    monkeypatch.setenv(allocator.PATH_ENV, str(tmp_path / "missing.so"))
    assert allocator.find_jemalloc() is None


def test_only_the_command_itself_is_reexecuted():
    assert allocator.started_as_command(["/v/bin/python", "/v/bin/agro", "train"])
    assert allocator.started_as_command(["python", "-u", "-m", "agro.cli", "train"])
    assert not allocator.started_as_command(["python", "-c", "..."])
    assert not allocator.started_as_command(["python", "-m", "pytest"])
    assert not allocator.started_as_command(["python", "myscript.py"])


def _reporting_cli(tmp_path):
    """A runner of ``python <args>`` whose sitecustomize exit hook prints the process's allocator
    (``ALLOC``), its LD_PRELOAD and MALLOC_CONF and the oneDNN cache caps; agro's allocator
    variables unset."""
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "def _report():\n"
        "    from agro import allocator\n"
        "    print('ALLOC', allocator.in_use(), 'PRELOAD', os.environ.get('LD_PRELOAD'),\n"
        "          'CONF', os.environ.get('MALLOC_CONF'), flush=True)\n"
        "    print('CAPS', os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'),\n"
        "          os.environ.get('LRU_CACHE_CAPACITY'), flush=True)\n"
        "atexit.register(_report)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in (allocator.ENV, allocator._DONE, allocator._ORIG, allocator._ORIG_CONF,
                        "LD_PRELOAD", "MALLOC_CONF", *allocator.ONEDNN_CACHES)}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])

    def run(args, **extra):
        out = subprocess.run([sys.executable, *args], env=dict(env, **extra), capture_output=True,
                             text=True, timeout=120)
        return out.stdout + out.stderr
    return run


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.find_jemalloc() is None,
                    reason="no jemalloc library on this machine")
def test_the_command_reexecutes_on_jemalloc_and_a_python_call_does_not(tmp_path):
    """``python -m agro.cli plot <missing run>`` (fails fast) runs on jemalloc, with the user's
    LD_PRELOAD (none) restored for its children; with AGRO_ALLOCATOR=system, or called from
    Python, it does not. A sitecustomize exit hook reports the process's allocator."""
    run = _reporting_cli(tmp_path)
    cmd = ["-m", "agro.cli", "plot", str(tmp_path / "missing-run")]
    out = run(cmd)
    assert "ALLOC jemalloc (" in out and "PRELOAD None" in out, out
    assert "CAPS 128 128" in out, out                       # oneDNN's caches capped ...
    assert "CAPS 512 128" in run(cmd, ONEDNN_PRIMITIVE_CACHE_CAPACITY="512")   # ... unless set
    assert "ALLOC system malloc" in run(cmd, AGRO_ALLOCATOR="system")
    out = run(["-c", f"from agro.cli import main; main(['plot', {str(tmp_path / 'x')!r}])"])
    assert "ALLOC system malloc" in out and "CAPS None None" in out, out   # a library call: no
    out = run(cmd, AGRO_ALLOCATOR="retain", LD_PRELOAD=allocator.find_jemalloc())
    assert "retain tunes the system's malloc, but another allocator is loaded" in out, out
    # keep: on jemalloc with KEEP_CONF, read back from jemalloc; the children get the user's
    # MALLOC_CONF (here none, then one of theirs, which also comes after KEEP_CONF and so wins)
    out = run(cmd, AGRO_ALLOCATOR="keep")
    assert "ALLOC jemalloc (" in out and "PRELOAD None CONF None" in out, out
    assert "keeping freed pages (dirty_decay_ms 100, muzzy_decay_ms -1, oversize_threshold 0)" \
        in out, out
    out = run(cmd, AGRO_ALLOCATOR="keep", MALLOC_CONF="muzzy_decay_ms:5000")
    assert "ALLOC jemalloc (" in out and "keeping" not in out, out
    assert "PRELOAD None CONF muzzy_decay_ms:5000" in out, out
    out = run(["-c", "from agro.allocator import maybe_reexec; maybe_reexec()"],
              AGRO_ALLOCATOR="keep")
    assert "keep needs the `agro` command" in out, out


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="retain tunes glibc's malloc")
def test_the_command_retains_in_place_and_only_as_the_command(tmp_path):
    run = _reporting_cli(tmp_path)
    cmd = ["-m", "agro.cli", "plot", str(tmp_path / "missing-run")]
    out = run(cmd, AGRO_ALLOCATOR="retain")
    assert "ALLOC system malloc, retaining freed memory" in out and "PRELOAD None" in out, out
    assert "CAPS 128 128" in out, out
    out = run(["-c", "from agro.allocator import maybe_reexec; maybe_reexec()"],
              AGRO_ALLOCATOR="retain")
    assert "retain needs the `agro` command" in out, out


def test_an_invalid_choice_is_an_error_off_the_command_path_too(monkeypatch):
    monkeypatch.delenv(allocator._DONE, raising=False)
    monkeypatch.setattr(allocator, "started_as_command", lambda: False)
    monkeypatch.setenv(allocator.ENV, "jemaloc")
    with pytest.raises(ValueError, match="AGRO_ALLOCATOR='jemaloc': valid values are"):
        allocator.maybe_reexec()
    monkeypatch.setenv(allocator.ENV, "system")            # a valid one: nothing to do
    assert allocator.maybe_reexec() is None


def test_the_reexecuted_process_restores_the_users_variables_and_checks_keep(monkeypatch):
    """In the re-executed process (``_DONE`` set): LD_PRELOAD and, under keep, MALLOC_CONF are
    the user's again (absent if they had none, empty if empty); keep's options not taken where
    the user set none of their own is an error, as is jemalloc not loaded."""
    lib, keep = "/x/libjemalloc.so", (100, -1, 0)
    defaults = (10000, 0, 8 << 20)       # jemalloc 5.3's own: what a jemalloc ignoring KEEP_CONF has

    def reexecuted(opts, **env):
        """maybe_reexec in a re-executed process whose jemalloc has options ``opts`` (dirty,
        muzzy, oversize; None: no jemalloc mapped)."""
        for k in ("LD_PRELOAD", "MALLOC_CONF", allocator._ORIG, allocator._ORIG_CONF):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setattr(allocator, "loaded_jemalloc", lambda: None if opts is None else lib)
        got = dict(zip((f"opt.{o}" for o in allocator.KEEP_OPTIONS), opts or ()))
        monkeypatch.setattr(allocator, "jemalloc_option", lambda _lib, name: got.get(name))
        base = {allocator._DONE: "1", allocator.ENV: "keep", "LD_PRELOAD": lib,
                allocator._ORIG: "", "MALLOC_CONF": allocator.KEEP_CONF}
        for k, v in dict(base, **env).items():
            monkeypatch.setenv(k, v)
        allocator.maybe_reexec()
        return os.environ.get("LD_PRELOAD"), os.environ.get("MALLOC_CONF")

    assert reexecuted(keep) == (None, None)
    assert reexecuted(keep, **{allocator._ORIG_CONF: ""}) == (None, "")
    assert reexecuted(keep, **{allocator._ORIG_CONF: "narenas:1",
                               allocator._ORIG: "/y/a.so"}) == ("/y/a.so", "narenas:1")
    with pytest.raises(RuntimeError, match="keep: jemalloc did not take"):
        reexecuted(defaults)
    with pytest.raises(RuntimeError, match="keep: jemalloc did not take"):
        reexecuted((None, None, None))                          # options not readable
    # the user's own MALLOC_CONF waives the check only where it sets one of keep's options
    with pytest.raises(RuntimeError, match="keep: jemalloc did not take"):
        reexecuted(defaults, **{allocator._ORIG_CONF: "narenas:1"})
    assert reexecuted((100, 5000, 0), **{
        allocator._ORIG_CONF: "narenas:1,muzzy_decay_ms:5000"})[1] == "narenas:1,muzzy_decay_ms:5000"
    with pytest.raises(RuntimeError, match="jemalloc: LD_PRELOAD was set but jemalloc is not"):
        reexecuted(None, **{allocator.ENV: "jemalloc"})
    with pytest.raises(RuntimeError, match="keep: LD_PRELOAD was set but jemalloc is not loaded"):
        reexecuted(None)
    # jemalloc and auto check no options; auto leaves MALLOC_CONF as the user has it
    assert reexecuted(defaults, **{allocator.ENV: "jemalloc"}) == (None, allocator.KEEP_CONF)
    assert reexecuted(defaults, **{allocator.ENV: "auto", "MALLOC_CONF": "narenas:1"}) == \
        (None, "narenas:1")


def test_in_use_names_keeps_options_only_when_all_of_them_hold(monkeypatch):
    # the options read back and checked are exactly the ones KEEP_CONF sets
    assert set(allocator.KEEP_OPTIONS) == {kv.split(":")[0] for kv in allocator.KEEP_CONF.split(",")}
    lib = "/v/ray/core/libjemalloc.so"
    monkeypatch.setattr(allocator, "mapped_allocator", lambda maps, names=("jemalloc",): lib)
    for opts, kept in (((100, -1, 0), True), ((0, -1, 0), False), ((100, -1, 8 << 20), False),
                       ((100, 0, 0), False), ((None, None, None), False), ((None, -1, 0), False)):
        got = dict(zip((f"opt.{o}" for o in allocator.KEEP_OPTIONS), opts))
        monkeypatch.setattr(allocator, "jemalloc_option", lambda _lib, name: got[name])
        assert allocator.keeps_freed_pages(allocator.jemalloc_options(lib)) == kept, opts
        said = allocator.in_use()
        assert said.startswith(f"jemalloc ({lib})") and ("keeping freed pages" in said) == kept, \
            (opts, said)
        if kept:
            assert f"(dirty_decay_ms {opts[0]}, muzzy_decay_ms -1, oversize_threshold 0)" in said


def test_an_explicit_jemalloc_choice_that_cannot_reexecute_is_an_error(monkeypatch):
    monkeypatch.delenv(allocator._DONE, raising=False)
    monkeypatch.setattr(allocator, "started_as_command", lambda: True)
    monkeypatch.setattr(allocator, "reexec_env", lambda environ: dict(environ, LD_PRELOAD="/x.so"))

    def refuse(*a):
        raise OSError("exec refused")
    monkeypatch.setattr(allocator.os, "execve", refuse)
    for chosen in ("keep", "jemalloc"):
        monkeypatch.setenv(allocator.ENV, chosen)
        with pytest.raises(RuntimeError, match=f"{chosen}: could not re-execute .*exec refused"):
            allocator.maybe_reexec()
    monkeypatch.setenv(allocator.ENV, "auto")
    allocator.maybe_reexec()            # auto: runs on as it is


def test_onednn_cache_caps_keep_what_the_user_set():
    e: dict = {}
    allocator.cap_onednn_caches(e, machine="x86_64")
    assert e == allocator.ONEDNN_CACHES
    e = {"LRU_CACHE_CAPACITY": "7", "DNNL_PRIMITIVE_CACHE_CAPACITY": "9"}   # the older name
    allocator.cap_onednn_caches(e, machine="x86_64")
    assert e == {"LRU_CACHE_CAPACITY": "7", "DNNL_PRIMITIVE_CACHE_CAPACITY": "9"}
    e = {}
    allocator.cap_onednn_caches(e, machine="aarch64")     # ideep's default there is 1 entry
    assert e == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "128"}



_FAULTS = """
import ctypes, resource, sys, time
libc = ctypes.CDLL(None)            # under a preloaded jemalloc its mallctl is the global one
libc.prctl(41, 1, 0, 0, 0)          # PR_SET_THP_DISABLE: count 4 KiB pages, whatever THP is
mode = sys.argv[1]                  # system | retain | jemalloc (preloaded: its decay between rounds)
if mode == "jemalloc":
    size, v = ctypes.c_size_t(8), ctypes.c_ssize_t(0)
    if libc.mallctl(b"opt.oversize_threshold", ctypes.byref(v), ctypes.byref(size), None, 0):
        print("no oversize_threshold")  # jemalloc < 5.2
        sys.exit()
import torch
from agro import allocator
if mode == "retain":
    allocator.retain_freed_memory()
def between_rounds():   # jemalloc: what its decay would have done by the next step, 0.2 s later
    if mode == "jemalloc":
        time.sleep(0.2)
        assert libc.mallctl(b"arena.4096.decay", None, None, None, ctypes.c_size_t(0)) == 0
def faults_of_a_round():        # blocks of a learner step's sizes: 3, 40 and 1 MiB, all written
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for n, mib in ((8, 3), (3, 40), (20, 1)):
        xs = [torch.ones(mib * 2 ** 20 // 4) for _ in range(n)]
        del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
faults_of_a_round()
between_rounds()
total = 0
for _ in range(3):
    total += faults_of_a_round()
    between_rounds()
print(total)
"""




@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.find_jemalloc() is None,
                    reason="no jemalloc library on this machine")
def test_keep_reuses_freed_pages_where_default_jemalloc_faults_them_in():
    """The behaviour ``keep`` is for, on blocks of a learner step's sizes with jemalloc's decay
    run between rounds (as the time between two steps would): with KEEP_CONF the rounds land on
    pages freed lazily and reused without a fault; with jemalloc's defaults (its arena for blocks
    of 8 MiB and more hands them back at once), or with KEEP_CONF but lazily freed pages purged
    for good (``muzzy_decay_ms:0``), they are faulted in afresh. Each in a fresh process with
    jemalloc preloaded."""
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")
            and not k.startswith("MALLOC_")}
    base["LD_PRELOAD"] = allocator.find_jemalloc()

    def faults(**extra):
        out = subprocess.run([sys.executable, "-c", _FAULTS, "jemalloc"], env=dict(base, **extra),
                             capture_output=True, text=True, timeout=120, check=True).stdout
        if "no oversize_threshold" in out:
            pytest.skip("jemalloc older than 5.2: KEEP_CONF's oversize_threshold does not apply")
        return int(out.split()[-1])
    plain, kept = faults(), faults(MALLOC_CONF=allocator.KEEP_CONF)
    purged = faults(MALLOC_CONF=allocator.KEEP_CONF.replace("muzzy_decay_ms:-1",
                                                            "muzzy_decay_ms:0"))
    assert plain >= 20000 and purged >= 20000, (plain, purged)
    assert kept * 5 < min(plain, purged), (kept, plain, purged)


def _glibc_at_least(major: int, minor: int) -> bool:
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (major, minor)
    except ValueError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _glibc_at_least(2, 35),
                    reason="glibc >= 2.35 (older ones map blocks over 32 MiB apart whatever is set)")
def test_retain_keeps_freed_memory_faulted_in():
    """The behaviour ``retain`` is for: after a first round, the same round of allocations lands
    on pages already faulted in, where the system's default malloc maps and faults its blocks
    afresh every round (glibc here: ~0 against ~92,000 minor faults over three rounds). Each in
    a fresh process without LD_PRELOAD."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")
           and not k.startswith("MALLOC_")}

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        return int(out.stdout.split()[-1])
    plain, kept = faults("system"), faults("retain")
    assert plain >= 20000, plain         # 3 x 40 MiB mapped and faulted afresh each round
    assert kept * 5 < plain, (kept, plain)


def test_retain_refuses_without_mallopt_or_under_another_allocator(monkeypatch):
    monkeypatch.setattr(allocator, "_retaining", None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)

    class NoMallopt:
        pass
    with pytest.raises(RuntimeError, match="needs glibc's malloc"):
        allocator.retain_freed_memory(NoMallopt(), maps="")

    class Refuses:
        @staticmethod
        def mallopt(param, value):
            return 0
    with pytest.raises(RuntimeError, match="was refused"):
        allocator.retain_freed_memory(Refuses(), maps="")
    tc = "7f-80 r-xp 0 fe:01 9 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    with pytest.raises(RuntimeError, match="another allocator is loaded .*libtcmalloc"):
        allocator.retain_freed_memory(Refuses(), maps=tc)
    monkeypatch.setenv("LD_PRELOAD", "/opt/libmimalloc.so")
    with pytest.raises(RuntimeError, match="another allocator is loaded .*libmimalloc"):
        allocator.retain_freed_memory(Refuses(), maps="")
    assert allocator._retaining is None and allocator.in_use() == "system malloc"


def test_retain_falls_back_to_old_glibcs_largest_mmap_threshold(monkeypatch):
    """glibc before 2.35 refuses an mmap threshold over 32 MiB: take 32 MiB and say so."""
    monkeypatch.setattr(allocator, "_retaining", None)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    calls = []

    class OldGlibc:
        @staticmethod
        def mallopt(param, value):
            calls.append((param, value))
            return int(param != allocator._M_MMAP_THRESHOLD or value <= 32 * 2 ** 20)
    said = allocator.retain_freed_memory(OldGlibc(), maps="")
    assert (allocator._M_MMAP_THRESHOLD, allocator.OLD_GLIBC_MMAP_MAX) in calls
    assert (allocator._M_TRIM_THRESHOLD, allocator.RETAIN_THRESHOLD) in calls
    assert "blocks over 32 MiB still mapped apart: glibc before 2.35" in said
    assert said in allocator.in_use()
