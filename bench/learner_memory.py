"""What the learner step keeps in memory: autograd's saved tensors by shape, and peak RSS by
sub-phase of the step.

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/learner_memory.py steps=3 [precision=fp32 ...]

(``agro train`` preloads jemalloc itself, see agro.allocator; this script runs the trainer
in-process, so preload it as the command line does: the path is
``.venv/bin/python -c "from agro.allocator import find_jemalloc; print(find_jemalloc())"``.)

Runs ``agro train`` in this process with the overrides given (no evaluation, checkpoints
synchronous; output in runs/bench-learner-memory). For every micro-batch it prints the bytes of
the distinct storages autograd keeps for the backward pass (``saved_tensors_hooks``), largest
shapes first; parameters appear too (a linear layer keeps its weight), which cost nothing extra.
A thread samples VmRSS every 10 ms and attributes it to the sub-phase running: ``forward``
(the loss on a micro-batch), ``backward``, ``accumulate`` (bf16 grads into the fp32 masters),
``clip``, ``optimizer``, ``refresh`` (masters into the bf16 copy), ``collect`` (sampling,
grading, reference pass), ``save``. Prints each sub-phase's peak in GiB. Linux only. Run alone.
"""
from __future__ import annotations

import collections
import functools
import sys
import threading
import time

import torch

phase = ["import"]
peak: dict[str, float] = {}


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return 0.0


def sample_forever() -> None:
    while True:
        p = phase[-1]
        peak[p] = max(peak.get(p, 0.0), rss_gib())
        time.sleep(0.01)


def label(obj, name: str, what: str) -> None:
    f = getattr(obj, name)

    @functools.wraps(f)
    def g(*a, **k):
        prev = phase[-1]
        phase.append(what)
        try:
            return f(*a, **k)
        finally:
            phase.append(prev)
    setattr(obj, name, g)


def main() -> None:
    threading.Thread(target=sample_forever, daemon=True).start()
    import agro.collect as C
    import agro.models as M
    import agro.trainer as T
    from agro.config import TrainConfig, load_config

    tally: collections.Counter = collections.Counter()
    seen: set[int] = set()

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            tally[(tuple(t.shape), str(t.dtype).replace("torch.", ""))] += s.nbytes()
        return t

    loss_fn = T.Trainer.micro_batch_loss

    def micro_batch_loss(self, batch):
        seen.clear()
        tally.clear()
        phase.append("forward")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = loss_fn(self, batch)
        phase.append("backward")
        print(f"[saved] micro-batch of {batch.num_samples} samples, input {tuple(batch.input_ids.shape)}: "
              f"{sum(tally.values()) / 2**20:.0f} MiB kept for the backward; largest:", flush=True)
        for (shape, dtype), b in tally.most_common(12):
            print(f"   {shape} {dtype} {b / 2**20:.1f} MiB")
        return out

    T.Trainer.micro_batch_loss = micro_batch_loss
    label(T.Trainer, "learn", "learn-other")
    label(M.MasterWeights, "accumulate_grads", "accumulate")
    label(M.MasterWeights, "refresh", "refresh")
    label(torch.nn.utils, "clip_grad_norm_", "clip")
    label(C.Collector, "collect", "collect")
    label(T.Trainer, "save", "save")
    cfg = load_config(TrainConfig, None, sys.argv[1:] + [
        "output_dir=runs/bench-learner-memory", "overwrite=true", "progress=false", "plot=false",
        "save_async=false", "eval_prompts=0"])
    tr = T.Trainer(cfg)
    label(tr.optimizer, "step", "optimizer")     # the instance: the LR scheduler wraps it there
    phase.append("other")
    tr.train()
    print("peak RSS by sub-phase:")
    for k, v in sorted(peak.items(), key=lambda x: -x[1]):
        print(f"  {k:12s} {v:.2f} GiB")


if __name__ == "__main__":
    main()
