"""A harness (not a feature): jemalloc purging every arena's freed pages before and/or after each
learner step of an ``agro train`` run, to see whether that bounds ``AGRO_ALLOCATOR=keep``'s
peak memory (docs/RESULTS.md, "AMD EPYC (Zen 5), 2026-12-05 (fifth)").

    PURGE_AT=after PYTHONPATH=bench/purge_site AGRO_ALLOCATOR=keep /usr/bin/time -v \
        .venv/bin/agro train overwrite=true precision=fp32 steps=15 output_dir=runs/bench-purge

PURGE_AT: ``before``, ``after`` or both (``before,after``); unset: nothing is patched. Python
imports this ``sitecustomize`` at start-up (``PYTHONPATH``); it wraps ``agro.trainer.Trainer.learn``
when that module is imported and calls jemalloc's ``mallctl("arena.4096.purge")`` (4096: every
arena) around it, and prints the purges' count and seconds at exit.
"""
import os, ctypes, time
_P = os.environ.get("PURGE_AT")
if _P:
    def _purge():
        from agro.allocator import loaded_jemalloc
        lib = loaded_jemalloc()
        if not lib:
            return
        m = ctypes.CDLL(lib, mode=os.RTLD_NOLOAD).mallctl
        m.restype = ctypes.c_int
        m.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        t = time.perf_counter()
        m(b"arena.4096.purge", None, None, None, 0)
        _purge.t += time.perf_counter() - t
        _purge.n += 1
    _purge.t = 0.0; _purge.n = 0
    import atexit
    atexit.register(lambda: print(f"PURGES {_purge.n} {_purge.t:.2f} s", flush=True))
    import importlib.abc, sys
    def _patch():
        import agro.trainer as T
        learn = T.Trainer.learn
        def patched(self, groups):
            if "before" in _P: _purge()
            out = learn(self, groups)
            if "after" in _P: _purge()
            return out
        T.Trainer.learn = patched
    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "agro.trainer":
                sys.meta_path.remove(self)
                import importlib.util
                spec = importlib.util.find_spec(name)
                orig = spec.loader.exec_module
                def exec_module(mod):
                    orig(mod); _patch()
                spec.loader.exec_module = exec_module
                return spec
            return None
    sys.meta_path.insert(0, _Hook())
