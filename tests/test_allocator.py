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
    assert env[allocator._DONE] == "1"
    # an existing preload is kept, after jemalloc
    assert allocator.reexec_env({"LD_PRELOAD": "/y/a.so"}, "linux", found)["LD_PRELOAD"] == \
        "/x/libjemalloc.so /y/a.so"
    # never twice, never over a jemalloc already preloaded, never when told not to
    assert allocator.reexec_env({allocator._DONE: "1"}, "linux", found) is None
    assert allocator.reexec_env({"LD_PRELOAD": "/z/libjemalloc.so.2"}, "linux", found) is None
    assert allocator.reexec_env({allocator.ENV: "system"}, "linux", found) is None
    # auto: nothing found, or not Linux -> run as is; jemalloc required -> a clear error
    assert allocator.reexec_env({}, "linux", none) is None
    assert allocator.reexec_env({}, "darwin", found) is None
    with pytest.raises(RuntimeError, match="no jemalloc library was found"):
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


@pytest.mark.skipif(not sys.platform.startswith("linux") or allocator.find_jemalloc() is None,
                    reason="no jemalloc library on this machine")
def test_the_command_reexecutes_on_jemalloc_and_a_python_call_does_not():
    """The command line (run as ``agro.cli``'s ``__main__`` on this process's argv; ``plot`` of
    a missing run fails fast) re-executes itself, and the process that runs the command has
    jemalloc mapped; with AGRO_ALLOCATOR=system it does not. An exit hook reports it."""
    probe = ("import runpy, sys, atexit\n"
             "from agro import allocator\n"
             "atexit.register(lambda: print('ALLOC', allocator.in_use(), flush=True))\n"
             "sys.argv = ['agro', 'plot', '/nonexistent-run']\n"
             "runpy.run_module('agro.cli', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k not in (allocator.ENV, allocator._DONE, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120)
    assert "ALLOC jemalloc (" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", probe], env=dict(env, **{allocator.ENV: "system"}),
                         capture_output=True, text=True, timeout=120)
    assert "ALLOC system malloc" in out.stdout, out.stdout + out.stderr
