"""A claim's figures: held-out accuracy vs step (or epoch) and vs KL(pi || pi_ref), one line per
arm, the mean over seeds with a band of +- one standard error; one panel per group of arms the
claim compares (``Claim.panels``: e.g. the losses at one staleness), on a shared accuracy axis."""
from __future__ import annotations

from pathlib import Path

from . import stats


def _curves(recs_by_seed, x: str):
    """[(x mean, acc mean, acc se, kl mean)] at each evaluation index common to the seeds."""
    runs = [[r for r in rec.rows if r.get("eval_accuracy") not in (None, "")]
            for rec in recs_by_seed.values()]
    k = min((len(r) for r in runs), default=0)
    pts = []
    for i in range(k):
        xs = [float(r[i][x]) for r in runs]
        acc = stats.estimate([float(r[i]["eval_accuracy"]) for r in runs])
        kls = [float(r[i]["eval_kl"]) for r in runs if r[i].get("eval_kl") not in (None, "")]
        pts.append((stats.mean(xs), acc.mean, acc.se if acc.n > 1 else 0.0, stats.mean(kls)))
    return pts


def panel_groups(claim) -> list[tuple[str, tuple[str, ...]]]:
    """``claim.panels``, or one untitled panel of every arm; each arm in exactly one panel."""
    groups = list(claim.panels) or [("", tuple(claim.arms))]
    drawn = [a for _, arms in groups for a in arms]
    if sorted(drawn) != sorted(claim.arms):
        raise ValueError(f"claim {claim.name}: its panels hold {drawn}, not each of its arms "
                         f"{list(claim.arms)} once")
    return groups


def write_plots(claim, recs, labels: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    panels = [(claim.x, f"accuracy_vs_{claim.x}.png", claim.x)]
    if claim.kl_plot:
        panels.append(("kl", "accuracy_vs_kl.png", "held-out KL(pi || pi_ref), nats per completion"))
    groups = panel_groups(claim)
    for kind, name, xlabel in panels:
        fig, axes = plt.subplots(1, len(groups), figsize=(6.4 if len(groups) == 1 else 4.2 * len(groups), 4.2),
                                 sharex=True, sharey=True, squeeze=False)
        for ax, (title, arms) in zip(axes[0], groups):
            for arm in arms:
                by = recs.get(arm, {})
                pts = _curves(by, "epoch" if kind == "epoch" else "step")
                if not pts:
                    ax.plot([], [])          # keep the colour cycle: a series' colour never shifts
                    continue
                xs = [p[3] if kind == "kl" else p[0] for p in pts]
                ys = [p[1] for p in pts]
                se = [p[2] for p in pts]
                line, = ax.plot(xs, ys, marker="o", ms=3, label=f"{labels.get(arm, arm)} (n={len(by)})")
                ax.fill_between(xs, [y - s for y, s in zip(ys, se)], [y + s for y, s in zip(ys, se)],
                                color=line.get_color(), alpha=0.2, lw=0)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if title:
                ax.set_title(title, fontsize=9)
            if any(line.get_label()[:1] != "_" for line in ax.lines):
                ax.legend(fontsize=7)
        axes[0][0].set_ylabel("held-out sampled accuracy")
        fig.suptitle(f"{claim.name}: {claim.title}", fontsize=9)
        fig.tight_layout()
        p = out / name
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths
