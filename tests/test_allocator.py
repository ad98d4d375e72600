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
    with pytest.raises(ValueError, match="valid values are auto, jemalloc, system"):
        allocator.reexec_env({allocator.ENV: "tcmalloc"}, "linux", found)


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

