"""Test doubles shared by the end-to-end tests."""
import zlib

from agro.grading import GradeResult


class HashGrader:
    """Deterministic pseudo-rewards from the completion text, so a random tiny model still gets
    a learning signal (real grading is tested in test_rewards / test_hostile_grading)."""

    def grade(self, completions, answers):
        return GradeResult(rewards=[float(zlib.crc32(c.encode()) % 2) for c in completions])

    def close(self):
        pass


def make_offline_file(model_dir, out, num_prompts=6, group_size=3, max_new_tokens=6,
                      precision="fp32"):
    """An offline group file from the tiny model, scored by HashGrader (so it carries signal)."""
    from agro.config import GenerateConfig, load_config
    from agro.workflows import generate_offline

    cfg = load_config(GenerateConfig, None, [f"model={model_dir}", f"output={out}",
                                             f"num_prompts={num_prompts}", f"group_size={group_size}",
                                             f"max_new_tokens={max_new_tokens}", f"precision={precision}"])
    path, n = generate_offline(cfg, grader=HashGrader())
    assert n == num_prompts
    return path


class NondeterministicCpuOps:
    """Records the CPU ops with a nondeterministic default that agro could plausibly run (from
    the list in ``torch.use_deterministic_algorithms``' docs, torch 2.x): ``index_put`` (also
    ``_index_put_impl_``, ``_unsafe_index_put``) and ``put`` with ``accumulate=True``, which
    advanced indexing's backward (``x[idx]``) runs, adding repeated indices with parallel atomics
    in an order that varies from run to run, and ``index_copy``.

    ``with NondeterministicCpuOps() as rec: ...`` then ``rec.found`` lists ``(op, shape)``;
    forward and backward ops on the calling thread are seen (a torch dispatch mode)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        found = self.found = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                if name in ("index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put",
                            "put", "put_"):
                    acc = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
                    if acc and args[0].device.type == "cpu":
                        found.append((str(func), tuple(args[0].shape)))
                elif name in ("index_copy", "index_copy_") and args[0].device.type == "cpu":
                    found.append((str(func), tuple(args[0].shape)))
                return func(*args, **kwargs)

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
