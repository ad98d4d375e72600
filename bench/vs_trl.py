"""agro vs TRL's GRPOTrainer: step rate at equal settings, measured side by side in one run.

    make bench                                  # sets up .venv-bench, then runs this
    .venv-bench/bin/python bench/vs_trl.py --steps 8 --rounds 2

Both arms train the same model (the embedded default, saved once as an fp32 transformers
directory so both load it the same way), on the same arithmetic prompts in the same order, with
the same settings: ``prompts`` x ``group_size`` samples per optimizer step, ``max_new_tokens``,
temperature 1 / top_k 0 / top_p 1, beta, lr, the same precision (``--precision fp32``, or
``bf16``: agro ``precision=bf16``, TRL ``bf16=True``), micro-batches of ``micro_batch`` sequences,
each arm's default sampler (agro's KV-cache loop, TRL's ``generate``; arm ``agro-vllm``: agro
with ``generator=vllm``, run by ``--vllm-python``), a frozen reference model,
one process, all cores. Each arm runs in
its own process, one after the other (never concurrently: two torch processes on 2 cores slow
each other down 10-20x), alternating agro, TRL, agro, TRL ... for ``rounds`` rounds.

A step is the wall time between two consecutive optimizer-step ends (agro: the ``time`` field
of metrics.jsonl; TRL: a ``TrainerCallback.on_step_end`` clock), so both include generation,
grading, reference and policy passes, the optimizer and logging. The first ``warmup`` steps of
every run are dropped. Printed: per-arm median seconds per step and the ratio TRL / agro (the
speed-up), with each run's steps so nothing is hidden.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def model_dir(cache: Path) -> Path:
    """The embedded default saved as a float32 transformers directory (made once)."""
    d = cache / "smollm2-135m-instruct-fp32"
    if not (d / "config.json").exists():
        from agro.models import DEFAULT_MODEL, load_model, load_tokenizer, save_for_transformers

        save_for_transformers(load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL), d)
    return d


def run_agro(a, model: Path, out: Path, python: str = sys.executable, extra=(),
             arm: str = "agro") -> dict:
    cmd = [python, "-m", "agro.cli", "train", f"model={model}", f"output_dir={out}",
           f"steps={a.steps}", f"prompts_per_step={a.prompts}", f"group_size={a.group_size}",
           f"micro_batch_groups={a.micro_batch // a.group_size}",
           "micro_batch_tokens=0",   # exactly micro_batch sequences, as TRL (no token budget)
           f"max_new_tokens={a.max_new_tokens}", f"beta={a.beta}", f"lr={a.lr}",
           "warmup_steps=0", f"precision={a.precision}", "temperature=1.0", "top_p=1.0", "top_k=0",
           "eval_prompts=0", "save_every=0", "plot=false", "tensorboard=false", "progress=false",
           f"seed={a.seed}", f"num_threads={a.threads}", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if a.quiet else None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r and "step" in r]
    times = [r["time"] for r in rows]
    # step 1 has no previous step end: its in-loop time stands in (dropped by --warmup anyway)
    steps = [rows[0]["step_seconds"]] + [t1 - t0 for t0, t1 in zip(times, times[1:])]
    return {"arm": arm, "step_seconds": steps,
            "reward": [r.get("reward_mean") for r in rows],
            "completion_len": [r.get("completion_len_mean") for r in rows],
            "inner_step_seconds": [r["step_seconds"] for r in rows]}


def run_agro_vllm(a, model: Path, out: Path) -> dict:
    """agro with generator=vllm, run by the vLLM venv's python (make vllm-setup)."""
    if not Path(a.vllm_python).exists():
        raise SystemExit(f"arm agro-vllm needs {a.vllm_python}: run `make vllm-setup` first")
    return run_agro(a, model, out, python=a.vllm_python, extra=["generator=vllm"], arm="agro-vllm")


def run_trl(a, model: Path, out: Path) -> dict:
    cmd = [sys.executable, str(HERE / "trl_arm.py"), "--model", str(model), "--out", str(out),
           "--steps", str(a.steps), "--prompts", str(a.prompts), "--group-size", str(a.group_size),
           "--micro-batch", str(a.micro_batch), "--max-new-tokens", str(a.max_new_tokens),
           "--beta", str(a.beta), "--lr", str(a.lr), "--seed", str(a.seed),
           "--threads", str(a.threads)] + (["--bf16"] if a.precision == "bf16" else [])
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if not a.quiet:
        sys.stderr.write(p.stderr[-4000:])
    line = [x for x in p.stdout.splitlines() if x.startswith("BENCH_RESULT ")][-1]
    return json.loads(line[len("BENCH_RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="steps dropped at the start of each run")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=32,
                    help="sequences per micro-batch (32: agro's default step, 8 groups x 4, is one)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.02)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--arms", default="agro,trl",
                    help="comma list of agro, agro-vllm (generator=vllm, in --vllm-python), trl")
    ap.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="agro precision=...; TRL with bf16=True for bf16 (fp32 master weights in "
                         "both, loaded from the same fp32 directory)")
    ap.add_argument("--cache", default=str(HERE / ".cache"))
    ap.add_argument("--json", default="", help="also write all measurements here")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    if a.micro_batch % a.group_size or (a.prompts * a.group_size) % a.micro_batch:
        ap.error("micro_batch must be a multiple of group_size and divide prompts x group_size")
    if a.steps <= a.warmup:
        ap.error("--steps must exceed --warmup")

    model = model_dir(Path(a.cache))
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="agro-bench-") as tmp:
        for r in range(a.rounds):
            for arm in arms:
                out = Path(tmp) / f"{arm}-{r}"
                t = time.time()
                res = {"agro": run_agro, "agro-vllm": run_agro_vllm, "trl": run_trl}[arm](a, model, out)
                res.update(round=r, wall_seconds=time.time() - t)
                runs.append(res)
                kept = res["step_seconds"][a.warmup:]
                print(f"[bench] round {r} {arm}: median {statistics.median(kept):.2f} s/step "
                      f"over {len(kept)} steps; all: "
                      + " ".join(f"{s:.1f}" for s in res["step_seconds"]), flush=True)

    med = {arm: statistics.median([s for x in runs if x["arm"] == arm
                                   for s in x["step_seconds"][a.warmup:]]) for arm in arms}
    print()
    print(f"settings: {a.prompts} prompts x {a.group_size} samples, max_new_tokens "
          f"{a.max_new_tokens}, micro-batch {a.micro_batch} seqs, beta {a.beta}, lr {a.lr}, {a.precision}, "
          f"threads {a.threads or os.cpu_count()}, {a.steps} steps x {a.rounds} rounds, first "
          f"{a.warmup} dropped")
    for arm in arms:
        lens = [v for x in runs if x["arm"] == arm for v in x["completion_len"] if v is not None]
        print(f"  {arm:9s} median {med[arm]:6.2f} s/step   mean completion length "
              f"{statistics.mean(lens) if lens else float('nan'):.1f} tokens")
    for arm in ("agro", "agro-vllm"):
        if arm in med and "trl" in med:
            print(f"  speed-up (TRL s/step / {arm} s/step): {med['trl'] / med[arm]:.2f}x")
    if "agro" in med and "agro-vllm" in med:
        print(f"  agro-vllm vs agro (agro s/step / agro-vllm s/step): {med['agro'] / med['agro-vllm']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "runs": runs, "median": med,
                                            "versions": versions()}, indent=1))


def versions() -> dict:
    """The code measured: agro's git commit (+dirty), TRL's and torch's versions, the CPU."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    def git(*args):
        return subprocess.run(["git", "-C", str(HERE.parent), *args], capture_output=True,
                              text=True).stdout.strip()

    from agro.perf import machine_key

    return {"agro_commit": git("rev-parse", "--short", "HEAD")
            + ("+dirty" if git("status", "--porcelain", "--", "src", "bench") else ""),
            "trl": ver("trl"), "torch": ver("torch"), "transformers": ver("transformers"),
            "machine": machine_key()}


if __name__ == "__main__":
    main()
