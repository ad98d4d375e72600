"""Worker for tests/test_ddp.py::test_uneven_groups_*: one learner step on a given split of groups.

Run as one process (the union of all groups) or under ``accelerate launch --num_processes 2``
(rank r takes the groups listed for it, possibly none). Writes the step's gradients (after the
all-reduce, as the optimizer step sees them: max_grad_norm=0) and metrics to OUT/rank{r}.pt.
"""
import json
import sys

import torch

from agro.config import TrainConfig, load_config
from agro.datafiles import read_groups
from agro.trainer import Trainer


def main(model_dir: str, offline: str, out: str, split: str) -> None:
    cfg = load_config(TrainConfig, None, [
        f"model={model_dir}", "source=offline", f"offline_path={offline}", "group_size=3",
        "prompts_per_step=2", "micro_batch_groups=1", "steps=1", "lr=1e-3", "warmup_steps=0",
        "max_grad_norm=0", "precision=fp32", "eval_prompts=0", "tensorboard=false",
        "progress=false", "plot=false", "num_threads=1", "save_every=0", f"output_dir={out}/run"])
    tr = Trainer(cfg, grader=None)
    groups, _ = read_groups(offline)
    per_rank = json.loads(split)                      # e.g. [[0, 1, 2], []]: group indices per rank
    mine = [groups[i] for i in (per_rank[tr.dist.rank] if tr.dist.world > 1
                                else sorted(i for r in per_rank for i in r))]
    grads = {}
    step = tr.optimizer.step

    def record_then_step(*a, **kw):   # the trainer frees the gradients right after the step
        grads.update({n: p.grad.detach().clone() for n, p in tr.policy.named_parameters()
                      if p.requires_grad and p.grad is not None})
        return step(*a, **kw)

    tr.optimizer.step = record_then_step
    metrics = tr.learn(mine)
    assert grads, "the optimizer step never ran"
    torch.save({"grads": grads, "metrics": metrics, "world": tr.dist.world},
               f"{out}/rank{tr.dist.rank}.pt")
    tr.grader.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
