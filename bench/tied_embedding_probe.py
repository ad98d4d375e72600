"""Probe (not a feature): a tied input embedding whose weight gradient is added straight into the
shared weight's ``.grad`` (``index_add_`` of the rows looked up, at the end of ``backward``)
instead of autograd's dense [V, H] gradient (a fresh zero-filled tensor the size of the LM head,
then summed with the head's own gradient), on the learner step.

    LD_PRELOAD=<jemalloc> ONEDNN_PRIMITIVE_CACHE_CAPACITY=128 LRU_CACHE_CAPACITY=128 \
        .venv/bin/python bench/tied_embedding_probe.py fp32 {dense,fused} [--steps 4]

Builds the default job's trainer (bench/abrounds.py), samples one step's groups (seed 1),
attaches their reference log-probs, runs two warm-up learner steps and ``--steps`` more, printing
each one's wall seconds, minor page faults and system CPU seconds, then the peak RSS. ``fused``
replaces the embedding module's ``forward`` of the model the learner runs (padding rows get no
gradient, as ``F.embedding``'s). Run each arm in its own process, alone on the machine. It
measures time, faults and memory only: it does not check that the fused arm's gradient equals
the dense one's (the same sum of the same rows in another order; not tested).
"""
from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from abrounds import bench_trainer, one_step_groups  # bench/abrounds.py (bench/ is on sys.path)

from agro.allocator import in_use


class _TiedEmbeddingFn(torch.autograd.Function):
    """F.embedding(ids, w, pad) whose backward adds dL/dw's looked-up rows into ``w.grad`` at the
    end of the backward pass (after the head's gradient reached it) and returns None for w."""

    @staticmethod
    def forward(ctx, ids, w, pad):
        ctx.save_for_backward(ids)
        ctx.w, ctx.pad = w, pad
        return F.embedding(ids, w, pad)

    @staticmethod
    def backward(ctx, g):
        ids, = ctx.saved_tensors
        w, pad = ctx.w, ctx.pad
        flat_ids, flat_g = ids.reshape(-1), g.reshape(-1, g.shape[-1])
        if pad is not None:
            keep = flat_ids != pad
            flat_ids, flat_g = flat_ids[keep], flat_g[keep]

        def add():
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.index_add_(0, flat_ids, flat_g.to(w.grad.dtype))
        torch.autograd.Variable._execution_engine.queue_callback(add)
        return None, None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("precision", choices=["fp32", "bf16"])
    ap.add_argument("arm", choices=["dense", "fused"])
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    tr = bench_trainer("tied-embedding", f"precision={a.precision}")
    model = tr.mixed.work if tr.mixed else tr.learner
    emb = model.get_input_embeddings()
    if emb.weight is not model.get_output_embeddings().weight:
        raise SystemExit("the model's input embedding is not tied to its LM head")
    if a.arm == "fused":
        emb.forward = lambda ids: _TiedEmbeddingFn.apply(ids, emb.weight, emb.padding_idx)
    groups = one_step_groups(tr, seed=1)
    tr.collector.attach_ref_logprobs(groups)
    for _ in range(2):
        tr.learn(groups)
    print(f"{a.arm}; allocator: {in_use()}", flush=True)
    for i in range(a.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        tr.learn(groups)
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        print(f"{i + 1:3d} {dt:6.2f} s  faults {r1.ru_minflt - r0.ru_minflt:8d}  "
              f"sys {r1.ru_stime - r0.ru_stime:5.2f}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
    tr.close_generator()


if __name__ == "__main__":
    main()
