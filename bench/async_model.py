"""Step time vs max_staleness from agro.throughput's pipeline model, for measured phase times.

    .venv/bin/python bench/async_model.py --gen 3.2 --learn 4.3 --push 0.36 --out docs/async/throughput_model.png

--gen: seconds to produce one step's groups (sampling + grading + reference pass), --learn: the
learner's seconds per step, --push: one weight push to an actor. Defaults: the medians of the
default job with generator=vllm on the 2026-12-01 Zen 4 CPU (docs/RESULTS.md, "Sampling with
vLLM": sampling 2.21 + reference 0.99 s, learner 4.67 s minus its ~0.4 s push). Plotted: the
simulated steady-state step time (dots) and the closed form (lines) on separate devices with
1, 2 and 4 actors, and on shared cores (this CPU: overlap cannot help); a second panel with
generation ``--heavy`` times longer (long completions, where actors and k matter). Measured points of an
asynchronous run are not on it yet: agro has no asynchronous actors (issue 10 part 2).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from agro.throughput import simulate, steady_state_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gen", type=float, default=3.2)
    ap.add_argument("--learn", type=float, default=4.3)
    ap.add_argument("--push", type=float, default=0.36)
    ap.add_argument("--max-k", type=int, default=4)
    ap.add_argument("--heavy", type=float, default=4.0, help="second panel: generation x this")
    ap.add_argument("--out", default="docs/async/throughput_model.png")
    a = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(a.max_k + 1))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = [(a.gen, "measured default job"),
              (a.gen * a.heavy, f"generation x{a.heavy:g} (long completions)")]
    for ax, (gen, what) in zip(axes, panels):
        print(f"{what}: G={gen:.2f} s, L={a.learn} s, P={a.push} s; steady-state s/step")
        for actors, color in ((1, "C0"), (2, "C1"), (4, "C2")):
            sim = [simulate(gen, a.learn, actors=actors, max_staleness=k, push_seconds=a.push,
                            steps=400, warmup=50).step_seconds for k in ks]
            closed = [steady_state_step(gen, a.learn, actors, k, a.push) for k in ks]
            ax.plot(ks, closed, "-", color=color, label=f"separate devices, {actors} actor(s): formula")
            ax.plot(ks, sim, "o", color=color, label=f"separate devices, {actors} actor(s): simulation")
            print(f"  separate, {actors} actor(s): " + "  ".join(f"k={k}: {x:.2f}" for k, x in zip(ks, sim)))
        shared = [simulate(gen, a.learn, actors=1, max_staleness=k, push_seconds=a.push,
                           steps=400, warmup=50, shared=True).step_seconds for k in ks]
        ax.plot(ks, shared, "s--", color="C3", label="shared cores (this 2-core CPU), 1 actor")
        print("  shared cores, 1 actor: " + "  ".join(f"k={k}: {x:.2f}" for k, x in zip(ks, shared)))
        ax.axhline(a.learn, color="gray", lw=0.8, ls=":")
        ax.text(a.max_k, a.learn, " learner alone", va="bottom", ha="right", color="gray", fontsize=8)
        ax.set_xlabel("max_staleness k (policy versions generation may run ahead)")
        ax.set_ylabel("seconds per step (steady state)")
        ax.set_title(f"{what}: generation {gen:.1f} s, learning {a.learn} s, push {a.push} s",
                     fontsize=10)
        ax.set_xticks(ks)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
