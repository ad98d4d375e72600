"""agro's CPU attention kernel (agro.cpu_attention) against SDPA, side by side in one process.

    .venv/bin/python bench/cpu_attention_ab.py --layer --reps 20 --json docs/bench/cpu_attention/layer.json
    .venv/bin/python bench/cpu_attention_ab.py --precision bf16 --reps 5 --json docs/bench/cpu_attention/steps-bf16.json
    .venv/bin/python bench/cpu_attention_ab.py --precision bf16 --shift --json docs/bench/cpu_attention/shift-bf16.json

``--layer``: one attention layer, forward and backward, on the packed passes' dense block mask
(8 groups, a prompt and 4 completions each, SmolLM2-135M's 9 query / 3 key-value heads of 64),
at several packed lengths L, in fp32 and bf16: SDPA's flash kernel, its math kernel, and
``masked_attention`` (its own chunking, and each of ``--chunks`` groups per chunk forced);
each arm's relative error (mean |error| / mean |exact|) of the output and
of dQ, dK, dV against an fp64 computation from the same bf16- or fp32-rounded inputs.

``--shift``: one step's reference log-probs (the default job's trainer in ``--precision``)
scored with agro's kernel and with SDPA at the same weights, and each against the same weights
scored in fp32: how far passes stored before the kernel (offline files, replay buffers) are
from today's.

Otherwise: the default job's trainer (``--precision``), one fixed step's groups, and in
``--reps`` interleaved rounds (order alternating) its reference pass and its learner step
(forward, backward, optimizer) with ``agro.logprobs.CPU_ATTENTION`` on (the kernel) and off
(SDPA under ``attention_backend``: flash in bf16, math in fp32, as before 2026-12-05). The
learner's optimizer steps change the weights between rounds, the same for both arms. Medians;
the CPU and its flags are printed. Run it alone: a second torch process on the same cores slows
both 10-20x.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from abrounds import bench_trainer, medians, order, write_json  # bench/ is on sys.path

import agro.cpu_attention as ca
import agro.logprobs as lp
from agro.cpu_attention import masked_attention
from agro.perf import machine_key as cpu_description


def layer_bench(lengths, reps: int, chunks=()) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G, Hq, Hkv, d, n = 8, 9, 3, 64, 4
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for L in lengths:
            g = torch.Generator().manual_seed(L)
            P = L // 4
            C = (L - P) // n
            blk = torch.full((G, L), -2, dtype=torch.long)
            blk[:, :P] = -1
            for i in range(n):
                blk[:, P + C * i:P + C * (i + 1)] = i
            mask = lp.dense_block_mask(blk, dtype)
            exact_mask = torch.zeros(G, 1, L, L, dtype=torch.float64).masked_fill_(
                mask != 0, float("-inf"))
            q0, k0, v0 = (torch.randn(G, h, L, d, generator=g) * s
                          for h, s in ((Hq, 2.0), (Hkv, 2.0), (Hkv, 1.0)))
            go = torch.randn(G, Hq, L, d, generator=g).to(dtype)
            q, k, v = (x.to(dtype).requires_grad_() for x in (q0, k0, v0))
            qe, ke, ve = (x.detach().double().requires_grad_() for x in (q, k, v))
            oe = F.scaled_dot_product_attention(qe, ke, ve, attn_mask=exact_mask, enable_gqa=True)
            oe.backward(go.double())

            def sdpa(backend):
                def f():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                              enable_gqa=True)
                return f

            def agro(chunk=None):
                def f():
                    real = ca.groups_per_chunk
                    if chunk is not None:
                        ca.groups_per_chunk = lambda *a: chunk
                    try:
                        return masked_attention(q, k, v, mask).transpose(1, 2)
                    finally:
                        ca.groups_per_chunk = real
                return f

            arms = {"flash": sdpa(SDPBackend.FLASH_ATTENTION), "math": sdpa(SDPBackend.MATH),
                    f"agro (c={ca.groups_per_chunk(G, Hq, Hkv, L, L)})": agro(),
                    **{f"agro c={c}": agro(c) for c in chunks}}
            for name, f in arms.items():
                for x in (q, k, v):
                    x.grad = None
                o = f()
                o.backward(go)
                errs = [float((a.double() - b).abs().mean() / b.abs().mean())
                        for a, b in ((o.detach(), oe.detach()), (q.grad, qe.grad),
                                     (k.grad, ke.grad), (v.grad, ve.grad))]
                fw, bw = [], []
                for _ in range(2 + reps):
                    t0 = time.perf_counter()
                    o = f()
                    t1 = time.perf_counter()
                    o.backward(go)
                    bw.append(time.perf_counter() - t1)
                    fw.append(t1 - t0)
                fw, bw = sorted(fw[2:]), sorted(bw[2:])
                key = f"{str(dtype).removeprefix('torch.')} L={L} {name}"
                out[key] = {"forward_ms": 1e3 * fw[len(fw) // 2],
                            "backward_ms": 1e3 * bw[len(bw) // 2], "rel_err_o_dq_dk_dv": errs}
                r = out[key]
                print(f"{key:28s} forward {r['forward_ms']:7.2f} ms  backward "
                      f"{r['backward_ms']:7.2f} ms  rel. error o {errs[0]:.1e} dq {errs[1]:.1e} "
                      f"dk {errs[2]:.1e} dv {errs[3]:.1e}", flush=True)
    return out


def shift(tr) -> dict:
    """The reference log-probs of one step's groups scored with agro's kernel and with SDPA
    (what passes stored before 2026-12-05 used) at the same weights, and each against the same
    weights scored in fp32 on agro's kernel: per-token and per-sequence |differences|."""
    import copy
    import statistics as st

    from agro.collect import attach_ref_logprobs

    col = tr.collector
    examples, prompt_ids = col.prompts(tr.cfg.prompts_per_step)
    groups = col.collect(examples, prompt_ids, tr.version)

    def scored(reference, on: bool):
        gs = copy.deepcopy(groups)
        lp.CPU_ATTENTION = on
        try:
            attach_ref_logprobs(gs, reference, col.tok.pad_token_id, len(gs), None, 0)
        finally:
            lp.CPU_ATTENTION = True
        return [x for g in gs for x in g.ref_logprobs]

    def diff(a, b):
        tok = [abs(u - v) for x, y in zip(a, b) for u, v in zip(x, y)]
        seq = [abs(sum(x) - sum(y)) for x, y in zip(a, b)]
        return {"token_mean": st.mean(tok), "token_max": max(tok), "seq_mean": st.mean(seq),
                "seq_max": max(seq), "tokens": len(tok), "sequences": len(seq)}

    ref = col.reference
    agro, sdpa = scored(ref, True), scored(ref, False)
    truth = scored(lp.Reference(copy.deepcopy(ref.model).float(), "fp32"), True)
    out = {"agro_vs_sdpa": diff(agro, sdpa), "agro_vs_fp32": diff(agro, truth),
           "sdpa_vs_fp32": diff(sdpa, truth)}
    for k, d in out.items():
        print(f"  {k:13s} per token mean {d['token_mean']:.2e} max {d['token_max']:.2e}; per "
              f"sequence mean {d['seq_mean']:.2e} max {d['seq_max']:.2e} ({d['tokens']} tokens, "
              f"{d['sequences']} sequences)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", action="store_true", help="the per-layer bench instead")
    ap.add_argument("--lengths", default="176,272,368,464")
    ap.add_argument("--chunks", default="1,2,3,4,8",
                    help="--layer: also time the kernel with this many groups per chunk forced")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--shift", action="store_true",
                    help="how far agro's kernel moves stored reference log-probs from SDPA's")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None, help="write every timing here")
    a = ap.parse_args()
    if a.layer:
        print(f"CPU: {cpu_description()}; torch {torch.__version__}; threads "
              f"{torch.get_num_threads()}")
        res = layer_bench([int(x) for x in a.lengths.split(",")], max(a.reps, 10),
                          [int(x) for x in a.chunks.split(",") if x])
        write_json(a.json, cpu_description(), "fp32+bf16", torch.__version__, {}, {}, layer=res)
        return

    tr = bench_trainer("cpu-attention", f"precision={a.precision}")
    if a.shift:
        res = shift(tr)
        write_json(a.json, cpu_description(), a.precision, torch.__version__, {}, {}, shift=res)
        tr.close_generator()
        return
    cfg, col = tr.cfg, tr.collector
    examples, prompt_ids = col.prompts(cfg.prompts_per_step)
    groups = col.collect(examples, prompt_ids, tr.version)

    def timed(on: bool, fn) -> float:
        lp.CPU_ATTENTION = on
        try:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        finally:
            lp.CPU_ATTENTION = True

    def ref(on):
        return timed(on, lambda: col.attach_ref_logprobs(groups))

    def learn(on):
        return timed(on, lambda: tr.learn(groups))

    rows: dict[str, list] = {k: [] for k in ("ref_agro", "ref_sdpa", "learn_agro", "learn_sdpa")}
    for on in (True, False):                                             # warm-ups
        ref(on), learn(on)
    for r in range(a.reps):
        for on in order(r, True, False):
            rows["ref_agro" if on else "ref_sdpa"].append(ref(on))
        for on in order(r, True, False):
            rows["learn_agro" if on else "learn_sdpa"].append(learn(on))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()),
              flush=True)
    med = medians(rows)
    print(f"\nmedians over {a.reps} rounds ({a.precision}; SDPA = "
          f"{'flash' if a.precision == 'bf16' else 'math'}):")
    for what in ("ref", "learn"):
        print(f"  {'reference pass' if what == 'ref' else 'learner step':15s} agro kernel "
              f"{med[what + '_agro']:.2f} s, SDPA {med[what + '_sdpa']:.2f} s: "
              f"{med[what + '_sdpa'] / med[what + '_agro']:.2f}x")
    write_json(a.json, cpu_description(), a.precision, torch.__version__, rows, med)
    tr.close_generator()


if __name__ == "__main__":
    main()
