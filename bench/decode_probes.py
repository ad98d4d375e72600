"""Kernel options for the sampler's decode step and the learner, each timed against what agro
runs now, side by side in one process (issue 11: what is left between a step and its floor).

    .venv/bin/python bench/decode_probes.py --json docs/bench/decode_probes_<cpu>.json [--compile]

On a SmolLM2-135M-shaped Llama (30 layers, hidden 576, MLP 1536, 9 query / 3 key-value heads,
vocabulary 49152; random weights: a kernel's speed does not depend on the values), in fp32 and bf16:

* ``gemms``: the 211 weight matmuls of one decode step (7 per layer and the LM head, every weight
  distinct, so they stream from memory as in the real step) at M = 32 and 8 rows, with
  ``F.linear`` (agro before 2026-12-05) against weights packed for a GEMM library: oneDNN
  (``torch.ops.mkldnn._linear_pointwise`` on ``_reorder_linear_weight``), on the same matrices
  and with q/k/v and gate/up stacked (121 matmuls: what ``agro.fast_decode.PackedWeights``
  runs since 2026-12-05), and in fp32 MKL (``torch.ops.mkl._mkl_linear``: what inductor's
  freezing pass uses for fp32; the only fp32 arm before 2026-12-05), each with the time to pack
  all of them once (a new weight version after each optimizer step needs it again), the error
  against fp64 and whether the outputs are bit-identical to ``F.linear``'s;
* ``step`` / ``step_modules``: one :class:`agro.fast_decode.StaticDecoder` step at 32 rows and
  ~100 cache columns, on packed weights / on the modules' (before 2026-12-05)
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
from abrounds import code_version, timed  # bench/abrounds.py (bench/ is on sys.path)

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
    """The decode step's weight matmuls at M = 32 and 8 rows, four ways: ``F.linear`` on the 7
    matrices of each layer and the LM head (agro before 2026-12-05); oneDNN on the same
    matrices reordered once (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``);
    oneDNN on q/k/v and gate/up stacked (what :class:`agro.fast_decode.PackedWeights` runs); in
    fp32 also MKL-packed (``torch.ops.mkl._mkl_linear``, what inductor's freezing uses for fp32).
    Each with its packing time, and the outputs' largest error against fp64 products of the same
    inputs, relative to the largest |output| (every arm's, so the arms can be compared)."""
    split = [(H, H), (H // HEADS * KV, H), (H // HEADS * KV, H), (H, H), (I, H), (I, H), (H, I)]
    stacked = [(H + 2 * (H // HEADS * KV), H), (H, H), (2 * I, H), (H, I)]
    torch.manual_seed(0)
    ws = {"split": [torch.randn(s).to(dtype) for s in split * LAYERS + [(VOCAB, H)]]}
    # the stacked matrices hold the same values as the split ones (rows concatenated)
    st = []
    for i in range(LAYERS):
        q, k, v, o, g, u, d = ws["split"][7 * i:7 * i + 7]
        st += [torch.cat([q, k, v]), o, torch.cat([g, u]), d]
    ws["stacked"] = st + [ws["split"][-1]]
    out = {"weights_MB": sum(w.numel() * w.element_size() for w in ws["split"]) / 1e6}
    for M in (32, 8):
        xs = {k: torch.randn(M, k).to(dtype) for k in (H, I)}
        arms = {}

        def onednn(kind):
            return (lambda: [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in ws[kind]],
                    lambda ps: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                                for w, p in zip(ws[kind], ps)])
        arms["onednn_packed"] = (*onednn("split"), "split")
        arms["onednn_packed_stacked"] = (*onednn("stacked"), "stacked")
        if dtype == torch.float32:
            arms["mkl_packed"] = (
                lambda: [torch.ops.mkl._mkl_reorder_linear_weight(w, M) for w in ws["split"]],
                lambda ps: [torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, None, M)
                            for w, p in zip(ws["split"], ps)], "split")
        plain = lambda: [F.linear(xs[w.shape[1]], w) for w in ws["split"]]  # noqa: E731
        exact = {kind: [F.linear(xs[w.shape[1]].double(), w.double()) for w in ws[kind]]
                 for kind in ws}

        def err(ys, kind):
            return max(float((y.double() - e).abs().max() / e.abs().max()) for y, e in zip(ys, exact[kind]))

        r = {"F.linear_ms": timed(plain, reps) * 1e3, "F.linear_err": err(plain(), "split")}
        for name, (pack, run, kind) in arms.items():
            t0 = time.perf_counter()
            ps = pack()
            r[f"{name}_pack_ms"] = (time.perf_counter() - t0) * 1e3
            r[f"{name}_ms"] = timed(lambda: run(ps), reps) * 1e3
            r[f"{name}_err"] = err(run(ps), kind)
            if kind == "split":
                r[f"{name}_bit_identical"] = all(torch.equal(a, b) for a, b in zip(plain(), run(ps)))
        out[f"M{M}"] = r
    return out


def step_split(dtype: torch.dtype, packed: bool = True) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from agro.fast_decode import StaticDecoder

    m = model(dtype).eval()
    B, P, T, steps = 32, 70, 32, 20
    ids = torch.randint(0, VOCAB, (B, P))
    am = torch.ones(B, P, dtype=torch.long)
    with torch.no_grad():
        cache = m(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
    sd = StaticDecoder.from_prefill(m, cache, am, T, "auto" if packed else None)
    assert (sd.packed is not None) == packed
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
    mm = sum(e.self_cpu_time_total for e in ev
             if e.key in ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"))
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
    res = {"cpu": machine_key(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "commit": code_version()}
    print(f"CPU: {res['cpu']}; torch {res['torch']}; threads {res['threads']}")
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        r = {"gemms": gemms(dt, a.reps), "step": step_split(dt), "step_modules": step_split(dt, False)}
        if a.compile:
            r["compile_learner"] = compile_learner(dt, max(2, a.reps // 3))
        res[name] = r
        g, s = r["gemms"], r["step"]
        for M in (32, 8):
            x = g[f"M{M}"]
            arms = [k[:-3] for k in x if k.endswith("_ms") and not k.endswith("pack_ms")
                    and k != "F.linear_ms"]
            print(f"{name} decode GEMMs at M={M} ({g['weights_MB']:.0f} MB of weights): F.linear "
                  f"{x['F.linear_ms']:.1f} ms (error {x['F.linear_err']:.1e})")
            for k in arms:
                same = x.get(f"{k}_bit_identical")
                print(f"    {k:22s} {x[f'{k}_ms']:6.1f} ms ({x['F.linear_ms'] / x[f'{k}_ms']:.2f}x; "
                      f"packing {x[f'{k}_pack_ms']:.0f} ms; error {x[f'{k}_err']:.1e}"
                      + ("" if same is None else f"; bit-identical to F.linear: {same}") + ")")
        for what, s in (("packed weights", r["step"]), ("the modules' weights", r["step_modules"])):
            print(f"{name} static-cache decode step on {what}, {s['rows']} rows x "
                  f"{s['cache_columns']} columns: {s['step_ms']:.1f} ms (profiled "
                  f"{s['profiled_step_ms']:.1f}: weight matmuls {s['weight_matmuls_ms']:.1f}, "
                  f"attention matmuls {s['attention_matmuls_ms']:.1f}, rest {s['rest_ms']:.1f})")
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
