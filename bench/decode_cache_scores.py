"""Same tokens, three scorers: how far the static decoder's log-probs are from the learner's, with
the decode cache before and after 2026-12-04, teacher-forced on one set of sampled completions.

    .venv/bin/python bench/decode_cache_scores.py --prompts 16 --n 4 --json docs/bench/decode/scores-bf16.json

Builds the default job's trainer in bf16, samples ``n`` completions (temperature 1, no
truncation) for held-out prompts with its generator, then scores every token of those same
completions (from the second on: the first comes from the shared prefill) with

* the static decoder, fed the sampled tokens one step at a time, in each arm: ``before`` (an fp32
  cache over all columns: ``BF16_CACHE`` off, no slice) and ``now`` (the code as it is);
* the learner's scoring pass at bf16 (the collector's pass, the numbers the loss uses);
* the fp32 master weights' scoring pass at fp32 (pi itself, up to float rounding).

Prints per token and per completion mean |diff| for each decoder arm against the two passes.
bench/sampler_mismatch.py measures what a run's check measures (each arm samples its own tokens);
this one removes the sampling noise between arms. The CPU is printed. Run it alone."""
from __future__ import annotations

import argparse
import json

import torch
from abrounds import bench_trainer, decoder_before_dec04  # bench/abrounds.py

import agro.fast_decode as fd
from agro.collect import attach_ref_logprobs
from agro.generation import SamplingParams, left_pad
from agro.logprobs import Reference, position_ids_from_mask
from agro.perf import machine_key
from agro.rollouts import Group


@torch.no_grad()
def teacher_forced(model, rows: list[tuple[list[int], list[int]]], pad: int) -> list[list[float]]:
    """Static-decoder log-probs of each (prompt, completion)'s tokens 2..T, fed one per step."""
    ids, am = left_pad([p for p, _ in rows], pad)
    cache = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                  use_cache=True).past_key_values
    T = max(len(c) for _, c in rows)
    dec = fd.StaticDecoder.from_prefill(model, cache, am, T)
    pos = am.sum(-1)
    out: list[list[float]] = [[] for _ in rows]
    for t in range(T - 1):
        tok = torch.tensor([c[t] if t < len(c) else pad for _, c in rows])
        lp = dec.step(tok, pos + t).float().log_softmax(-1)
        for r, (_, c) in enumerate(rows):
            if t + 1 < len(c):
                out[r].append(float(lp[r, c[t + 1]]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    tr = bench_trainer("decode-scores", "precision=bf16")
    cfg = tr.cfg
    prompts = [p for p in (tr.collector.encode(ex) for ex in tr.task.eval_examples(a.prompts))
               if len(p) <= cfg.max_prompt_tokens]
    torch.manual_seed(0)
    gens = tr.generator.generate(prompts, a.n, SamplingParams(cfg.max_new_tokens))
    groups = [Group(prompt_id=str(i), prompt_ids=g.prompt_ids, completion_ids=g.completion_ids,
                    rewards=[0.0] * a.n, behavior_logprobs=g.logprobs) for i, g in enumerate(gens)]
    pad = tr.tok.pad_token_id if tr.tok.pad_token_id is not None else tr.tok.eos_token_id
    rows = [(g.prompt_ids, c) for g in groups for c in g.completion_ids]
    keep = [i for i, (_, c) in enumerate(rows) if len(c) >= 2]
    passes = {}
    for name, model, prec in (("learner bf16", tr.learner, "bf16"), ("fp32 masters", tr.policy, "fp32")):
        attach_ref_logprobs(groups, Reference(model, prec), pad, 4)
        passes[name] = [lp for g in groups for lp in g.ref_logprobs]
    arms = {}
    for arm in ("before", "now"):
        with decoder_before_dec04(arm == "before"):
            arms[arm] = teacher_forced(tr.learner, rows, pad)
    n_tok = sum(len(rows[i][1]) - 1 for i in keep)
    print(f"{len(keep)} completions, {n_tok} scored tokens (the second on), bf16 weights")
    res = {"cpu": machine_key(), "torch": torch.__version__, "completions": len(keep),
           "tokens": n_tok, "pairs": {}}
    for arm, lps in arms.items():
        for name, ref in passes.items():
            d = [torch.tensor(lps[i]) - torch.tensor(ref[i][1:]) for i in keep]
            tok = torch.cat(d).abs()
            seq = torch.stack([x.sum() for x in d]).abs()
            r = {"token_mean_abs": float(tok.mean()), "token_max_abs": float(tok.max()),
                 "completion_mean_abs": float(seq.mean()), "completion_max_abs": float(seq.max())}
            res["pairs"][f"{arm} vs {name}"] = r
            print(f"decoder {arm:6s} vs {name:12s}: per token mean |diff| {r['token_mean_abs']:.4f} "
                  f"(max {r['token_max_abs']:.3f}); per completion mean {r['completion_mean_abs']:.4f} "
                  f"(max {r['completion_max_abs']:.3f}) nats")
    d = [torch.tensor(passes["learner bf16"][i][1:]) - torch.tensor(passes["fp32 masters"][i][1:])
         for i in keep]
    print(f"learner bf16 vs fp32 masters: per token mean |diff| {float(torch.cat(d).abs().mean()):.4f}; "
          f"per completion {float(torch.stack([x.sum() for x in d]).abs().mean()):.4f} nats")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
