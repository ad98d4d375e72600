"""This session's sampling and log-prob kernels against the ones they replaced, side by side.

    .venv/bin/python bench/sampler_logprob_ab.py --precision bf16 --reps 5 --json docs/bench/ab-dec02-bf16.json

Builds the default job's trainer (SmolLM2-135M, 8 prompts x 4, <= 32 new tokens), draws one batch
of prompts and then, in ``--reps`` interleaved rounds, times on the same work:

* sampling (``CachedGenerator``, static cache): the previous draw (one float64 cumulative sum over
  the vocabulary per step, kept below as ``old_sample_from_logprobs``) with finished rows dropped
  at every finish, against the two-level inverse CDF with rows dropped once a quarter are done.
  Both from the same seed; tokens per second printed next to the seconds;
* the chosen-token log-prob kernel alone, forward + backward, on the learner's logits shape
  ([tokens, vocabulary] in the precision's dtype): the previous kernel (logsumexp forward,
  exp(logits - lse) backward, 64 MB chunks; ``OldChosenLogProb`` below) against
  ``agro.logprobs.chosen_logprobs``;
* the learner step (forward, backward, optimizer) with each of the two kernels.

Medians over the rounds; the CPU and its flags are printed. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import time

import torch
from abrounds import medians, order, write_json  # bench/abrounds.py (bench/ is on sys.path)

import agro.generation as gen_mod
import agro.logprobs as lp
from agro.config import TrainConfig, load_config
from agro.perf import machine_key as cpu_description
from agro.trainer import Trainer


def old_sample_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """The draw this session replaced: exp in float64 and one cumulative sum over V."""
    p = logp.double().exp()
    cdf = p.cumsum(-1)
    u = torch.rand(p.shape[0], 1, dtype=torch.float64, device=p.device) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    tok.clamp_(max=p.shape[-1] - 1)
    bad = p.gather(-1, tok[:, None]).squeeze(-1) <= 0
    if bool(bad.any()):
        tok[bad] = torch.multinomial(p[bad].float(), 1).squeeze(-1)
    return tok


class OldChosenLogProb(torch.autograd.Function):
    """The kernel this session replaced (64 MB chunks, logsumexp / exp(x - lse))."""

    @staticmethod
    def forward(ctx, logits, ids, chunk):
        N = logits.shape[0]
        out = torch.empty(N, dtype=torch.float32)
        lse = torch.empty(N, dtype=torch.float32)
        for s in range(0, N, chunk):
            x = logits[s:s + chunk].float()
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            out[s:s + chunk] = x.gather(-1, ids[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, ids, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        logits, ids, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        g = g.float()
        for s in range(0, logits.shape[0], ctx.chunk):
            gs = g[s:s + ctx.chunk, None]
            gl = torch.exp(logits[s:s + ctx.chunk].float() - lse[s:s + ctx.chunk, None]).mul_(-gs)
            gl.scatter_add_(-1, ids[s:s + ctx.chunk, None], gs)
            grad[s:s + ctx.chunk] = gl.to(grad.dtype)
        return grad, None, None


def old_chosen_logprobs(logits, ids):
    V = logits.shape[-1]
    out = OldChosenLogProb.apply(logits.reshape(-1, V), ids.reshape(-1).long(),
                                 max(1, (1 << 24) // V))
    return out.view(ids.shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compaction-only", action="store_true",
                    help="time sampling only, both arms with the new draw: rows dropped at every "
                         "finish (compact_at=1) against once a quarter are done (the default)")
    a = ap.parse_args()
    cfg = load_config(TrainConfig, None, [
        f"precision={a.precision}", "eval_prompts=0", "output_dir=runs/bench-ab", "overwrite=true",
        "progress=false", "plot=false", "tensorboard=false", "save_every=0", "save_final=false"])
    tr = Trainer(cfg)
    col = tr.collector
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; precision {a.precision}")
    examples, prompt_ids = col.prompts(cfg.prompts_per_step)
    groups = col.collect(examples, prompt_ids, tr.version)
    new_draw, new_kernel = gen_mod.sample_from_logprobs, lp.chosen_logprobs

    def sample(old: bool) -> tuple[float, int]:
        gen_mod.sample_from_logprobs = old_sample_from_logprobs if old and not a.compaction_only \
            else new_draw
        tr.generator.compact_at = 1.0 if old else type(tr.generator).compact_at
        try:
            torch.manual_seed(1234)
            t0 = time.perf_counter()
            gens = tr.generator.generate(prompt_ids, cfg.group_size, col.params)
            return time.perf_counter() - t0, sum(len(c) for g in gens for c in g.completion_ids)
        finally:
            gen_mod.sample_from_logprobs = new_draw
            tr.generator.compact_at = type(tr.generator).compact_at

    N = sum(len(c) for g in groups for c in g.completion_ids)
    V = int(tr.policy.config.vocab_size)
    dt = torch.bfloat16 if a.precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 3).to(dt).requires_grad_()
    ids = torch.randint(0, V, (N,), generator=g)
    w = torch.randn(N, generator=g)

    def kernel(old: bool) -> float:
        f = old_chosen_logprobs if old else new_kernel
        t0 = time.perf_counter()
        f(logits, ids).backward(w)
        logits.grad = None
        return time.perf_counter() - t0

    def learn(old: bool) -> float:
        lp.chosen_logprobs = old_chosen_logprobs if old else new_kernel
        try:
            t0 = time.perf_counter()
            tr.learn(groups)
            return time.perf_counter() - t0
        finally:
            lp.chosen_logprobs = new_kernel

    rows: dict[str, list] = {k: [] for k in ("sample_old", "sample_new", "tokens_old", "tokens_new",
                                             "kernel_old", "kernel_new", "learn_old", "learn_new")}
    if a.compaction_only:
        for k in ("kernel_old", "kernel_new", "learn_old", "learn_new"):
            del rows[k]
        kernel = learn = lambda old: None  # noqa: E731
    for old in (True, False):      # warm-ups
        sample(old), kernel(old), learn(old)
    for r in range(a.reps):
        for old in order(r, True, False):
            s, n = sample(old)
            rows["sample_old" if old else "sample_new"].append(s)
            rows["tokens_old" if old else "tokens_new"].append(n)
        for old in order(r, True, False) if not a.compaction_only else ():
            rows["kernel_old" if old else "kernel_new"].append(kernel(old))
        for old in order(r, True, False) if not a.compaction_only else ():
            rows["learn_old" if old else "learn_new"].append(learn(old))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    med = medians(rows)
    to, tn = med["tokens_old"] / med["sample_old"], med["tokens_new"] / med["sample_new"]
    print(f"\nmedians over {a.reps} rounds ({a.precision}, {N} completion tokens):")
    what = "drop at every finish / at a quarter" if a.compaction_only else "old / new"
    print(f"  sampling 8 x 4 ({what}): old {med['sample_old']:.2f} s ({to:.0f} tok/s), new "
          f"{med['sample_new']:.2f} s ({tn:.0f} tok/s): {tn / to:.2f}x per token")
    if not a.compaction_only:
        print(f"  log-prob kernel fwd+bwd [{N}, {V}]: old {med['kernel_old']:.3f} s, new "
              f"{med['kernel_new']:.3f} s: {med['kernel_old'] / med['kernel_new']:.2f}x")
        print(f"  learner step: old kernel {med['learn_old']:.2f} s, new {med['learn_new']:.2f} s: "
              f"{med['learn_old'] / med['learn_new']:.2f}x")
    write_json(a.json, cpu_description(), a.precision, torch.__version__, rows, med)
    tr.close_generator()


if __name__ == "__main__":
    main()
