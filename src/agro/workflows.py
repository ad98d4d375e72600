"""`agro generate` and `agro eval`: the same parts the trainer uses (:mod:`agro.builders`),
composed for writing an offline dataset and for held-out evaluation."""
from __future__ import annotations

from pathlib import Path

import yaml

from .builders import (build_collector, build_generator, build_grader, choose_linear_backend,
                       default_device, follow_train_precision, setup_runtime)
from .config import EvalConfig, GenerateConfig
from .datafiles import write_groups
from .evaluation import eval_random_stream, evaluate
from .logprobs import Reference
from .models import load_model, load_tokenizer
from .provenance import META_KEY, reference_identity
from .tasks import build_task


def generate_offline(cfg: GenerateConfig, grader=None) -> tuple[Path, int]:
    """Sample `num_prompts` scored groups (rewards + reference log-probs) and write them."""
    device = default_device()
    requested = cfg.precision
    cfg = setup_runtime(cfg, device=device)
    task = build_task(cfg)
    # Nothing trains here: the model that samples is pi_ref itself, so the reference is that very
    # model (frozen), not a copy; in bf16 one bf16 model then serves both (its identity digest is
    # taken from the weights as loaded, before the cast).
    tok = load_tokenizer(cfg.model)
    policy = load_model(cfg.model, device=device)
    policy.eval()
    policy.requires_grad_(False)
    reference = Reference(policy, cfg.precision)
    # first: train's cached precision choice is looked up with the library installed
    cfg, note = choose_linear_backend(cfg, policy, bf16=requested == "bf16")
    print(f"agro generate: {note}", flush=True)
    cfg, note = follow_train_precision(cfg, requested, policy, reference)
    if note:
        print(f"agro generate: {note}", flush=True)
    if cfg.ref_model:
        reference = Reference.load(cfg.ref_model, precision=cfg.precision, device=device)
        print("agro generate: reference model's "
              + choose_linear_backend(cfg, reference.model, bf16=requested == "bf16", follow=True)[1],
              flush=True)
    if cfg.precision == "bf16":      # stored as the training run stores it (agro.trainer)
        reference.store_bf16()       # (without ref_model: the sampler's weights too)
    own = grader is None
    grader = build_grader(cfg, grader)
    try:
        collector = build_collector(cfg, tokenizer=tok, generator=build_generator(cfg, policy, tok),
                                    grader=grader, reference=reference,
                                    sampler=task.train_sampler(cfg.seed))
        groups = []
        chunk = max(1, cfg.generation_batch_size // cfg.group_size)
        while len(groups) < cfg.num_prompts:
            got = collector(min(chunk, cfg.num_prompts - len(groups)), version=0)
            if not got:
                break
            for g in got:
                g.source = "offline"
                g.policy_version = -1
                g.meta["generated_by"] = cfg.model
            groups += got
            print(f"agro generate: {len(groups)}/{cfg.num_prompts} groups", flush=True)
    finally:
        if own:
            grader.close()
    out = Path(cfg.output)
    identity = reference_identity(cfg.ref_model or cfg.model, reference, tok, cfg.precision)
    write_groups(out, groups, meta={"model": cfg.model, "tokenizer": cfg.model,
                                    "vocab_size": len(tok), "task": cfg.task,
                                    "temperature": cfg.temperature, "top_p": cfg.top_p,
                                    META_KEY: identity})
    return out, len(groups)


def eval_defaults_from_run(spec: str) -> list[str]:
    """`agro eval RUN_DIR`: evaluate RUN_DIR/final with the run's task settings."""
    p = Path(spec)
    if p.is_dir() and (p / "config.yaml").is_file() and (p / "final").is_dir():
        saved = yaml.safe_load((p / "config.yaml").read_text()) or {}
        keep = ("task", "data_path", "eval_data_path", "arithmetic_level", "arithmetic_range",
                "prompt_template",
                "max_new_tokens", "precision", "seed", "eval_batch_size",
                "generation_batch_size")   # eval_batch_size=0's floor
        return [f"{k}={saved[k]}" for k in keep if k in saved and saved[k] != ""] + \
            [f"model={p / 'final'}"]
    return [f"model={spec}"]


def run_eval(cfg: EvalConfig) -> dict:
    from rich.progress import Progress

    device = default_device()
    requested = cfg.precision
    cfg = setup_runtime(cfg, device=device)
    task = build_task(cfg)
    policy, tok = load_model(cfg.model, device=device), load_tokenizer(cfg.model)
    cfg, note = choose_linear_backend(cfg, policy, bf16=requested == "bf16")
    print(f"agro eval: {note}", flush=True)
    cfg, note = follow_train_precision(cfg, requested, policy, None)
    if note:
        print(f"agro eval: {note}", flush=True)
    generator = build_generator(cfg, policy, tok)
    examples = task.eval_examples(cfg.num_prompts)
    # the stream agro train's evaluations draw from (agro.evaluation.eval_seed): this model's
    # `agro eval` samples what a run's evaluation of it at the same seed and settings samples
    with eval_random_stream(device, cfg.seed), build_grader(cfg) as grader, \
            Progress(transient=True) as prog:
        bar = prog.add_task("evaluating", total=len(examples) * ((cfg.samples > 0) + cfg.greedy))
        return evaluate(tokenizer=tok, generator=generator, grader=grader,
                        examples=examples, template=cfg.prompt_template, samples=cfg.samples,
                        greedy=cfg.greedy, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature,
                        batch_size=cfg.eval_batch_size,
                        on_progress=lambda d, t: prog.update(bar, completed=d))
