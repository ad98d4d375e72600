"""Each claim's decision: the statistic that decides it and one verdict.

Statistics are over seeds (paired by seed where arms are compared: the same seed gives the same
prompts, and the first step's samples are the same). Accuracy is the held-out sampled accuracy of
the evaluation points (the base model's evaluation is step 0 of every arm); KL is the held-out
estimate of KL(pi || pi_ref) made at the same evaluations from samples of pi (the training
``kl_k1`` is not KL(pi || pi_ref) when the samples are not pi's own: replay, offline, stale).

Decision rules (:mod:`agro.repro.stats`): "A > B" is reproduced when the 95 % t-interval of the
paired difference lies above 0; "A = B" when its 90 % interval (two one-sided 5 % tests) lies
inside +-MARGIN; a claim with several parts is reproduced when every part is, not reproduced when
any part is contradicted, and inconclusive otherwise. MARGIN = 0.05 accuracy. With 3 seeds the
intervals are wide (t = 4.30 / 2.92): only large or very consistent effects decide, and an
inconclusive part says what half-width the design resolved. Accuracy at a matched KL needs a KL of
at least KL_FLOOR nats reached by every run compared; below that the part is inconclusive (the
curves would be compared next to their shared step-0 point).
"""
from __future__ import annotations

import math

from . import stats
from .claims import ASYNC_K_GRPO, BETA_SAFE, Claim
from .stats import Estimate, REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE

MARGIN = 0.05
KL_FLOOR = 0.05


# ------------------------------------------------------------------ per-run quantities
def _evals(rec):
    return [r for r in rec.rows if r.get("eval_accuracy") not in (None, "")]


def final_acc(rec) -> float:
    return float(_evals(rec)[-1]["eval_accuracy"])


def base_acc(rec) -> float:
    return float(_evals(rec)[0]["eval_accuracy"])


def peak_acc(rec) -> float:
    return max(float(r["eval_accuracy"]) for r in _evals(rec)[1:])


def mean_acc(rec) -> float:
    """Mean held-out accuracy over the evaluations after step 0 (the area under the curve of
    equally spaced evaluations, divided by its width): "learns faster" in one number."""
    return stats.mean([float(r["eval_accuracy"]) for r in _evals(rec)[1:]])


def final_kl(rec) -> float:
    v = _evals(rec)[-1].get("eval_kl")
    return math.nan if v in (None, "") else float(v)


def max_kl(rec) -> float:
    """The largest held-out KL estimate after step 0 (step 0 is pi_ref: exactly 0)."""
    return max((float(r["eval_kl"]) for r in _evals(rec)[1:] if r.get("eval_kl") not in (None, "")),
               default=math.nan)


def acc_at_kl(rec, kl: float) -> float:
    ev = [r for r in _evals(rec) if r.get("eval_kl") not in (None, "")]
    return stats.interp_at([float(r["eval_kl"]) for r in ev],
                           [float(r["eval_accuracy"]) for r in ev], kl)


def acc_at_epoch(rec, epoch: float) -> float:
    ev = _evals(rec)
    return stats.interp_at([float(r["epoch"]) for r in ev], [float(r["eval_accuracy"]) for r in ev],
                           epoch)


def per_seed(recs, arm, fn) -> dict[int, float]:
    return {s: fn(r) for s, r in recs.get(arm, {}).items()}


def arm_table(recs, arms) -> list[dict]:
    rows = []
    for a in arms:
        by = recs.get(a, {})
        if not by:
            rows.append({"arm": a, "seeds": 0})
            continue
        rows.append({"arm": a, "seeds": len(by),
                     "base": stats.estimate([base_acc(r) for r in by.values()]),
                     "final": stats.estimate([final_acc(r) for r in by.values()]),
                     "peak": stats.estimate([peak_acc(r) for r in by.values()]),
                     "mean": stats.estimate([mean_acc(r) for r in by.values()]),
                     "final_kl": stats.estimate([final_kl(r) for r in by.values()])})
    return rows


def _part(name: str, statistic: str, d: Estimate, rule) -> dict:
    verdict, why = rule(d, MARGIN)
    return {"part": name, "statistic": statistic, "estimate": d.fmt(), "verdict": verdict,
            "reason": why}


def _eq(recs, a: str, b: str, fn) -> Estimate:
    """Paired a - b at the 90 % level (for stats.equivalence)."""
    return stats.paired(per_seed(recs, a, fn), per_seed(recs, b, fn), level=0.90)


def _kl_part(name: str, statistic: str, kl: float, d: Estimate, rule) -> dict:
    if not (math.isfinite(kl) and kl >= KL_FLOOR):
        return {"part": name, "statistic": statistic, "estimate": d.fmt(), "verdict": INCONCLUSIVE,
                "reason": f"the KL every compared run reached is {kl:.3g} nats, below the "
                          f"{KL_FLOOR} floor: the curves cannot be compared at a matched KL"}
    return _part(name, statistic, d, rule)


def _missing(claim: Claim, recs, seeds) -> list[str]:
    return [f"{a} (seeds done: {sorted(recs.get(a, {}))})" for a in claim.arms
            if len(recs.get(a, {})) < len(seeds)]


# ------------------------------------------------------------------ the claims
def _c1(recs):
    d = _eq(recs, "agro", "kl_pg", final_acc)
    d2 = _eq(recs, "agro", "kl_pg", mean_acc)
    return [_part("same final accuracy", "final held-out accuracy, agro - kl_pg (paired)", d,
                  stats.equivalence),
            _part("same learning curve", "mean held-out accuracy over evaluations, agro - kl_pg",
                  d2, stats.equivalence)]


def _c2(recs):
    """-> (the paper's parts, at the default beta; §4.6's parts; parts shown for information)."""
    def cmp(on, off, b):
        return [_part(f"lambda=1 learns faster than lambda=0 at beta={b}",
                      f"mean held-out accuracy, {on} - {off}",
                      stats.paired(per_seed(recs, on, mean_acc), per_seed(recs, off, mean_acc)),
                      stats.superiority),
                _part(f"lambda=1 ends higher than lambda=0 at beta={b}",
                      f"final held-out accuracy, {on} - {off}",
                      stats.paired(per_seed(recs, on, final_acc), per_seed(recs, off, final_acc)),
                      stats.superiority)]
    paper = cmp("agro_on", "agro", "0.02")
    info = cmp("agro_on-b0.5", "agro-b0.5", str(BETA_SAFE))
    pitfall = []
    d = stats.estimate([final_acc(r) - base_acc(r) for r in recs.get("agro_on", {}).values()])
    pitfall.append(_part("lambda=1 collapses at beta=0.02 (final held-out accuracy below the base "
                         "model's; §4.6 predicts it per prompt for p < 1/2 - beta, and p-bar ~ 0.11)",
                         "final - base held-out accuracy of agro_on", d,
                         lambda e, m: _below(e)))
    d = stats.estimate([final_acc(r) - base_acc(r) for r in recs.get("agro_on-b0.5", {}).values()])
    pitfall.append(_part(f"lambda=1 is safe at beta={BETA_SAFE} (not below the base model)",
                         "final - base held-out accuracy of agro_on-b0.5", d,
                         _at_least))
    return paper, pitfall, info


def _below(e: Estimate) -> tuple[str, str]:
    if e.n < 2:
        return INCONCLUSIVE, "fewer than two seeds"
    if e.hi < 0:
        return REPRODUCED, f"the 95% interval ({e.lo:+.3f} .. {e.hi:+.3f}) lies below 0"
    if e.lo > 0:
        return NOT_REPRODUCED, f"accuracy rose: the 95% interval ({e.lo:+.3f} .. {e.hi:+.3f}) lies above 0"
    return INCONCLUSIVE, f"the 95% interval ({e.lo:+.3f} .. {e.hi:+.3f}) contains 0"


def _at_least(e: Estimate, margin: float) -> tuple[str, str]:
    """"Not worse than -margin": reproduced when the interval's lower end lies above -margin (for
    "A is at least as good as B" pass A - B at ``level=0.90``: a one-sided 5 % test); not
    reproduced when the whole interval lies below 0."""
    if e.n < 2:
        return INCONCLUSIVE, "fewer than two seeds"
    if e.lo > -margin:
        return REPRODUCED, f"{e.interval} lies above -{margin}"
    if e.hi < 0:
        return NOT_REPRODUCED, f"{e.interval} lies below 0"
    return INCONCLUSIVE, f"{e.interval} reaches below -{margin}"


def _c3(recs):
    a, k, pg = "offline-agro", "offline-kl_pg_token", "offline-pg"
    parts = [
        _part("agro beats kl_pg_token in peak accuracy", f"peak held-out accuracy, {a} - {k}",
              stats.paired(per_seed(recs, a, peak_acc), per_seed(recs, k, peak_acc)),
              stats.superiority),
        _part("agro beats kl_pg_token at a fixed epoch (the last)",
              f"final held-out accuracy, {a} - {k}",
              stats.paired(per_seed(recs, a, final_acc), per_seed(recs, k, final_acc)),
              stats.superiority)]
    # "degrades as epochs go on": the last evaluation against the one at half the epochs (a
    # fixed point chosen before the runs; the peak would be biased upwards by noise).
    def late_minus_mid(rec):
        last = float(_evals(rec)[-1]["epoch"])
        return final_acc(rec) - acc_at_epoch(rec, last / 2)
    parts.append(_part("unregularized PG (beta=0) degrades as epochs go on",
                       f"held-out accuracy at the last epoch - at half the epochs, {pg}",
                       stats.estimate(list(per_seed(recs, pg, late_minus_mid).values())),
                       lambda e, m: _below(e)))
    return parts


def _matched_kl(recs, arms) -> float:
    """The largest KL every run of ``arms`` reached at one of its evaluations."""
    kls = [max_kl(r) for a in arms for r in recs.get(a, {}).values()]
    kls = [k for k in kls if math.isfinite(k)]
    return min(kls) if kls else math.nan


def _at_matched_kl(recs, name: str, a: str, b: str, rule, among=None) -> dict:
    """Held-out accuracy of ``a`` - ``b`` (paired) at the largest KL every run of ``among``
    (default: a and b) reached; 90 % level for the equivalence rule, else 95 %."""
    kl = _matched_kl(recs, among or (a, b))
    level = 0.90 if rule is stats.equivalence else 0.95
    d = stats.paired(per_seed(recs, a, lambda r: acc_at_kl(r, kl)),
                     per_seed(recs, b, lambda r: acc_at_kl(r, kl)), level=level)
    return _kl_part(name, f"held-out accuracy at matched KL = {kl:.3g} nats, {a} - {b}", kl, d, rule)


def _c4(recs):
    arms = ("agro", "replay-p0.5", "replay-p0.9")
    parts = [_at_matched_kl(recs, f"{p} is as KL-efficient as on-policy", p, "agro",
                            stats.equivalence, among=arms)
             for p in ("replay-p0.5", "replay-p0.9")]
    d = stats.paired(per_seed(recs, "agro", final_kl), per_seed(recs, "replay-p0.9", final_kl))
    verdict, why = stats.superiority(d, 0.0)
    parts.append({"part": "on-policy moves further from pi_ref per step",
                  "statistic": "final held-out KL(pi||pi_ref), agro (p=0) - replay-p0.9 (nats)",
                  "estimate": d.fmt(), "verdict": verdict, "reason": why})
    return parts


def _c5(recs):
    lo, mid, hi, zero = "agro-b0.0063", "agro", "agro-b0.063", "agro-b0"
    parts = [_part("larger beta learns more slowly",
                   f"mean held-out accuracy, {lo} - {hi}",
                   stats.paired(per_seed(recs, lo, mean_acc), per_seed(recs, hi, mean_acc)),
                   stats.superiority)]
    for name, better, worse in (("larger beta is more KL-efficient", hi, lo),
                                ("beta = 0 is KL-inefficient", mid, zero)):
        parts.append(_at_matched_kl(recs, name, better, worse, stats.superiority))
    return parts


def _not_worse(recs, name: str, a: str, b: str, what: str) -> dict:
    """Part "arm a does at least as well as arm b": final held-out accuracy a - b, paired over
    seeds at the 90 % level (a one-sided 5 % test, :func:`_at_least`)."""
    return _part(name, f"final held-out accuracy, {what}",
                 stats.paired(per_seed(recs, a, final_acc), per_seed(recs, b, final_acc),
                              level=0.90),
                 _at_least)


def _c6(recs):
    parts = [_not_worse(recs, f"agro does at least as well as kl_pg at lag {k}",
                        f"stale{k}-agro", f"stale{k}-kl_pg", f"stale{k}-agro - stale{k}-kl_pg")
             for k in (2, 8)]
    parts.append(_not_worse(recs, "agro keeps its lag-0 accuracy at lag 8", "stale8-agro", "agro",
                            "stale8-agro - agro (lag 0)"))
    return parts


def _c7(recs):
    """-> (the claim's parts; parts shown for information: grpo with no correction, which tells
    what grpo's loss does from what its importance weights do)."""
    parts = [_not_worse(recs, f"agro does at least as well as {other} at k = {k}",
                        f"async{k}-agro", f"async{k}-{other}", f"async{k}-agro - async{k}-{other}")
             for k in sorted(ASYNC_K_GRPO) for other in ("kl_pg", "grpo_is", "grpo_tis")]
    parts.append(_not_worse(recs, "agro keeps its k = 0 accuracy at k = 4", "async4-agro",
                            "async0-agro", "async4-agro - async0-agro"))
    info = []
    for k in sorted(ASYNC_K_GRPO):
        info.append(_not_worse(recs, f"agro does at least as well as grpo without IS at k = {k}",
                               f"async{k}-agro", f"async{k}-grpo", f"async{k}-agro - async{k}-grpo"))
        for arm, what in (("grpo_is", "masked"), ("grpo_tis", "truncated")):
            info.append(_part(f"grpo's {what} IS beats no IS at k = {k}",
                              f"final held-out accuracy, async{k}-{arm} - async{k}-grpo",
                              stats.paired(per_seed(recs, f"async{k}-{arm}", final_acc),
                                           per_seed(recs, f"async{k}-grpo", final_acc)),
                              stats.superiority))
    return parts, info


INFO_NOTES = {
    "c2": f"the same comparison at beta = {BETA_SAFE}, where §4.6 says lambda = 1 is safe.",
    "c7": "grpo with no importance weights, which tells grpo's loss from its correction.",
}


def decide(claim: Claim, recs, seeds) -> dict:
    missing = _missing(claim, recs, seeds)
    extra: list[dict] = []
    info: list[dict] = []
    fn = {"c1": _c1, "c3": _c3, "c4": _c4, "c5": _c5, "c6": _c6}.get(claim.name)
    if claim.name == "c2":
        parts, extra, info = _c2(recs)
    elif claim.name == "c7":
        parts, info = _c7(recs)
    else:
        parts = fn(recs)
    verdict = stats.combine(*[p["verdict"] for p in parts])
    out = {"claim": claim.name, "verdict": verdict, "parts": parts,
           "arms": [{k: (v.short() if isinstance(v, Estimate) else v) for k, v in row.items()}
                    for row in arm_table(recs, claim.arms)],
           "missing": missing}
    aborted = [f"{a} seed {sd}" for a in claim.arms for sd, r in recs.get(a, {}).items()
               if r.status != "finished"]
    out["aborted"] = aborted
    if info:
        out["info_parts"] = info
        out["info_note"] = INFO_NOTES[claim.name]
    if extra:
        out["pitfall_parts"] = extra
        out["pitfall_verdict"] = stats.combine(*[p["verdict"] for p in extra])
    if missing:
        out["verdict"] = INCONCLUSIVE
        out["why"] = "the sweep is not finished: " + "; ".join(missing)
    return out


def render(claim: Claim, v: dict, labels: dict) -> str:
    L = [f"# {claim.name}: {claim.title}", "", f"**Claim.** {claim.statement}", ""]
    if v.get("sweep", {}).get("quick"):
        L += ["**Quick mode: a tiny random model and a couple of steps per arm. This tests the "
              "pipeline; the verdict below is not evidence about the claim.**", ""]
    L += [f"**Verdict: {v['verdict']}.**"]
    if v.get("why"):
        L += ["", v["why"]]
    L += ["", "| part | statistic | estimate (mean ± se over seeds) | verdict | why |",
          "|---|---|---|---|---|"]
    L += [f"| {p['part']} | {p['statistic']} | {p['estimate']} | {p['verdict']} | {p['reason']} |"
          for p in v["parts"]]
    if v.get("pitfall_parts"):
        L += ["", f"**§4.6 prediction (agro_math.md): {v['pitfall_verdict']}.**", "",
              "| part | statistic | estimate | verdict | why |", "|---|---|---|---|---|"]
        L += [f"| {p['part']} | {p['statistic']} | {p['estimate']} | {p['verdict']} | {p['reason']} |"
              for p in v["pitfall_parts"]]
    if v.get("info_parts"):
        L += ["", "For information (not part of " + ("either verdict" if v.get("pitfall_parts")
                                                      else "the verdict") + "): "
              + v.get("info_note", INFO_NOTES.get(claim.name, "")), "",
              "| part | statistic | estimate | verdict | why |", "|---|---|---|---|---|"]
        L += [f"| {p['part']} | {p['statistic']} | {p['estimate']} | {p['verdict']} | {p['reason']} |"
              for p in v["info_parts"]]
    if v.get("aborted"):
        L += ["", "Runs that stopped early (TrainingAborted; their last evaluation counts as "
              "final): " + ", ".join(v["aborted"]) + "."]
    L += ["", "Held-out sampled accuracy per arm (mean ± se over seeds):", "",
          "| arm | seeds | base | final | peak | mean over evaluations | final KL(pi‖pi_ref) |",
          "|---|---|---|---|---|---|---|"]
    for row in v["arms"]:
        if row.get("seeds", 0) == 0:
            L.append(f"| {labels.get(row['arm'], row['arm'])} | 0 | | | | | |")
            continue
        L.append(f"| {labels.get(row['arm'], row['arm'])} | {row['seeds']} | {row['base']} | "
                 f"{row['final']} | {row['peak']} | {row['mean']} | {row['final_kl']} |")
    s = v.get("sweep", {})
    if s:
        L += ["", f"Runs finished: {s['runs_finished']} of {s['runs_total']}; their wall time "
              f"summed: {s['wall_seconds_sum'] / 60:.1f} min" + (" (quick mode: a tiny random "
                                                                 "model, plumbing only)" if s.get("quick") else "") + "."]
        codes = s.get("code_revisions") or {}
        if codes:
            L += ["", "Code that ran them: " + ", ".join(f"{c} ({n} runs)" for c, n in codes.items())
                  + ("" if len(codes) == 1 else " — more than one revision: where they differ "
                     "in the trainer or the sampler, runs of one seed draw other samples, and "
                     "the pairing by seed loses its common random numbers (not its validity)")
                  + "."]
    L += ["", "Decision rules: src/agro/repro/verdicts.py (paired by seed; 'A > B': 95% Student-t "
          "interval; 'A = B': 90% interval (TOST) inside ±0.05 accuracy; matched KL needs "
          f"≥ {KL_FLOOR} nats)."]
    return "\n".join(L) + "\n"
