"""One checkpoint save of the default model (SmolLM2-135M, fp32 masters and AdamW state: ~1.6 GB)
with torch.save's zip CRC32s computed (as agro saves) and without
(``torch.utils.serialization.config.save.compute_crc32 = False``; agro's checkpoints carry
every file's sha256, checked on load, and torch.load does not check the CRC32s), interleaved
rounds, each into a fresh directory as a
run's saves are (earlier ones pruned, ``keep=2`` as keep_checkpoints).

    .venv/bin/python bench/checkpoint_save.py --rounds 5 --json docs/bench/checkpoint/save.json

Prints each arm's wall seconds and the process's CPU seconds over the save (the sha256 helper
thread included), medians over the rounds. The save runs alone here; in a run it shares the 2
cores with the next step, which its CPU seconds slow. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abrounds import medians, order, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import torch

    from torch.utils.serialization import config as serialization

    import agro.checkpoint as ck
    from agro.models import load_model
    from agro.perf import machine_key

    torch.manual_seed(0)
    model = load_model("default")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()                                   # AdamW's state: exp_avg, exp_avg_sq per weight
    opt.zero_grad(set_to_none=True)
    out = Path(tempfile.mkdtemp(prefix="agro-ckpt-bench-"))
    rows: dict[str, list] = {f"{k}_{m}": [] for k in ("crc32", "no_crc32") for m in ("wall", "cpu")}
    step = 0
    for r in range(a.rounds + 1):                # round 0 warms the page cache and is dropped
        for arm in order(r, "crc32", "no_crc32"):
            serialization.save.compute_crc32 = arm == "crc32"
            step += 1
            w, c = time.perf_counter(), time.process_time()
            path = ck.save_checkpoint(out, step, model, opt, None, {"step": step}, {}, keep=2)
            w, c = time.perf_counter() - w, time.process_time() - c
            if r:
                rows[f"{arm}_wall"].append(w)
                rows[f"{arm}_cpu"].append(c)
            print(f"round {r} {arm}: wall {w:.2f} s, cpu {c:.2f} s", flush=True)
    # what was written without the CRC32s loads and verifies (sha256) as before
    serialization.save.compute_crc32 = False
    path = ck.save_checkpoint(out, step + 1, model, opt, None, {"step": step + 1}, {}, keep=1)
    m2 = load_model("default")
    o2 = torch.optim.AdamW([p for p in m2.parameters() if p.requires_grad], lr=1e-6, fused=True)
    ck.load_checkpoint(path, m2, o2, None, verify=True)
    a_state, b_state = opt.state_dict()["state"], o2.state_dict()["state"]
    same = a_state.keys() == b_state.keys() and all(
        a_state[i].keys() == b_state[i].keys()
        and all(torch.equal(a_state[i][k], b_state[i][k]) for k in a_state[i]) for i in a_state)
    same = same and all(torch.equal(x, y) for x, y in zip(model.parameters(), m2.parameters()))
    med = medians(rows)
    cpu = machine_key()
    print(f"{cpu}\nmedians over {a.rounds} rounds: with CRC32 wall {med['crc32_wall']:.2f} s, "
          f"cpu {med['crc32_cpu']:.2f} s; without wall {med['no_crc32_wall']:.2f} s, cpu "
          f"{med['no_crc32_cpu']:.2f} s ({med['no_crc32_cpu'] / med['crc32_cpu']:.3f}x cpu); "
          f"a save without CRC32s loads with sha256 verified, weights and AdamW state equal: {same}")
    write_json(a.json, cpu, "fp32", torch.__version__, rows, med, loaded_equal=same)
    import shutil
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
