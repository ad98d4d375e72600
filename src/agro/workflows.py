"""`agro generate` and `agro eval`: thin compositions of the same parts the trainer uses."""
from __future__ import annotations

from pathlib import Path

import yaml

from .collect import Collector
from .config import EvalConfig, GenerateConfig, resolve_precision
from .datafiles import write_groups
from .evaluation import evaluate
from .generation import SamplingParams, make_generator
from .models import Reference, build_policy_and_reference, load_model, load_tokenizer
from .rewards import Grader
from .tasks import build_task


def _seed(cfg) -> None:
    from .trainer import seed_everything

    cfg.precision = resolve_precision(cfg.precision)
    if cfg.num_threads:
        import torch

        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)


def generate_offline(cfg: GenerateConfig, grader=None) -> tuple[Path, int]:
    """Sample `num_prompts` scored groups (rewards + reference log-probs) and write them."""
    _seed(cfg)
    task = build_task(cfg)
    policy, tok, reference = build_policy_and_reference(cfg.model, precision=cfg.precision)
    if cfg.ref_model:
        reference = Reference.load(cfg.ref_model, precision=cfg.precision)
    params = SamplingParams(cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k)
    generator = make_generator(cfg.generator, policy, tok, precision=cfg.precision,
                               batch_size=cfg.generation_batch_size)
    own = grader is None
    grader = Grader(timeout=cfg.reward_timeout) if own else grader
    try:
        collector = Collector(tokenizer=tok, generator=generator, grader=grader,
                              reference=reference, sampler=task.train_sampler(cfg.seed),
                              template=cfg.prompt_template, params=params,
                              group_size=cfg.group_size, precision=cfg.precision,
                              max_prompt_tokens=cfg.max_prompt_tokens)
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
    write_groups(out, groups, meta={"model": cfg.model, "tokenizer": cfg.model,
                                    "vocab_size": len(tok), "task": cfg.task,
                                    "temperature": cfg.temperature, "top_p": cfg.top_p})
    return out, len(groups)


def eval_defaults_from_run(spec: str) -> list[str]:
    """`agro eval RUN_DIR`: evaluate RUN_DIR/final with the run's task settings."""
    p = Path(spec)
    if p.is_dir() and (p / "config.yaml").is_file() and (p / "final").is_dir():
        saved = yaml.safe_load((p / "config.yaml").read_text()) or {}
        keep = ("task", "data_path", "eval_data_path", "arithmetic_level", "prompt_template",
                "max_new_tokens", "precision", "seed")
        return [f"{k}={saved[k]}" for k in keep if k in saved and saved[k] != ""] + \
            [f"model={p / 'final'}"]
    return [f"model={spec}"]


def run_eval(cfg: EvalConfig) -> dict:
    from rich.progress import Progress

    _seed(cfg)
    task = build_task(cfg)
    policy, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    generator = make_generator(cfg.generator, policy, tok, precision=cfg.precision,
                               batch_size=cfg.generation_batch_size)
    examples = task.eval_examples(cfg.num_prompts)
    with Grader(timeout=cfg.reward_timeout) as grader, Progress(transient=True) as prog:
        bar = prog.add_task("evaluating", total=len(examples) * ((cfg.samples > 0) + cfg.greedy))
        return evaluate(tokenizer=tok, generator=generator, grader=grader,
                        examples=examples, template=cfg.prompt_template, samples=cfg.samples,
                        greedy=cfg.greedy, max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature,
                        on_progress=lambda d, t: prog.update(bar, completed=d))
