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
import sys

import torch
import rss_phases as rss  # bench/rss_phases.py (bench/ is on sys.path)


def main() -> None:
    rss.start(0.01)
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
        rss.phase.append("forward")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = loss_fn(self, batch)
        rss.phase.append("backward")
        print(f"[saved] micro-batch of {batch.num_samples} samples, input {tuple(batch.input_ids.shape)}: "
              f"{sum(tally.values()) / 2**20:.0f} MiB kept for the backward; largest:", flush=True)
        for (shape, dtype), b in tally.most_common(12):
            print(f"   {shape} {dtype} {b / 2**20:.1f} MiB")
        return out

    T.Trainer.micro_batch_loss = micro_batch_loss
    rss.label(T.Trainer, "learn", "learn-other")
    rss.label(M.MasterWeights, "accumulate_grads", "accumulate")
    rss.label(M.MasterWeights, "refresh", "refresh")
    rss.label(torch.nn.utils, "clip_grad_norm_", "clip")
    rss.label(C.Collector, "collect", "collect")
    rss.label(T.Trainer, "save", "save")
    cfg = load_config(TrainConfig, None, sys.argv[1:] + [
        "output_dir=runs/bench-learner-memory", "overwrite=true", "progress=false", "plot=false",
        "save_async=false", "eval_prompts=0"])
    tr = T.Trainer(cfg)
    rss.label(tr.optimizer, "step", "optimizer")     # the instance: the LR scheduler wraps it there
    rss.phase.append("other")
    tr.train()
    rss.report("peak RSS by sub-phase:", "GiB", 12)


if __name__ == "__main__":
    main()
