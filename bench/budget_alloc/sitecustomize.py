import os
_B = os.environ.get("BUDGET_MB")
if _B:
    import importlib.abc, sys, atexit, ctypes
    def _install():
        import torch  # noqa: F401  (libc10 loaded first)
        lib = ctypes.CDLL(os.path.join(os.path.dirname(os.path.abspath(__file__)), "budget_alloc.so"))
        lib.budget_install(ctypes.c_size_t(int(_B) << 20))
        def stats():
            out = (ctypes.c_size_t * 5)()
            lib.budget_stats(out)
            print(f"BUDGET {_B} MiB: hits {out[0]} misses {out[1]} dropped {out[2]} "
                  f"cached {out[3] / 2**20:.0f} MiB peak cached {out[4] / 2**20:.0f} MiB", flush=True)
        atexit.register(stats)
    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "agro.trainer":
                sys.meta_path.remove(self)
                import importlib.util
                spec = importlib.util.find_spec(name)
                orig = spec.loader.exec_module
                def exec_module(mod):
                    orig(mod); _install()
                spec.loader.exec_module = exec_module
                return spec
            return None
    sys.meta_path.insert(0, _Hook())
