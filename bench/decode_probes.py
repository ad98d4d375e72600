"""Kernel options for the sampler's decode step and the learner, each timed against what agro
runs now, side by side in one process (issue 11: what is left between a step and its floor).

    .venv/bin/python bench/decode_probes.py --json docs/bench/decode_probes_<cpu>.json [--compile]

On a SmolLM2-135M-shaped Llama (30 layers, hidden 576, MLP 1536, 9 query / 3 key-value heads,
vocabulary 49152; random weights: a kernel's speed does not depend on the values), in fp32 and bf16:

* ``gemms``: the 211 weight matmuls of one decode step (7 per layer and the LM head, every weight
  distinct, so they stream from memory as in the real step) at M = 32 and 8 rows, with
  ``F.linear`` (what agro runs) against weights prepacked for the CPU's GEMM library
  (``torch.ops.mkldnn._linear_pointwise`` on oneDNN-reordered bf16 weights;
  ``torch.ops.mkl._mkl_linear`` on MKL-packed fp32 weights: what inductor's freezing pass
  uses), with the time to pack all of them once (a new weight version after each optimizer step
  needs it again) and whether the outputs are bit-identical;
* ``step``: one :class:`agro.fast_decode.StaticDecoder` step at 32 rows and ~100 cache columns
  (the decoder as it is: a bf16 cache for bf16 weights since 2026-12-04; the recorded JSONs of
  2026-12-02 timed the fp32 cache),
  split by the torch profiler into weight matmuls, the attention's matmuls over the cache and the
  rest;
* ``--compile``: ``torch.compile(dynamic=True)`` on every decoder layer of the learner's
  forward + backward (8 sequences x 170 positions, SDPA math kernel), against eager, with the
  compile time (about a minute; off by default).

Run it alone on the machine: a second torch process on the same cores slows both 10-20x.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from abrounds import timed  # bench/abrounds.py (bench/ is on sys.path)

from agro.perf import machine_key

H, I, LAYERS, HEADS, KV, VOCAB = 576, 1536, 30, 9, 3, 49152


def model(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
                      max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype)


def gemms(dtype: torch.dtype, reps: int) -> dict:
    shapes = [(H, H), (H // HEADS * KV, H), (H // HEADS * KV, H), (H, H), (I, H), (I, H), (H, I)]
    shapes = shapes * LAYERS + [(VOCAB, H)]
    torch.manual_seed(0)
    ws = [torch.randn(s).to(dtype) for s in shapes]
    out = {"weights_MB": sum(w.numel() * w.element_size() for w in ws) / 1e6}
    for M in (32, 8):
        xs = {k: torch.randn(M, k).to(dtype) for k in (H, I)}
        ins = [xs[w.shape[1]] for w in ws]
        if dtype == torch.bfloat16:
            pack = lambda: [torch.ops.mkldnn._reorder_linear_weight(w, M) for w in ws]  # noqa: E731
            run = lambda ps: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")  # noqa: E731
                              for x, p in zip(ins, ps)]
        else:
            pack = lambda: [torch.ops.mkl._mkl_reorder_linear_weight(w, M) for w in ws]  # noqa: E731
            run = lambda ps: [torch.ops.mkl._mkl_linear(x, p, w, None, M)  # noqa: E731
                              for x, p, w in zip(ins, ps, ws)]
        t0 = time.perf_counter()
        ps = pack()
        t_pack = time.perf_counter() - t0
        plain = lambda: [F.linear(x, w) for x, w in zip(ins, ws)]  # noqa: E731
        same = all(torch.equal(a, b) for a, b in zip(plain(), run(ps)))
        t_plain, t_packed = timed(plain, reps), timed(lambda: run(ps), reps)
        out[f"M{M}"] = {"F.linear_ms": t_plain * 1e3, "prepacked_ms": t_packed * 1e3,
                        "speedup": t_plain / t_packed, "pack_all_ms": t_pack * 1e3,
                        "bit_identical": same}
    return out


def step_split(dtype: torch.dtype) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from agro.fast_decode import StaticDecoder

    m = model(dtype).eval()
    B, P, T, steps = 32, 70, 32, 20
    ids = torch.randint(0, VOCAB, (B, P))
    am = torch.ones(B, P, dtype=torch.long)
    with torch.no_grad():
        cache = m(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
    sd = StaticDecoder.from_prefill(m, cache, am, T)
    tok, pos = torch.randint(0, VOCAB, (B,)), torch.full((B,), P)
    sd.step(tok, pos), sd.step(tok, pos + 1)
    t = time.perf_counter()
    for s in range(2, 2 + steps // 2):
        sd.step(tok, pos + s)
    plain_ms = (time.perf_counter() - t) / (steps // 2) * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for s in range(2 + steps // 2, 2 + steps):
            sd.step(tok, pos + s)
    ev = prof.key_averages()
    tot = sum(e.self_cpu_time_total for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm"))
    bmm = sum(e.self_cpu_time_total for e in ev if e.key == "aten::bmm")
    n = steps - steps // 2
    return {"rows": B, "cache_columns": P + T, "step_ms": plain_ms,
            "profiled_step_ms": tot / n / 1e3, "weight_matmuls_ms": mm / n / 1e3,
            "attention_matmuls_ms": bmm / n / 1e3, "rest_ms": (tot - mm - bmm) / n / 1e3}


def compile_learner(dtype: torch.dtype, reps: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    m = model(dtype)
    G = 8

    def step(L: int) -> None:
        x = torch.randn(G, L, H, dtype=dtype)
        mask = torch.zeros(G, 1, L, L, dtype=dtype)
        mask.masked_fill_(~torch.ones(L, L, dtype=torch.bool).tril(), torch.finfo(dtype).min)
        pos = torch.arange(L)[None].expand(G, L)
        with sdpa_kernel(SDPBackend.MATH):
            h = m.model(inputs_embeds=x, attention_mask=mask, position_ids=pos,
                        use_cache=False).last_hidden_state
            loss = m.lm_head(h).float().logsumexp(-1).mean()
        loss.backward()
        m.zero_grad(set_to_none=True)

    eager = {L: timed(lambda: step(L), reps) for L in (170, 150)}
    t0 = time.perf_counter()
    for layer in m.model.layers:
        layer.compile(dynamic=True)
    step(170)
    t_compile = time.perf_counter() - t0
    comp = {L: timed(lambda: step(L), reps) for L in (170, 150)}
    return {"compile_s": t_compile, **{f"L{L}": {"eager_s": eager[L], "compiled_s": comp[L],
                                                 "speedup": eager[L] / comp[L]} for L in eager}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile on the learner")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    res = {"cpu": machine_key(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"CPU: {res['cpu']}; torch {res['torch']}; threads {res['threads']}")
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        r = {"gemms": gemms(dt, a.reps), "step": step_split(dt)}
        if a.compile:
            r["compile_learner"] = compile_learner(dt, max(2, a.reps // 3))
        res[name] = r
        g, s = r["gemms"], r["step"]
        for M in (32, 8):
            x = g[f"M{M}"]
            print(f"{name} decode GEMMs at M={M} ({g['weights_MB']:.0f} MB of weights): F.linear "
                  f"{x['F.linear_ms']:.1f} ms, prepacked {x['prepacked_ms']:.1f} ms "
                  f"({x['speedup']:.2f}x; packing them all {x['pack_all_ms']:.0f} ms; "
                  f"bit-identical: {x['bit_identical']})")
        print(f"{name} static-cache decode step, {s['rows']} rows x {s['cache_columns']} columns: "
              f"{s['step_ms']:.1f} ms (profiled {s['profiled_step_ms']:.1f}: weight matmuls "
              f"{s['weight_matmuls_ms']:.1f}, attention matmuls {s['attention_matmuls_ms']:.1f}, "
              f"rest {s['rest_ms']:.1f})")
        if a.compile:
            c = r["compile_learner"]
            print(f"{name} learner fwd+bwd, torch.compile on each decoder layer: compile "
                  f"{c['compile_s']:.0f} s; " + ", ".join(
                      f"{k}: eager {v['eager_s']:.2f} s, compiled {v['compiled_s']:.2f} s "
                      f"({v['speedup']:.2f}x)" for k, v in c.items() if k.startswith("L")))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
