"""One TRL GRPOTrainer run at the benchmark's settings; prints one JSON line of step times.

Run by ``bench/vs_trl.py`` (not by hand): it needs ``trl`` (installed by ``make bench``, in
``.venv-bench`` only, never in agro's own environment). The reward is agro's public
``agro.grading.math_reward`` so both arms grade identically; the prompts are agro's arithmetic
training prompts, given to TRL in conversational form so it applies the same chat template.
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--prompts", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--micro-batch", type=int, required=True, help="sequences per micro-batch")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--beta", type=float, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="TRL's own bf16 flag (mixed precision)")
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from agro.grading import math_reward
    from agro.tasks import ArithmeticTask

    if a.threads:
        torch.set_num_threads(a.threads)
    task = ArithmeticTask(level=1)
    examples = task.train_sampler(a.seed).sample(a.steps * a.prompts)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": ex.question}],
                             "answer": ex.answer} for ex in examples])

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [0.0 if r is None else float(r) for r in math_reward(texts, list(answer))]

    seqs = a.prompts * a.group_size
    cfg = GRPOConfig(
        output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=seqs // a.micro_batch, num_generations=a.group_size,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        beta=a.beta, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        bf16=a.bf16, fp16=False, use_cpu=True, seed=a.seed, logging_steps=1, save_strategy="no",
        report_to="none", dataloader_num_workers=0, log_completions=False, shuffle_dataset=False,
        model_init_kwargs={"dtype": torch.float32},
    )
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.time())

    t0 = time.time()
    trainer = GRPOTrainer(model=a.model, reward_funcs=reward, args=cfg, train_dataset=ds,
                          callbacks=[Clock()])
    setup = time.time() - t0
    start = time.time()
    trainer.train()
    steps = [s - p for p, s in zip([start] + stamps[:-1], stamps)]
    hist = [h for h in trainer.state.log_history if "reward" in h]
    print("BENCH_RESULT " + json.dumps({
        "arm": "trl", "setup_seconds": setup, "step_seconds": steps,
        "reward": [h.get("reward") for h in hist],
        "completion_len": [h.get("completions/mean_length") for h in hist],
    }), flush=True)


if __name__ == "__main__":
    main()
