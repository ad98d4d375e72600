"""Worker for tests/test_ddp.py::test_async_actors_with_two_learner_processes: `steps` optimizer
steps with async_generation (one Ray rollout actor, max_staleness=1) and the deterministic test
grader, as one process or under ``accelerate launch --num_processes 2`` (rank 0 owns the actor and
hands each process its slice). Writes the final trainable weights to OUT/weights.pt (rank 0).
"""
import sys

import torch

import fakes
from agro.config import TrainConfig, load_config
from agro.trainer import Trainer


def main(model_dir: str, out: str) -> None:
    import ray

    ray.cloudpickle.register_pickle_by_value(fakes)   # the actor cannot import tests/
    cfg = load_config(TrainConfig, None, [
        f"model={model_dir}", "group_size=3", "prompts_per_step=4", "micro_batch_groups=1",
        "steps=3", "lr=1e-3", "warmup_steps=0", "max_grad_norm=0", "precision=fp32",
        "eval_prompts=0", "tensorboard=false", "progress=false", "plot=false", "num_threads=1",
        "save_every=0", "max_new_tokens=6", "async_generation=true", "max_staleness=1",
        "async_timeout=120", f"output_dir={out}/run"])
    tr = Trainer(cfg, grader=fakes.HashGrader())
    tr.train()
    if tr.dist.is_main:
        torch.save({n: p.detach().clone() for n, p in tr.policy.named_parameters()},
                   f"{out}/weights.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
