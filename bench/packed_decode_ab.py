"""The sampler's decode matmuls on packed weights against the modules' own, side by side.

    .venv/bin/python bench/packed_decode_ab.py --precision fp32 --reps 7 --json docs/bench/packed_decode/steps-fp32.json

Builds the default job's trainer (SmolLM2-135M from the embedded GGUF, 8 prompts x 4 samples, at
most 32 new tokens; ``--precision`` fp32 or bf16: the bf16 working weights, as the trainer samples),
draws one step's prompts, and then, in ``--reps`` interleaved rounds, times one sampling call
(``CachedGenerator.generate``: the prompts' prefill, the static-cache decode, the draws) with
``agro.fast_decode.PACKED_WEIGHTS`` on (the decode step's weights reordered once per call for
oneDNN, the packing counted in the call's time) and off (``F.linear`` on the modules' weights,
the code before 2026-12-05). Both arms draw from the same seed: in bf16 the packed matmuls are
bit-identical and the two arms sample the same tokens; in fp32 they differ by float rounding, so
a draw can differ, and tokens per second is printed beside the seconds.

Also prints the packing's own time (``PackedWeights(model)``), how many of the completions the
two arms drew are equal in each round, and the largest difference of one decode step's logits
between the arms. Medians over the rounds; the CPU and its flags are printed.
Run it alone on the machine: a second torch process on the same cores slows both 10-20x.
"""
from __future__ import annotations

import argparse
import time

import torch
from abrounds import bench_trainer, medians, order, write_json  # bench/abrounds.py (bench/ is on sys.path)

import agro.fast_decode as fd
from agro.generation import left_pad
from agro.logprobs import position_ids_from_mask
from agro.perf import machine_key


def step_logits_gap(model, prompt_ids, n: int, pad: int) -> float:
    """Largest |logit difference| over one decode step after the prefill, packed against plain,
    relative to the logits' largest magnitude."""
    ids, am = left_pad(prompt_ids, pad)
    with torch.no_grad():
        out = {}
        for packed in (False, True):
            o = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                      use_cache=True)
            cache = o.past_key_values
            cache.batch_repeat_interleave(n)
            m = am.repeat_interleave(n, 0)
            dec = fd.StaticDecoder.from_prefill(model, cache, m, 2,
                                                "auto" if packed else None)
            tok = o.logits[:, -1].argmax(-1).repeat_interleave(n, 0)
            out[packed] = dec.step(tok, m.sum(-1)).float()
    return float((out[True] - out[False]).abs().max() / out[False].abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None, help="write every timing here")
    a = ap.parse_args()

    tr = bench_trainer("packed-decode", f"precision={a.precision}")
    cfg, col, gen = tr.cfg, tr.collector, tr.generator
    _, prompt_ids = col.prompts(cfg.prompts_per_step)
    if not fd.packing_applies(gen.model):
        raise SystemExit(f"packed weights do not apply to this model/CPU in {a.precision}")

    drawn: dict[bool, list] = {}

    def sample(packed: bool) -> tuple[float, int]:
        fd.PACKED_WEIGHTS = packed
        try:
            torch.manual_seed(1234)
            t0 = time.perf_counter()
            gens = gen.generate(prompt_ids, cfg.group_size, col.params)
            dt = time.perf_counter() - t0
        finally:
            fd.PACKED_WEIGHTS = True
        drawn[packed] = [c for g in gens for c in g.completion_ids]
        return dt, sum(len(c) for c in drawn[packed])

    def pack_seconds() -> float:
        t0 = time.perf_counter()
        fd.PackedWeights(gen.model)
        return time.perf_counter() - t0

    rows: dict[str, list] = {k: [] for k in ("sample_plain", "sample_packed", "tokens_plain",
                                             "tokens_packed", "pack", "same_completions")}
    sample(True), sample(False)   # warm-ups
    for r in range(a.reps):
        for packed in order(r, False, True):
            dt, n = sample(packed)
            arm = "packed" if packed else "plain"
            rows[f"sample_{arm}"].append(dt)
            rows[f"tokens_{arm}"].append(n)
        rows["pack"].append(pack_seconds())
        rows["same_completions"].append(sum(a == b for a, b in zip(drawn[True], drawn[False])))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rows.items()), flush=True)
    med = medians(rows)
    gap = step_logits_gap(gen.model, prompt_ids, cfg.group_size, tr.tok.pad_token_id)
    print(f"\n{machine_key()}; torch {torch.__version__}; {a.precision}; medians of {a.reps} rounds")
    for arm in ("plain", "packed"):
        s, n = med[f"sample_{arm}"], med[f"tokens_{arm}"]
        print(f"  sampling call, {arm:6s}: {s:.3f} s, {n:.0f} tokens, {n / s:.0f} tokens/s")
    print(f"  packing the weights once: {med['pack']:.3f} s (inside the packed arm's time)")
    print(f"  completions equal in both arms, per round: {rows['same_completions']} of "
          f"{len(drawn[True])}")
    print(f"  plain / packed: {med['sample_plain'] / med['sample_packed']:.2f}x per call; "
          f"{(med['tokens_packed'] / med['sample_packed']) / (med['tokens_plain'] / med['sample_plain']):.2f}x "
          f"per token")
    print(f"  one decode step's logits, packed vs plain: max |diff| / max |logit| = {gap:.2e}")
    write_json(a.json, machine_key(), a.precision, torch.__version__, rows, med, logits_gap=gap)


if __name__ == "__main__":
    main()
