"""`agro repro`: the decision statistics (unit), the verdict wiring on made-up runs, and the whole
pipeline in --quick mode for every claim (a tiny random model: plumbing, not evidence), including
skip-finished, resume-after-SIGKILL and re-run-reproduces-rows."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agro.repro import stats, verdicts
from agro.repro.claims import ARMS, CLAIMS
from agro.repro.runner import CSV_COLUMNS, RunRecord

REQUIRED = ["arm", "seed", "step", "epoch", "samples", "reward_mean", "kl_k1", "eval_accuracy"]


# ------------------------------------------------------------------ statistics
def test_estimate_matches_a_hand_computation():
    e = stats.estimate([0.1, 0.2, 0.6])
    m = 0.3
    sd = math.sqrt(((0.1 - m) ** 2 + (0.2 - m) ** 2 + (0.6 - m) ** 2) / 2)
    assert e.mean == pytest.approx(m, abs=1e-12)
    assert e.se == pytest.approx(sd / math.sqrt(3), abs=1e-12)
    assert e.hi - e.mean == pytest.approx(4.303 * sd / math.sqrt(3), abs=1e-9)
    one = stats.estimate([0.5])
    assert one.n == 1 and math.isinf(one.se)
    assert stats.estimate([]).n == 0


def test_paired_difference_uses_common_seeds_only():
    d = stats.paired({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.5, 5: 0.0})
    assert d.n == 2 and d.mean == pytest.approx(0.1) and d.se == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("vals,sup,eq", [
    ([0.10, 0.12, 0.11], stats.REPRODUCED, stats.NOT_REPRODUCED),       # clearly above 0
    ([-0.10, -0.12, -0.11], stats.NOT_REPRODUCED, stats.NOT_REPRODUCED),  # clearly below 0
    ([0.001, -0.002, 0.0005], stats.NOT_REPRODUCED, stats.REPRODUCED),   # tiny: equal
    ([0.2, -0.2, 0.05], stats.INCONCLUSIVE, stats.INCONCLUSIVE),         # wide: can't tell
])
def test_decision_rules(vals, sup, eq):
    d = stats.estimate(vals)
    assert stats.superiority(d, 0.05)[0] == sup
    assert stats.equivalence(d, 0.05)[0] == eq


def test_one_seed_is_never_a_verdict():
    d = stats.estimate([0.3])
    assert stats.superiority(d, 0.05)[0] == stats.INCONCLUSIVE
    assert stats.equivalence(d, 0.05)[0] == stats.INCONCLUSIVE


def test_combine_and_interp():
    R, N, I = stats.REPRODUCED, stats.NOT_REPRODUCED, stats.INCONCLUSIVE
    assert stats.combine(R, R) == R and stats.combine(R, I) == I and stats.combine(I, N) == N
    assert stats.interp_at([0, 1, 3], [0.1, 0.3, 0.7], 2.0) == pytest.approx(0.5)
    assert stats.interp_at([0, 2, 1], [0.0, 1.0, 0.0], 1.0) == pytest.approx(0.5)  # first crossing
    assert math.isnan(stats.interp_at([0, 1], [0.1, 0.2], 5.0))


# ------------------------------------------------------------------ verdict wiring (made-up runs)
def _rec(arm, seed, accs, kls=None, epochs=None):
    kls = kls or [0.0] * len(accs)
    rows = [dict(arm=arm, seed=seed, step=i * 5, epoch=(epochs[i] if epochs else i * 0.01),
                 eval_accuracy=a, eval_kl=k) for i, (a, k) in enumerate(zip(accs, kls))]
    return RunRecord(arm, seed, rows, True, 1.0)


def _noise(arm: str, seed: int) -> float:
    """A fixed, arm- and seed-specific wobble (|x| <= 0.012), so paired differences have spread."""
    return 0.006 * ((seed * 7 + sum(map(ord, arm))) % 5 - 2)


def _recs(spec, epochs=None):
    """{arm: (accs, kls)} -> {arm: {seed: RunRecord}} for seeds 0-2, accs after step 0 wobbled."""
    return {arm: {s: _rec(arm, s, [a + _noise(arm, s) * (i > 0) for i, a in enumerate(accs)], kls,
                          epochs)
                  for s in range(3)} for arm, (accs, kls) in spec.items()}


def _parts(v):
    return {p["part"]: p["verdict"] for p in v["parts"]}


def test_c2_pitfall_is_detected_when_lambda_1_falls_below_base():
    base = 0.11
    recs = _recs({"agro_on": ([base, 0.05, 0.02, 0.01], None),
                  "agro": ([base, 0.3, 0.5, 0.6], None),
                  "agro_on-b0.5": ([base, 0.15, 0.2, 0.22], None),
                  "agro-b0.5": ([base, 0.14, 0.18, 0.2], None)})
    v = verdicts.decide(CLAIMS["c2"], recs, [0, 1, 2])
    assert v["pitfall_verdict"] == stats.REPRODUCED
    assert v["verdict"] == stats.NOT_REPRODUCED      # lambda=1 loses to lambda=0 at beta=0.02
    # and the opposite world: lambda=1 best everywhere, no collapse
    recs["agro_on"] = _recs({"agro_on": ([base, 0.5, 0.7, 0.8], None)})["agro_on"]
    recs["agro_on-b0.5"] = _recs({"agro_on-b0.5": ([base, 0.3, 0.4, 0.45], None)})["agro_on-b0.5"]
    v = verdicts.decide(CLAIMS["c2"], recs, [0, 1, 2])
    assert v["verdict"] == stats.REPRODUCED and v["pitfall_verdict"] == stats.NOT_REPRODUCED
    assert len(v["info_parts"]) == 2     # beta = 0.5 comparisons: shown, not in either verdict


def test_c1_equal_curves_reproduce_and_a_gap_does_not():
    same = _recs({"agro": ([0.1, 0.3, 0.4], None), "kl_pg": ([0.1, 0.3, 0.4], None)})
    assert verdicts.decide(CLAIMS["c1"], same, [0, 1, 2])["verdict"] == stats.REPRODUCED
    gap = _recs({"agro": ([0.1, 0.3, 0.4], None), "kl_pg": ([0.1, 0.2, 0.25], None)})
    assert verdicts.decide(CLAIMS["c1"], gap, [0, 1, 2])["verdict"] == stats.NOT_REPRODUCED


def test_c3_parts_follow_the_arms_not_their_order():
    ep = [0, 1, 2, 3, 4]
    good = {"offline-agro": ([0.1, 0.2, 0.3, 0.35, 0.4], None),
            "offline-kl_pg_token": ([0.1, 0.15, 0.2, 0.22, 0.25], None),
            "offline-pg": ([0.1, 0.3, 0.3, 0.2, 0.1], None)}
    v = verdicts.decide(CLAIMS["c3"], _recs(good, ep), [0, 1, 2])
    assert v["verdict"] == stats.REPRODUCED, v["parts"]
    swapped = dict(good, **{"offline-agro": good["offline-kl_pg_token"],
                            "offline-kl_pg_token": good["offline-agro"],
                            "offline-pg": ([0.1, 0.2, 0.3, 0.35, 0.4], None)})
    parts = _parts(verdicts.decide(CLAIMS["c3"], _recs(swapped, ep), [0, 1, 2]))
    assert set(parts.values()) == {stats.NOT_REPRODUCED}


def test_c5_slower_and_kl_efficiency_parts_have_the_right_sign():
    kls = [0.0, 1.0, 2.0]
    world = {"agro-b0.0063": ([0.1, 0.4, 0.5], [0.0, 2.0, 4.0]),     # fast, KL-hungry
             "agro": ([0.1, 0.35, 0.45], kls),
             "agro-b0.063": ([0.1, 0.25, 0.3], [0.0, 0.5, 1.0]),     # slow, KL-frugal
             "agro-b0": ([0.1, 0.4, 0.5], [0.0, 4.0, 8.0])}
    assert verdicts.decide(CLAIMS["c5"], _recs(world), [0, 1, 2])["verdict"] == stats.REPRODUCED
    flipped = dict(world, **{"agro-b0.0063": world["agro-b0.063"],
                             "agro-b0.063": world["agro-b0.0063"]})
    parts = _parts(verdicts.decide(CLAIMS["c5"], _recs(flipped), [0, 1, 2]))
    assert parts["larger beta learns more slowly"] == stats.NOT_REPRODUCED
    assert parts["larger beta is more KL-efficient"] == stats.NOT_REPRODUCED


def test_c6_noninferiority_both_ways():
    ok = _recs({"agro": ([0.1, 0.3, 0.4], None), "stale2-agro": ([0.1, 0.3, 0.4], None),
                "stale8-agro": ([0.1, 0.3, 0.41], None), "kl_pg": ([0.1, 0.3, 0.4], None),
                "stale2-kl_pg": ([0.1, 0.25, 0.3], None), "stale8-kl_pg": ([0.1, 0.2, 0.2], None)})
    assert verdicts.decide(CLAIMS["c6"], ok, [0, 1, 2])["verdict"] == stats.REPRODUCED
    bad = dict(ok, **_recs({"stale8-agro": ([0.1, 0.2, 0.2], None),
                            "stale8-kl_pg": ([0.1, 0.3, 0.4], None)}))
    parts = _parts(verdicts.decide(CLAIMS["c6"], bad, [0, 1, 2]))
    assert parts["agro does at least as well as kl_pg at lag 8"] == stats.NOT_REPRODUCED
    assert parts["agro keeps its lag-0 accuracy at lag 8"] == stats.NOT_REPRODUCED


def test_c7_noninferiority_both_ways():
    good = {f"async{k}-{n}": ([0.1, 0.3, acc], None) for k in (0, 1, 4)
            for n, acc in (("agro", 0.4), ("kl_pg", 0.35), ("grpo_is", 0.3))}
    good.update({f"async{k}-{n}": ([0.1, 0.3, acc], None) for k in (1, 4)
                 for n, acc in (("grpo_tis", 0.32), ("grpo", 0.25))})
    ok = _recs(good)
    v = verdicts.decide(CLAIMS["c7"], ok, [0, 1, 2])
    assert v["verdict"] == stats.REPRODUCED and len(v["parts"]) == 7 and not v["missing"]
    assert set(_parts(v)) == {f"agro does at least as well as {o} at k = {k}" for k in (1, 4)
                              for o in ("kl_pg", "grpo_is", "grpo_tis")} | {
        "agro keeps its k = 0 accuracy at k = 4"}
    info = {p["part"]: p["verdict"] for p in v["info_parts"]}
    assert info == {**{f"agro does at least as well as grpo without IS at k = {k}": stats.REPRODUCED
                       for k in (1, 4)},
                    **{f"grpo's {w} IS beats no IS at k = {k}": stats.REPRODUCED
                       for k in (1, 4) for w in ("masked", "truncated")}}
    bad = dict(ok, **_recs({"async4-agro": ([0.1, 0.2, 0.2], None),
                            "async4-grpo": ([0.1, 0.3, 0.35], None),
                            "async1-grpo_tis": ([0.1, 0.3, 0.9], None)}))
    v = verdicts.decide(CLAIMS["c7"], bad, [0, 1, 2])
    parts = _parts(v)
    assert parts["agro does at least as well as grpo_is at k = 4"] == stats.NOT_REPRODUCED
    assert parts["agro does at least as well as grpo_tis at k = 4"] == stats.NOT_REPRODUCED
    assert parts["agro does at least as well as grpo_tis at k = 1"] == stats.NOT_REPRODUCED
    assert parts["agro does at least as well as grpo_is at k = 1"] == stats.REPRODUCED
    assert parts["agro keeps its k = 0 accuracy at k = 4"] == stats.NOT_REPRODUCED
    assert parts["agro does at least as well as kl_pg at k = 1"] == stats.REPRODUCED
    info = {p["part"]: p["verdict"] for p in v["info_parts"]}
    assert info["agro does at least as well as grpo without IS at k = 4"] == stats.NOT_REPRODUCED
    assert info["grpo's masked IS beats no IS at k = 4"] == stats.NOT_REPRODUCED
    # "IS beats no IS" is superiority (95 % interval above 0), not non-inferiority: a small
    # noisy lead does not pass it
    lead = dict(ok, **{f"async4-{a}": {sd: _rec(f"async4-{a}", sd, [0.1, acc])
                                        for sd, acc in enumerate(accs)}
                       for a, accs in (("grpo_is", (0.32, 0.30, 0.36)), ("grpo", (0.30, 0.31, 0.31)))})
    info = {p["part"]: p["verdict"] for p in verdicts.decide(CLAIMS["c7"], lead, [0, 1, 2])["info_parts"]}
    assert info["grpo's masked IS beats no IS at k = 4"] == stats.INCONCLUSIVE
    text = verdicts.render(CLAIMS["c7"], v, {})
    assert "not part of the verdict): grpo with no importance weights" in text
    # the arms added later are part of the claim: without their runs the sweep is unfinished
    short = {a: r for a, r in ok.items() if not a.endswith(("-grpo", "-grpo_tis"))}
    v = verdicts.decide(CLAIMS["c7"], short, [0, 1, 2])
    assert v["verdict"] == stats.INCONCLUSIVE and len(v["missing"]) == 4


def test_c7_arms_configure_what_their_labels_say():
    for k in (1, 4):
        assert ARMS[f"async{k}-grpo_is"].overrides["loss_options"] == {"is_mode": "sequence_mask",
                                                                        "is_cap": 3.0}
        assert ARMS[f"async{k}-grpo_tis"].overrides["loss_options"] == {
            "is_mode": "sequence_truncate", "is_cap": 3.0}
        assert ARMS[f"async{k}-grpo"].overrides["loss"] == "grpo"
        assert "loss_options" not in ARMS[f"async{k}-grpo"].overrides
    assert "async0-grpo" not in ARMS and "async0-grpo_tis" not in ARMS
    for a in CLAIMS["c7"].arms:
        assert ARMS[a].overrides["async_generation"] is True
        assert ARMS[a].overrides["max_staleness"] == int(a[5])


def test_an_out_dir_takes_its_own_sweep_extended_by_arms_and_nothing_else(tmp_path):
    """OUT/arms.yaml's sweep may be continued by the same claim, mode and seeds with more arms
    (a claim that gained arms keeps its recorded runs); another claim, mode or seed list, or a
    subset of its arms (one arm re-run), is refused."""
    import yaml

    from agro.repro.runner import Sweep, SweepError

    out = tmp_path / "out"
    out.mkdir()

    def recorded(claim="c1", quick=True, seeds=(0, 1), arms=("agro",)):
        (out / "arms.yaml").write_text(yaml.safe_dump(
            {"claim": claim, "quick": quick, "seeds": list(seeds), "arms": {a: {} for a in arms}}))

    def check(**kw):
        Sweep("c1", out, store=tmp_path / "store", quick=True, **kw)._check_out_dir()

    check(seeds=[0, 1], arms=["agro", "kl_pg"])            # nothing recorded yet
    recorded()
    check(seeds=[0, 1], arms=["agro"])                     # the same sweep
    check(seeds=[0, 1], arms=["agro", "kl_pg"])            # extended by an arm
    recorded(arms=("agro", "kl_pg"))
    for kw in (dict(seeds=[0, 1], arms=["kl_pg"]), dict(seeds=[0], arms=["agro", "kl_pg"]),
               dict(seeds=[0, 1, 2], arms=["agro", "kl_pg"])):
        with pytest.raises(SweepError, match="holds the outputs of another sweep"):
            check(**kw)
    for prev in (dict(claim="c4", arms=("agro",)), dict(quick=False, arms=("agro",))):
        recorded(**prev)
        with pytest.raises(SweepError, match="another sweep"):
            check(seeds=[0, 1], arms=["agro", "kl_pg"])


def test_matched_kl_below_the_floor_is_inconclusive_not_a_free_verdict():
    tiny = [0.0, 0.001, 0.002]
    recs = _recs({"agro": ([0.1, 0.3, 0.5], tiny), "replay-p0.5": ([0.1, 0.2, 0.3], tiny),
                  "replay-p0.9": ([0.1, 0.15, 0.2], tiny)})
    parts = _parts(verdicts.decide(CLAIMS["c4"], recs, [0, 1, 2]))
    assert parts["replay-p0.5 is as KL-efficient as on-policy"] == stats.INCONCLUSIVE


def test_c4_matched_kl_compares_curves_not_endpoints():
    # replay reaches less KL but lies on the same accuracy-vs-KL line: as KL-efficient.
    recs = _recs({"agro": ([0.1, 0.3, 0.5], [0.0, 1.0, 2.0]),
                  "replay-p0.5": ([0.1, 0.2, 0.3], [0.0, 0.5, 1.0]),
                  "replay-p0.9": ([0.1, 0.15, 0.2], [0.0, 0.25, 0.5])})
    v = verdicts.decide(CLAIMS["c4"], recs, [0, 1, 2])
    parts = {p["part"]: p["verdict"] for p in v["parts"]}
    assert parts["replay-p0.5 is as KL-efficient as on-policy"] == stats.REPRODUCED
    assert parts["on-policy moves further from pi_ref per step"] == stats.REPRODUCED
    # a replay arm that buys its accuracy with twice the KL is not as KL-efficient
    recs["replay-p0.9"] = _recs({"r": ([0.1, 0.15, 0.2], [0.0, 0.5, 1.0])})["r"]
    recs["agro"] = _recs({"a": ([0.1, 0.4, 0.6], [0.0, 0.5, 1.0])})["a"]
    v = verdicts.decide(CLAIMS["c4"], recs, [0, 1, 2])
    parts = {p["part"]: p["verdict"] for p in v["parts"]}
    assert parts["replay-p0.9 is as KL-efficient as on-policy"] == stats.NOT_REPRODUCED


def test_unfinished_sweep_is_inconclusive_and_says_why():
    recs = _recs({"agro": ([0.1, 0.5], None)})
    v = verdicts.decide(CLAIMS["c1"], recs, [0, 1, 2])
    assert v["verdict"] == stats.INCONCLUSIVE and "kl_pg" in v["why"]


# ------------------------------------------------------------------ the pipeline, --quick
def test_list_names_every_claim(capsys):
    from agro.cli import main

    assert main(["repro", "--list"]) == 0
    out = capsys.readouterr().out
    for c in ("c1", "c2", "c3", "c4", "c5", "c6"):
        assert f"{c}  " in out
    assert all(a in ARMS for c in CLAIMS.values() for a in c.arms)


def test_every_claims_plot_panels_hold_each_arm_once_in_one_series_order():
    """Panels split a claim's arms (e.g. by staleness); each arm is drawn once, and every panel
    lists its series in one order of learners (a panel may stop early: c7's k = 0 has no extra
    grpo arms), so a learner keeps its colour across panels."""
    import dataclasses

    from agro.repro.plots import panel_groups

    def learner(a):
        o = ARMS[a].overrides
        return o.get("loss", "agro"), (o.get("loss_options") or {}).get("is_mode")

    for c in CLAIMS.values():
        groups = panel_groups(c)
        assert sorted(a for _, arms in groups for a in arms) == sorted(c.arms), c.name
        series = [[learner(a) for a in arms] for _, arms in groups]
        longest = max(series, key=len)
        assert all(x == longest[:len(x)] for x in series), (c.name, series)
        if len(series) > 1:        # one learner per series of a panel
            assert len(set(longest)) == len(longest), (c.name, longest)
    assert [len(arms) for _, arms in panel_groups(CLAIMS["c7"])] == [3, 5, 5]
    assert [t for t, _ in panel_groups(CLAIMS["c7"])] == [f"max_staleness k = {k}" for k in (0, 1, 4)]
    for bad in (CLAIMS["c7"].panels[:2], CLAIMS["c7"].panels + (("again", ("async0-agro",)),)):
        with pytest.raises(ValueError, match="c7: its panels"):
            panel_groups(dataclasses.replace(CLAIMS["c7"], panels=bad))


def test_bad_arguments_are_refused_before_anything_runs(tmp_path, capsys):
    from agro.cli import main

    assert main(["repro", "c9", "--out", str(tmp_path)]) == 2
    assert "claim" in capsys.readouterr().err
    assert main(["repro", "c1", "--out", str(tmp_path), "arms=kl_pg_token"]) == 2
    assert "not an arm of c1" in capsys.readouterr().err
    assert main(["repro", "c1"]) == 2
    assert "out" in capsys.readouterr().err


@pytest.fixture(scope="module")
def store(tmp_path_factory, tokenizer_dir):
    return tmp_path_factory.mktemp("repro_store")


def _read_csv(p: Path) -> list[dict]:
    with open(p) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(CLAIMS))
def test_quick_claim_writes_runs_plots_and_verdict(name, store, tmp_path):
    from agro.cli import main

    out = tmp_path / name
    assert main(["repro", name, "--out", str(out), "--quick", f"store={store}"]) == 0
    rows = _read_csv(out / "runs.csv")
    assert list(rows[0]) == CSV_COLUMNS and set(REQUIRED) <= set(rows[0])
    claim = CLAIMS[name]
    for arm in claim.arms:
        for seed in ("0", "1"):
            mine = [r for r in rows if r["arm"] == arm and r["seed"] == seed]
            assert mine and mine[0]["step"] == "0" and mine[0]["eval_accuracy"] != ""
            steps = [int(r["step"]) for r in mine]
            assert steps == list(range(len(steps))) and len(steps) >= 3
            assert mine[-1]["eval_accuracy"] != ""           # the final evaluation
            assert int(mine[-1]["samples"]) == steps[-1] * 2 * 2   # prompts x n per step
    if name == "c3":   # offline: epochs over the file, which the ledger keeps with its hash
        assert max(float(r["epoch"]) for r in rows) == pytest.approx(2.0)
        import hashlib

        (off,) = (out / "runs").glob("offline-*.jsonl")
        entry = json.loads((out / "runs" / "offline-agro-seed0.json").read_text())
        assert entry["offline_sha256"] == hashlib.sha256(off.read_bytes()).hexdigest()
    for png in [f"accuracy_vs_{claim.x}.png"] + (["accuracy_vs_kl.png"] if claim.kl_plot else []):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "verdict.md").read_text()
    assert f"# {name}:" in md and "**Verdict:" in md and "Quick mode" in md
    v = json.loads((out / "verdict.json").read_text())
    assert v["verdict"] in (stats.REPRODUCED, stats.NOT_REPRODUCED, stats.INCONCLUSIVE)
    assert not v["missing"] and v["sweep"]["runs_finished"] == len(claim.arms) * 2
    # every finished run dropped its checkpoints (only logs are kept)
    assert not list(Path(store).glob("*/seed*/checkpoints"))


def _repro(args, env_extra=None, cwd=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "agro.cli", "repro", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _rows(out: Path, arm: str, seed: str = "0") -> list[dict]:
    return [dict(r) for r in _read_csv(out / "runs.csv")
            if r["arm"] == arm and r["seed"] == seed]


def test_killed_sweep_resumes_skips_finished_runs_and_reproduces_rows(tmp_path, store):
    """One arm, killed (SIGKILL) while writing its second checkpoint (the background writer
    starts it only after the first is complete, so a complete one is always there; a kill in
    step 2's backward could find the first still being written), then re-run: it resumes from
    its checkpoint, finished runs are skipped, and its rows equal those of the same arm run
    uninterrupted (the module's shared store ran it without a kill)."""
    st = tmp_path / "store"
    args = ["c1", "--out", str(tmp_path / "a"), "--quick", f"store={st}", "arms=agro", "seeds=0"]
    r = _repro(args, {"AGRO_FAULT": "checkpoint:2"})
    assert r.returncode == -9, r.stderr[-2000:]
    assert not list(st.glob("agro-*/seed0/done.json"))
    r = _repro(args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(resuming)" in r.stdout
    r = _repro(args)                    # nothing left: skipped, not re-run
    assert r.returncode == 0 and "(starting)" not in r.stdout and "(resuming)" not in r.stdout
    # the same sweep extended by an arm (a claim that gained arms): the recorded agro run stays
    # byte for byte, only kl_pg runs
    before = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()
              and "agro" in str(p.relative_to(tmp_path / "a")) and p.name != "arms.yaml"}
    agro_rows = _rows(tmp_path / "a", "agro")
    r = _repro(args[:-2] + ["arms=agro,kl_pg", "seeds=0"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "arm kl_pg seed 0 (starting)" in r.stdout and "arm agro seed 0 (" not in r.stdout
    assert before and all(p.read_bytes() == b for p, b in before.items())
    assert _rows(tmp_path / "a", "agro") == agro_rows and _rows(tmp_path / "a", "kl_pg")
    ref = tmp_path / "ref"
    assert _repro(["c1", "--out", str(ref), "--quick", f"store={store}", "arms=agro",
                   "seeds=0"]).returncode == 0
    assert _rows(tmp_path / "a", "agro") == _rows(ref, "agro")



def test_an_unfinished_run_resumes_only_on_the_code_that_started_it(tmp_path, monkeypatch):
    """A run directory with a complete checkpoint resumes only if its started.json names the
    code that runs now; one started by other code (or before started.json existed) starts again,
    so no run finishes on one revision what another began (the sweep's numbers would then come
    from neither)."""
    from agro import checkpoint
    from agro.repro.runner import STARTED, Sweep, same_code

    assert same_code("abc1234", "abc1234") and not same_code("abc1234", "abc1235")
    assert not same_code("unknown", "unknown") and not same_code(None, None)

    monkeypatch.setenv("AGRO_CODE_REV", "rev-b")
    sw = Sweep("c1", tmp_path / "out", store=tmp_path / "st", quick=True, seeds=[0], arms=["agro"])
    d = tmp_path / "run"
    assert sw.resumable(d) == (False, "")                      # nothing there
    d.mkdir()
    assert sw.resumable(d) == (False, "no complete checkpoint")
    monkeypatch.setattr(checkpoint, "latest_checkpoint", lambda out, verify=False: out / "ck")
    ok, why = sw.resumable(d)                                   # from before started.json
    assert not ok and "not recorded" in why
    (d / STARTED).write_text(json.dumps({"code": "rev-a"}))
    ok, why = sw.resumable(d)
    assert not ok and "rev-a" in why and "rev-b" in why
    (d / STARTED).write_text(json.dumps({"code": "rev-b"}))
    assert sw.resumable(d) == (True, "")
    monkeypatch.setenv("AGRO_CODE_REV", "unknown")             # without git: never resumed
    (d / STARTED).write_text(json.dumps({"code": "unknown"}))
    assert not Sweep("c1", tmp_path / "out", store=tmp_path / "st", quick=True, seeds=[0],
                     arms=["agro"]).resumable(d)[0]
    (d / "done.json").write_text("{}")                          # finished: nothing to resume
    assert sw.resumable(d) == (False, "")


def test_paper_table_reports_each_claims_verdict_and_pending_runs(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "paper_table", Path(__file__).resolve().parents[1] / "scripts" / "paper_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = tmp_path / "docs" / "paper" / "c2"
    d.mkdir(parents=True)
    (d / "verdict.json").write_text(json.dumps({
        "verdict": stats.INCONCLUSIVE, "missing": ["agro_on (seeds done: [0])"],
        "pitfall_verdict": stats.REPRODUCED,
        "sweep": {"runs_finished": 4, "runs_total": 12, "wall_seconds_sum": 3600.0}}))
    t = mod.table(tmp_path)
    line = [x for x in t.splitlines() if x.startswith("| C2")][0]
    assert "pending (inconclusive at this scale so far)" in line and "4 of 12" in line
    assert "§4.6 prediction: reproduced" in line and "1.00 h" in line
    assert [x for x in t.splitlines() if x.startswith("| C1")][0].count("not run yet") == 1


def test_paper_compare_reads_each_seeds_first_and_last_evaluation_and_flags_a_difference(tmp_path):
    """scripts/paper_compare.py: per arm, each seed's first (base) and last evaluated rows in file
    order as agro.repro.verdicts reads them (unevaluated rows skipped), mean ± se, the
    independent-means difference flagged beyond 2 se (either side of the cut), recorded settings
    that differ, the §4.6 parts side by side; bad input names its file and line or field."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location(
        "paper_compare", Path(__file__).resolve().parents[1] / "scripts" / "paper_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    head = "arm,seed,step,eval_accuracy,eval_kl\n"

    def sweep(root, rows, verdict, estimate, beta=0.02):
        d = root / "c2"
        d.mkdir(parents=True)
        (d / "runs.csv").write_text(head + "".join(rows))
        (d / "verdict.json").write_text(json.dumps({
            "verdict": verdict, "missing": [], "pitfall_verdict": verdict,
            "parts": [{"part": "p", "estimate": estimate, "verdict": verdict}],
            "pitfall_parts": [{"part": "q", "estimate": estimate + "q", "verdict": verdict}],
            "sweep": {"runs_finished": 3, "runs_total": 3, "code_revisions": {"abc": 3}}}))
        (d / "arms.yaml").write_text(yaml.safe_dump({"arms": {
            "x": {"settings": {"beta": beta, "lr": 1e-5}, "code_by_seed": {0: estimate}},
            "y": {"settings": {"lr": 1e-5}, "wall_seconds_by_seed": {0: len(estimate)},
                  "code_by_seed": {0: estimate}}}}))

    first, rerun = tmp_path / "a", tmp_path / "b"
    # seeds interleaved; step 5 unevaluated; base 0.1/0.2/0.3, final 0.40/0.50/0.60, se 0.0577
    sweep(first, ["x,0,0,0.1,0\n", "x,1,0,0.2,0\n", "x,2,0,0.3,0\n", "x,0,20,0.4,1.0\n",
                  "x,1,5,,\n", "x,1,20,0.5,2.0\n", "x,2,20,0.6,3.0\n"], stats.INCONCLUSIVE, "e1")
    sweep(rerun, ["x,0,20,0.90,1.0\n", "x,1,20,0.91,2.0\n", "x,2,20,0.92,3.0\n"],
          stats.REPRODUCED, "e2", beta=0.5)
    assert mod.evals(first / "c2" / "runs.csv")["x"] == {
        0: [(0.1, 0.0), (0.4, 1.0)], 1: [(0.2, 0.0), (0.5, 2.0)], 2: [(0.3, 0.0), (0.6, 3.0)]}
    t = mod.compare(first, rerun, "c2")
    row = [x for x in t.splitlines() if x.startswith("| x |")][0].split(" | ")
    assert row[1:7] == ["3 / 3", "0.200 ± 0.058", "0.910 ± 0.006", "0.500 ± 0.058",
                        "0.910 ± 0.006", "+0.410 ± 0.058 (differs)"]
    assert row[7:] == ["2.000 ± 0.577", "2.000 ± 0.577", "+0.000 ± 0.816 |"]
    assert "| p | e1 | inconclusive at this scale | e2 | reproduced |" in t
    assert "| q | e1q | inconclusive at this scale | e2q | reproduced |" in t
    assert "§4.6 prediction: reproduced" in t and "code abc (3)" in t
    assert "**x: recorded settings differ** (beta)" in t          # code_by_seed is not a setting
    assert "y: recorded" not in t                                  # nor are the other run fields
    # the cut at 2 se, from either side: se of the difference is 0.1 here
    a = [-0.1 * math.sqrt(3), 0.0, 0.1 * math.sqrt(3)]            # mean 0, se 0.1
    assert mod.mean_se(a)[1] == pytest.approx(0.1)
    assert "differs" in mod.diff(a, [0.21, 0.21, 0.21])
    assert "differs" not in mod.diff(a, [0.19, 0.19, 0.19])
    assert "differs" in mod.diff([0.5] * 3, [0.6] * 3)             # no spread, yet not equal
    assert mod.diff([0.5], [0.9, 0.8]) == "+0.350"                 # one seed: no se, no flag
    (first / "c2" / "runs.csv").write_text(head + "\nx,0,20,0.4,1.0\nx,0,20,high,1.0\n")
    with pytest.raises(SystemExit, match=r"a/c2/runs.csv, line 4: bad field"):
        mod.evals(first / "c2" / "runs.csv")
    (first / "c2" / "runs.csv").write_text(head + "x,0,20,nan,1.0\n")
    with pytest.raises(SystemExit, match=r"line 2: bad field.*not finite"):
        mod.evals(first / "c2" / "runs.csv")
    (first / "c2" / "runs.csv").write_text("arm,seed,step,eval_acc\n")
    with pytest.raises(SystemExit, match=r"runs.csv, line 1: no column eval_accuracy"):
        mod.evals(first / "c2" / "runs.csv")
    (first / "c2" / "runs.csv").write_text(head + "x,0,20,0.4,1.0\n")
    (rerun / "c2" / "verdict.json").write_text(json.dumps(
        {"verdict": "x", "parts": [{"part": "p"}], "pitfall_parts": [{}]}))
    with pytest.raises(SystemExit, match=r"b/c2/verdict.json: a part \(number 2\) has no field 'part'"):
        mod.compare(first, rerun, "c2")


def test_paper_run_metrics_keeps_exactly_the_recorded_runs(tmp_path):
    """scripts/paper_run_metrics.py: a store run is read only when it is the run arms.yaml records
    (code and wall time; not a prefix-named arm's), rows of runs gone from the store stay while
    still recorded with that code, and two store runs matching one record stop it."""
    import importlib.util

    import yaml

    spec = importlib.util.spec_from_file_location(
        "paper_run_metrics", Path(__file__).resolve().parents[1] / "scripts" / "paper_run_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    claim, store = tmp_path / "c7", tmp_path / "store"
    claim.mkdir()

    def record(walls, codes):
        (claim / "arms.yaml").write_text(yaml.safe_dump({"arms": {
            "a": {"code_by_seed": codes, "wall_seconds_by_seed": walls},
            "a-b": {"code_by_seed": {0: "r1"}, "wall_seconds_by_seed": {0: 5.0}}}}))

    def run(name, seed, code, wall, weight):
        d = store / name / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "done.json").write_text(json.dumps({"code": code, "wall_seconds": wall}))
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(
            {"step": s, "is_weight_mean": weight, "loss": 0.0}) for s in (1, 2)) + "\n")

    def main(*args):
        import sys
        old, sys.argv = sys.argv, ["paper_run_metrics", str(claim), "--store", str(store)]
        try:
            mod.main()
        finally:
            sys.argv = old
        return {(r["arm"], r["seed"], r["step"]): r["is_weight_mean"]
                for r in _read_csv(claim / "run_metrics.csv")}

    record({0: 10.0, 1: 7.0}, {0: "r1", 1: "r1"})
    run("a-0abc", 0, "r1", 10.0412, 0.5)      # the recorded run of a, seed 0
    run("a-0abd", 1, "r2", 7.0, 0.6)          # other code: not the recorded run
    run("a-0abg", 1, "r1", 8.0, 0.6)          # same code, another wall time: a re-run, not it
    run("a-b-0abc", 0, "r1", 5.0, 0.7)        # arm a-b, not a
    assert main() == {("a", "0", "1"): "0.5", ("a", "0", "2"): "0.5",
                      ("a-b", "0", "1"): "0.7", ("a-b", "0", "2"): "0.7"}
    import shutil

    shutil.rmtree(store / "a-0abc")           # the store is lost: the rows stay
    assert main()[("a", "0", "1")] == "0.5"
    record({0: 11.0, 1: 7.0}, {0: "r3", 1: "r1"})   # a re-run of seed 0 by other code: dropped
    assert ("a", "0", "1") not in main()
    run("a-0abe", 0, "r3", 11.0, 0.8)
    run("a-0abf", 0, "r3", 11.0, 0.9)
    with pytest.raises(SystemExit, match="both match"):
        main()


def test_paper_run_metrics_summary_counts_the_masked_steps(tmp_path):
    """--summary: per arm and seed, the steps where grpo masked any token, the largest and the
    mean masked share, the lags seen and the grading timeouts (what PAPER.md quotes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "paper_run_metrics", Path(__file__).resolve().parents[1] / "scripts" / "paper_run_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [("g", 0, 1, "0.0", "0.0", "1.0", "0"), ("g", 0, 2, "1.0", "0.1", "0.4", "2"),
            ("g", 0, 3, "1.0", "0.0", "0.7", "0"), ("a", 1, 1, "0.0", "", "", "0")]
    (tmp_path / "run_metrics.csv").write_text(
        "arm,seed,step,code,staleness_mean,is_weight_above_cap_fraction,is_weight_mean,"
        "grade_timeouts\n"
        + "".join(f"{a},{s},{t},r1,{lag},{m},{w},{to}\n" for a, s, t, lag, m, w, to in rows))
    assert mod.summary(tmp_path / "run_metrics.csv") == [
        "a: seed 1: 1 steps, lag [0.0], no IS, grade timeouts 0",
        "g: seed 0: 3 steps, lag [0.0, 1.0], masked in 1 of 3 steps, max 0.100, mean 0.0333, "
        "IS weight mean 0.700 (lowest step 0.400), grade timeouts 2"]
    # an arm whose recorded settings truncate (arms.yaml beside the file) says so
    (tmp_path / "arms.yaml").write_text(
        "arms:\n  g:\n    settings:\n      loss_options: {is_mode: sequence_truncate}\n")
    assert mod.summary(tmp_path / "run_metrics.csv")[1].startswith(
        "g: seed 0: 3 steps, lag [0.0, 1.0], truncated in 1 of 3 steps")


def test_runs_made_before_a_field_was_added_are_still_found(tmp_path, tokenizer_dir):
    """A newer agro adds TrainConfig fields (at defaults that keep old behaviour) or renames one
    (config.RENAMED): its digest of an arm differs, but a finished run whose config.yaml lacks only
    those fields, or has a field under its old name, is reused; a run that differs in a real
    setting is not."""
    import shutil

    import yaml

    from agro.repro.runner import Sweep

    st = tmp_path / "store"
    sw = Sweep("c1", tmp_path / "out", store=st, quick=True, seeds=[0], arms=["agro"])
    sw.run(0)
    sw.close()
    exact = sw.run_dir(ARMS["agro"], 0)
    old = exact.parent.with_name("agro-0123456789") / "seed0"
    shutil.move(str(exact.parent), str(old.parent))
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    cfg.pop("grad_accum")                         # as written before the field existed
    cfg["vllm_on_policy"] = cfg.pop("sampler_on_policy")   # ... and before it was renamed
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert sw.run_dir(ARMS["agro"], 0) == old and not sw.pending()
    cfg["lr"] = cfg["lr"] * 2                     # a real difference: not the same run
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert sw.run_dir(ARMS["agro"], 0) != old and sw.pending()


def test_a_clone_without_the_store_rerenders_from_the_ledger_and_claims_share_runs(
        tmp_path, monkeypatch, capsys):
    """The run store is gone (a fresh clone): the claim's committed ledger (OUT/runs/) re-renders
    the same runs.csv without running anything; a sibling claim takes the shared arm's finished
    run and the base evaluation from it instead of running them, but only when made by the code
    that runs now; a changed setting, a damaged ledger file or reuse=false do not adopt."""
    import shutil

    import yaml

    from agro.repro.ledger import LedgerError
    from agro.repro.runner import Sweep

    st, paper = tmp_path / "store", tmp_path / "paper"
    c1 = paper / "c1"
    sw = Sweep("c1", c1, store=st, quick=True, seeds=[0], arms=["agro"])
    sw.run(0)
    sw.write_outputs()
    sw.close()
    before = (c1 / "runs.csv").read_bytes()
    # --render of a store run whose base evaluation is nowhere: an error, not an evaluation
    from agro.cli import main

    (base,) = st.glob("base-*")
    aside = tmp_path / "base-aside"
    base.rename(aside)
    capsys.readouterr()
    assert main(["repro", "c1", "--out", str(tmp_path / "render-nobase" / "c1"), "--quick",
                 "--render", f"store={st}", "arms=agro", "seeds=0"]) == 2
    assert "--render: the base model's evaluation for seed 0" in capsys.readouterr().err
    assert not list(st.glob("base-*"))
    aside.rename(base)
    assert (c1 / "runs" / "agro-seed0.json").is_file()
    for d in st.iterdir():                    # the store is lost; the tiny model keeps its path
        if d.name != "tiny-model":
            shutil.rmtree(d)

    lines: list[str] = []
    sw = Sweep("c1", c1, store=st, quick=True, seeds=[0], arms=["agro"], log=lines.append)
    assert sw.pending() == [] and sw.run(0) == 0
    sw.write_outputs()
    assert (c1 / "runs.csv").read_bytes() == before
    assert sorted(d.name for d in st.iterdir()) == ["tiny-model"]     # nothing ran or evaluated

    # --render: renders what is finished (a copy of the ledger: the same runs.csv), and with
    # nothing finished (an empty OUT) runs and evaluates nothing
    shown, empty = tmp_path / "render" / "c1", tmp_path / "render-empty" / "c1"
    shutil.copytree(c1, shown)
    capsys.readouterr()
    for out, pending in ((shown, 0), (empty, 1)):
        assert main(["repro", "c1", "--out", str(out), "--quick", "--render", f"store={st}",
                     "arms=agro", "seeds=0"]) == 0
        assert f"runs still pending: {pending}" in capsys.readouterr().out
        assert sorted(d.name for d in st.iterdir()) == ["tiny-model"]
    assert (shown / "runs.csv").read_bytes() == before
    assert len((empty / "runs.csv").read_text().splitlines()) == 1     # the header only

    lines.clear()
    c4 = paper / "c4"
    sw = Sweep("c4", c4, store=st, quick=True, seeds=[0], arms=["agro", "replay-p0.5"],
               log=lines.append)
    assert [(a.name, s) for a, s in sw.pending()] == [("replay-p0.5", 0)]
    sw.run(0)
    sw.write_outputs()
    sw.close()
    assert any("agro seed 0: finished, recorded in" in x for x in lines)
    assert any("base model evaluation, seed 0: recorded in" in x for x in lines)
    assert not list(st.glob("agro-*")) and list(st.glob("replay-p0.5-*/seed0/done.json"))
    assert _rows(c4, "agro") == _rows(c1, "agro")
    assert _rows(c4, "replay-p0.5")[0] == dict(_rows(c1, "agro")[0], arm="replay-p0.5")
    arms_doc = yaml.safe_load((c4 / "arms.yaml").read_text())
    assert arms_doc["arms"]["agro"]["adopted_from_by_seed"] == {0: "c1/runs/agro-seed0.json"}
    assert json.loads((c4 / "runs" / "agro-seed0.json").read_text())["adopted_from"] == \
        "c1/runs/agro-seed0.json"

    # other code: its own record still re-renders; another claim's runs and base evaluation are
    # not taken (equal settings, other samples)
    monkeypatch.setenv("AGRO_CODE_REV", "another-revision")
    other = Sweep("c4", paper / "c4b", store=st, quick=True, seeds=[0], arms=["agro"])
    assert [(a.name, s) for a, s in other.pending()] == [("agro", 0)]
    assert other.ledger().base_eval(0, other._base_matches) is None
    assert Sweep("c1", c1, store=st, quick=True, seeds=[0], arms=["agro"]).pending() == []
    monkeypatch.delenv("AGRO_CODE_REV")

    assert json.loads((c4 / "runs" / "agro-seed0.json").read_text())["rows"] == \
        json.loads((c1 / "runs" / "agro-seed0.json").read_text())["rows"]   # c4 is self-contained
    shutil.rmtree(c4)
    p = c1 / "runs" / "agro-seed0.json"
    good = p.read_text()
    assert Sweep("c1", c1, store=st, quick=True, seeds=[0], arms=["agro"], reuse=False).pending()
    doc = json.loads(good)
    doc["config"]["lr"] *= 2                  # a real difference: not the same run
    p.write_text(json.dumps(doc))
    assert Sweep("c1", c1, store=st, quick=True, seeds=[0], arms=["agro"]).pending()
    del doc["rows"]
    p.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match=r"agro-seed0\.json: missing field 'rows'"):
        Sweep("c1", c1, store=st, quick=True, seeds=[0], arms=["agro"]).pending()

    # a claim's own record wins over a store run of the same arm (another claim's, or this
    # code's), whatever code made each; a store run made by other code is not reused
    p.write_text(good)
    check = paper / "c1-check"
    sw = Sweep("c1", check, store=st, quick=True, seeds=[0], arms=["agro"], reuse=False)
    sw.run(0)                                   # agro seed 0 in the store, made by this code
    sw.close()
    doc = json.loads(good)
    doc["done"]["code"] = "older-revision"
    doc["rows"][1]["reward_mean"] = 0.123456
    p.write_text(json.dumps(doc))
    sw = Sweep("c1", c1, store=st, quick=True, seeds=[0], arms=["agro"])
    assert sw.finished(ARMS["agro"], 0)[0] == "ledger"
    sw.write_outputs()
    assert _rows(c1, "agro")[1]["reward_mean"] == "0.123456"
    (done,) = st.glob("agro-*/seed0/done.json")
    assert Sweep("c1", check, store=st, quick=True, seeds=[0], arms=["agro"],
                 reuse=False).pending() == []
    d = json.loads(done.read_text())
    d["code"] = "other-revision"
    done.write_text(json.dumps(d))
    assert Sweep("c1", check, store=st, quick=True, seeds=[0], arms=["agro"],
                 reuse=False).pending()
