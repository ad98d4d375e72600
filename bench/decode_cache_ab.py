"""The static decoder's cache before and after 2026-12-04, side by side: agro.fast_decode's
StaticDecoder on SmolLM2-135M (the embedded default, in the precision given), 8 GSM8K-style
prompts x 4 rows prefilled, then ``--steps`` decode steps over the same random tokens in each arm
(no row leaves, so both arms do the same work), in ``--reps`` alternating rounds.

    .venv/bin/python bench/decode_cache_ab.py --precision bf16 --steps 256 --reps 7

``before``: every step's attention over all prompt + steps columns of an fp32 cache, whatever
the weights (``SLICE_COLUMNS`` and ``BF16_CACHE`` set to the old behaviour); ``now``: the code
as it is (a slice of the written columns; a bf16 cache for bf16 weights). Also prints how far the
two arms' next-token distributions are apart at a few steps (in fp32 only the slice differs:
float rounding; in bf16 the scores are rounded to bf16). Run it alone on the machine."""
from __future__ import annotations

import argparse
import time

import torch
from abrounds import decoder_before_dec04, medians, order, write_json  # bench/abrounds.py

import agro.fast_decode as fd
from agro.generation import left_pad
from agro.logprobs import position_ids_from_mask
from agro.models import DEFAULT_MODEL, bf16_copy, load_model, load_tokenizer
from agro.perf import machine_key

QUESTION = ("Natalia sold clips to {} of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print(f"{machine_key()}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"{a.precision}, {a.steps} steps, SLICE_COLUMNS {fd.SLICE_COLUMNS}")
    tok = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL).eval()
    if a.precision == "bf16":
        model = bf16_copy(model)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": QUESTION.format(20 + 7 * i)}],
                                           add_generation_prompt=True, tokenize=False))["input_ids"]
               for i in range(8)]
    ids, am = left_pad(prompts, tok.pad_token_id)
    n = 4
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(100, 40000, (a.steps, ids.shape[0] * n), generator=gen)
    probe = sorted({0, a.steps // 4, a.steps // 2, a.steps - 1})

    def run(arm: str):
        with decoder_before_dec04(arm == "before"), torch.no_grad():
            out = model(input_ids=ids, attention_mask=am,
                        position_ids=position_ids_from_mask(am), use_cache=True)
            cache = out.past_key_values
            cache.batch_repeat_interleave(n)
            m = am.repeat_interleave(n, 0)
            t0 = time.perf_counter()
            dec = fd.StaticDecoder.from_prefill(model, cache, m, a.steps)
            pos = m.sum(-1)
            kept = {}
            for t in range(a.steps):
                logits = dec.step(toks[t], pos + t)
                if t in probe:
                    kept[t] = logits.float().log_softmax(-1)
            return time.perf_counter() - t0, kept

    _, lb = run("before")
    _, ln = run("now")
    print(f"prompt columns {ids.shape[1]}, rows {ids.shape[0] * n}")
    for t in probe:
        kl = (lb[t].exp() * (lb[t] - ln[t])).sum(-1)
        print(f"  step {t}: next-token KL(before || now) mean {float(kl.mean()):.2e}, max "
              f"{float(kl.max()):.2e}; max |log p before - log p now| over the top-50 tokens "
              f"{float((lb[t] - ln[t]).gather(-1, lb[t].topk(50, -1).indices).abs().max()):.2e}")
    rows: dict[str, list] = {"before": [], "now": []}
    for r in range(a.reps):
        for arm in order(r, "before", "now"):
            rows[arm].append(run(arm)[0])
        print(f"round {r + 1}: before {rows['before'][-1]:.2f} s, now {rows['now'][-1]:.2f} s",
              flush=True)
    med = medians(rows)
    wins = sum(x < y for x, y in zip(rows["now"], rows["before"]))
    print(f"\nmedians over {a.reps} rounds: before {med['before']:.2f} s, now {med['now']:.2f} s: "
          f"now/before = {med['now'] / med['before']:.3f}, now faster in {wins} of {a.reps} rounds "
          f"({a.steps} steps, {med['now'] / a.steps * 1e3:.0f} ms per step now)")
    write_json(a.json, machine_key(), a.precision, torch.__version__, rows, med)


if __name__ == "__main__":
    main()
