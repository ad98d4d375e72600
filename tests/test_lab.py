"""The tabular lab: CLI smoke runs, the sampled trainer against the §9 update written out by hand,
and the Figure-1 / pitfall outcomes on short runs (agro_math.md §9, §4.6)."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from agro.cli import cmd_lab as lab_main
from agro.lab.experiments import (
    figure1, figure1_problem, pitfall_problem, single_thread, train_sampled,
)
from agro.lab.tabular import DTYPE, TabularProblem, kl_to_ref, policy_probs, sample_responses


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster on a shared machine (restored after)."""
    with single_thread():
        yield


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def run_cli(*args):
    out = subprocess.run([sys.executable, "-m", "agro.cli", "lab", *args], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_cli_figure1_smoke(tmp_path):
    stdout = run_cli("figure1", f"out={tmp_path}", "steps=200", "instances=2")
    header, rows = read_csv(tmp_path / "figure1.csv")
    assert header == ["method", "instance", "step", "normalized_kl"]
    assert len(rows) == 2 * 2 * 3                      # methods x instances x steps {0, 100, 200}
    assert {r[0] for r in rows} == {"agro", "kl_pg"}
    assert {int(r[2]) for r in rows} == {0, 100, 200}
    assert all(float(r[3]) == 1.0 for r in rows if r[2] == "0")   # normalized KL of pi_ref
    assert (tmp_path / "figure1.png").stat().st_size > 10_000
    assert "agro" in stdout and "median" in stdout


def test_cli_pitfall_smoke_and_outcome(tmp_path):
    run_cli("pitfall", f"out={tmp_path}", "steps=300", "instances=2", "log_every=100")
    header, rows = read_csv(tmp_path / "pitfall.csv")
    assert header == ["method", "lr_coef", "beta", "instance", "step", "p_success"]
    assert len(rows) == 2 * 2 * 2 * 4                  # betas x lr_coefs x instances x steps
    assert (tmp_path / "pitfall.png").exists()
    final = {}
    for method, coef, beta, inst, step, p in rows:
        assert method == "agro_on"
        if step == "300":
            final.setdefault((float(beta), float(coef)), []).append(float(p))
        if step == "0":
            assert abs(float(p) - 0.28) < 1e-12
    assert max(final[(0.1, 1.0)]) < 0.05               # exact Eq. 6 at beta = 0.1: collapse
    assert min(final[(0.1, 0.0)]) > 0.9                # PD only: towards pi* (0.9999)
    assert min(final[(0.3, 1.0)]) > 0.7 and min(final[(0.3, 0.0)]) > 0.7


def test_lab_main_rejects_bad_arguments(capsys):
    assert lab_main(["figure1"]) == 2                  # out= is required
    assert lab_main(["nonsense", "out=x"]) == 2


def test_figure1_agro_far_below_kl_pg_with_default_settings(tmp_path):
    s = figure1(tmp_path, steps=2000, plot=False, verbose=False)
    assert s["agro"]["median"] < 0.1 * s["kl_pg"]["median"], s
    assert s["agro"]["max"] < s["kl_pg"]["median"], s
    assert s["kl_pg"]["min"] > 1e-2, s                 # KL-PG plateaus away from pi*


@pytest.mark.parametrize("method", ["agro", "kl_pg"])
def test_sampled_trainer_is_the_section9_update(method):
    """theta <- theta - eta grad(P * compute_loss) == theta += eta (1/n) sum_i (e_y - pi) w_i per prompt."""
    gen = torch.Generator().manual_seed(4)
    pb = figure1_problem(K=5, beta=0.1, instances=3, generator=gen)
    steps, n, eta, beta = 30, 4, 0.5, 0.1
    curve = train_sampled(pb, method, steps=steps, n=n, eta=eta, behaviour="reference",
                          metric=lambda th: kl_to_ref(pb, th), log_every=10,
                          generator=torch.Generator().manual_seed(9))
    mu = policy_probs(pb, pb.ref_logits)
    data = sample_responses(mu, steps * n, torch.Generator().manual_seed(9)).view(3, steps, n)
    lref = torch.log_softmax(pb.ref_logits[:, 0], -1)
    theta = pb.ref_logits[:, 0].clone()                                      # [P, K]
    for s in range(steps):
        ys = data[:, s]                                                      # [P, n]
        lp = torch.log_softmax(theta, -1)
        l, r = (lp - lref).gather(1, ys), pb.rewards.gather(1, ys)           # [P, n]
        loo = lambda v: (v.sum(1, keepdim=True) - v) / (n - 1)               # noqa: E731
        w = r - beta * l - loo(r - beta * l) if method == "agro" else r - loo(r) - beta * l
        score = torch.nn.functional.one_hot(ys, 5).to(DTYPE) - lp.exp()[:, None]   # [P, n, K]
        theta = theta + eta * (w[..., None] * score).mean(1)
    assert (curve.theta[:, 0] - theta).abs().max().item() < 1e-12


def test_fast_path_equals_compute_loss():
    """run_loss(fast=True) (registered loss function) and compute_loss give the same training run."""
    pb = TabularProblem.random(3, 2, 0.2, prompts=2, generator=torch.Generator().manual_seed(0))
    for method, opts in [("agro_on", {"lr_coef": 0.5, "lr_baseline": "loo_sq",
                                      "reg_estimator": "local_plus"}),
                         ("kl_pg_token", {})]:
        runs = [train_sampled(pb, method, steps=20, n=3, eta=0.3, behaviour="policy",
                              metric=lambda th: kl_to_ref(pb, th), fast=fast,
                              generator=torch.Generator().manual_seed(1), **opts)
                for fast in (True, False)]
        assert (runs[0].theta - runs[1].theta).abs().max().item() < 1e-13
        assert (runs[0].theta - pb.ref_logits).abs().max().item() > 1e-2   # it did move


def test_pitfall_problem_has_exact_p_ref():
    pb = pitfall_problem(K=10, beta=0.1, p_ref=0.28, successes=3, instances=4,
                         generator=torch.Generator().manual_seed(0))
    p = (policy_probs(pb, pb.ref_logits) * pb.rewards).sum(-1)
    assert (p - 0.28).abs().max().item() < 1e-12
    assert (pb.rewards.sum(-1) == 3).all()
