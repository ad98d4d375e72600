"""agro.allocator: when the command re-executes itself on jemalloc, and that it then runs on it."""
from __future__ import annotations

import os
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
    # a path LD_PRELOAD cannot hold is not used
    assert allocator.reexec_env({}, "linux", lambda: "/a b/libjemalloc.so") is None
    assert allocator.reexec_env({allocator.ENV: "system"}, "linux", found) is None
    # auto: nothing found, or not Linux -> run as is; jemalloc required -> a clear error
    assert allocator.reexec_env({}, "linux", none) is None
    assert allocator.reexec_env({}, "darwin", found) is None
    with pytest.raises(RuntimeError, match="no usable jemalloc library was found"):
        allocator.reexec_env({allocator.ENV: "jemalloc"}, "linux", none)
    with pytest.raises(ValueError, match="valid values are auto, jemalloc, system, retain"):
        allocator.reexec_env({allocator.ENV: "tcmalloc"}, "linux", found)
    # retain: the system's malloc, tuned in place (retain_freed_memory), never a re-exec
    assert allocator.reexec_env({allocator.ENV: "retain"}, "linux", found) is None


def test_jemalloc_is_named_by_the_library_mapped_not_by_any_path():
    lib = "7f12-7f13 r-xp 00000000 fe:01 123 /v/lib/python3.11/site-packages/ray/core/libjemalloc.so"
    model = "7f14-7f15 r--s 00000000 fe:01 456 /runs/cache-jemalloc/gguf/model.safetensors"
    anon = "7f16-7f17 rw-p 00000000 00:00 0 "
    assert allocator.jemalloc_mapped("\n".join([anon, model])) is None
    assert allocator.jemalloc_mapped("\n".join([model, lib, anon])) == \
        "/v/lib/python3.11/site-packages/ray/core/libjemalloc.so"
    assert allocator.jemalloc_mapped("1-2 r-xp 0 fe:01 9 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2") \
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


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.find_jemalloc() is None,
                    reason="no jemalloc library on this machine")
def test_the_command_reexecutes_on_jemalloc_and_a_python_call_does_not(tmp_path):
    """``python -m agro.cli plot <missing run>`` (fails fast) runs on jemalloc, with the user's
    LD_PRELOAD (none) restored for its children; with AGRO_ALLOCATOR=system, or called from
    Python, it does not. A sitecustomize exit hook reports the process's allocator."""
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit, os\n"
        "def _report():\n"
        "    from agro import allocator\n"
        "    print('ALLOC', allocator.in_use(), 'PRELOAD', os.environ.get('LD_PRELOAD'), flush=True)\n"
        "    print('CAPS', os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'),\n"
        "          os.environ.get('LRU_CACHE_CAPACITY'), flush=True)\n"
        "atexit.register(_report)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in (allocator.ENV, allocator._DONE, allocator._ORIG, "LD_PRELOAD",
                        *allocator.ONEDNN_CACHES)}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])

    def run(args, **extra):
        out = subprocess.run([sys.executable, *args], env=dict(env, **extra), capture_output=True,
                             text=True, timeout=120)
        return out.stdout + out.stderr

    cmd = ["-m", "agro.cli", "plot", str(tmp_path / "missing-run")]
    out = run(cmd)
    assert "ALLOC jemalloc (" in out and "PRELOAD None" in out, out
    assert "CAPS 128 128" in out, out                       # oneDNN's caches capped ...
    assert "CAPS 512 128" in run(cmd, ONEDNN_PRIMITIVE_CACHE_CAPACITY="512")   # ... unless set
    assert "ALLOC system malloc" in run(cmd, AGRO_ALLOCATOR="system")
    out = run(cmd, AGRO_ALLOCATOR="retain")
    assert "ALLOC system malloc, retaining freed memory" in out and "PRELOAD None" in out, out
    out = run(cmd, AGRO_ALLOCATOR="retain", LD_PRELOAD=allocator.find_jemalloc())
    assert "retain tunes the system's malloc, but jemalloc is preloaded" in out, out
    out = run(["-c", f"from agro.cli import main; main(['plot', {str(tmp_path / 'x')!r}])"])
    assert "ALLOC system malloc" in out and "CAPS None None" in out, out   # a library call: no


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
import resource, sys
import torch
from agro import allocator
if sys.argv[1] == "retain":
    allocator.retain_freed_memory()
def faults_of_a_round():        # blocks of a learner step's sizes: 3, 40 and 1 MiB, all written
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for n, mib in ((8, 3), (3, 40), (20, 1)):
        xs = [torch.ones(mib * 2 ** 20 // 4) for _ in range(n)]
        del xs
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
faults_of_a_round()
print(sum(faults_of_a_round() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_retain_keeps_freed_memory_faulted_in():
    """The behaviour ``retain`` is for: after a first round, the same round of allocations lands
    on pages already faulted in, where the system's default malloc maps and faults its blocks
    afresh every round (glibc here: ~0 against ~92,000 minor faults over three rounds). Each in
    a fresh process without LD_PRELOAD."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD" and not k.startswith("MALLOC_")}

    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        return int(out.stdout.split()[-1])
    plain, kept = faults("system"), faults("retain")
    assert plain >= 20000, plain         # 3 x 40 MiB mapped and faulted afresh each round
    assert kept * 5 < plain, (kept, plain)


def test_retain_refuses_without_mallopt(monkeypatch):
    class NoMallopt:
        pass
    monkeypatch.setattr(allocator, "_retaining", False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator, "in_use", lambda: "system malloc")
    with pytest.raises(RuntimeError, match="needs glibc's malloc"):
        allocator.retain_freed_memory(NoMallopt())

    class Refuses:
        @staticmethod
        def mallopt(param, value):
            return 0
    with pytest.raises(RuntimeError, match="was refused"):
        allocator.retain_freed_memory(Refuses())
    assert not allocator._retaining
