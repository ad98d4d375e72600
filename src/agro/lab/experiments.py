"""Tabular experiments: the paper's Figure 1 and the on-policy pitfall of §4.6 (agro_math.md §9, §4.6).

Both run plain SGD on tabular softmax logits, theta <- theta - eta * grad_theta(loss), where the
loss is the real `agro.losses.compute_loss` on sampled groups of n responses per prompt.
`compute_loss` averages over its B rows (1/B convention); with P independent prompts (problem
instances) batched in one call B = P * n, so we minimise P * compute_loss, i.e. the sum of the
per-prompt losses: each prompt then gets exactly the §9 update
    theta += eta * d,   d = (1/n) sum_i (e_{y_i} - pi) * w_i,
with w_i the estimator's per-sample weight (AGRO: R_i - loo_i(R); KL-PG: r_i - loo_i(r) - beta l_i).
After a first update through `compute_loss` (which validates everything), the loop calls the
registered loss function `agro.losses.LOSSES[name].fn` directly: the same code minus input checks and
metrics, which halves the cost of a step (equality is tested in tests/test_lab.py).
`train_exact` / `train_exact_on_policy` integrate the *expected* updates (closed forms for softmax
bandits, checked against enumerated expectations of compute_loss in tests/test_math_reference.py).

Departures from the paper: the sizes (K = 10, beta = 0.1, n = 4, eta = 0.5, 20,000 updates) are the
choices of agro_math.md §9, not the paper's (stripped from its text). The pitfall experiment is
beyond the paper (§4.6). Random numbers come from torch, not numpy, so individual instances differ
from the §9 measurements; the thresholds are the same. Pitfall finding beyond §4.6: at beta = 0.3
exact descent on L_on raises P(success) but does not always reach pi* (on some instances a success
arm with small pi_ref loses its mass: L_on -> 0 on the boundary, the §2 caveat).
"""
from __future__ import annotations

import csv
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from agro.lab.tabular import (
    DTYPE, TabularProblem, kl_to_optimal, loss_inputs, needs_token_kl, optimal_logprobs,
    policy_probs, run_loss, sample_responses,
)

__all__ = [
    "single_thread", "TrainCurve", "train_sampled", "expected_direction", "train_exact",
    "train_exact_on_policy", "figure1_problem", "pitfall_problem", "figure1", "pitfall",
]


@contextmanager
def single_thread():
    """Run tiny-tensor loops on one intra-op thread, then restore the previous setting.

    Each update is a few dozen ops on tensors of ~100 elements; with several threads on a busy
    machine the synchronisation costs more than the work (measured: 15x slower on 2 loaded cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class TrainCurve:
    """A logged training run. steps: [L] update counts (0 = before training); values: [L, P]."""

    steps: list[int]
    values: Tensor
    theta: Tensor


def train_sampled(problem: TabularProblem, method: str, *, steps: int, n: int, eta: float,
                  behaviour: str = "reference", metric: Callable[[Tensor], Tensor],
                  log_every: int = 100, generator: torch.Generator | None = None,
                  fast: bool = True, **options) -> TrainCurve:
    """SGD on the logits with sampled groups fed to `compute_loss(method, ...)`.

    problem:   P prompts (instances), trained jointly but independently.
    behaviour: "reference" (mu = pi_ref, fixed: offline data as in Figure 1) or "policy"
               (fresh on-policy samples from the current pi every update).
    metric:    theta [P, N, V] -> [P], logged every `log_every` updates and at the end.
    options:   passed to compute_loss (lr_coef, lr_baseline, reg_estimator, ...).
    fast:      after a first update through `compute_loss` (which validates name, options and
               inputs), call the registered loss function directly (`run_loss(fast=True)`).
    Each update: theta <- theta - eta * grad(P * compute_loss) (one group of n per prompt).
    """
    if behaviour not in ("reference", "policy"):
        raise ValueError(f"behaviour must be 'reference' or 'policy', got {behaviour!r}")
    with single_thread():
        return _train_sampled(problem, method, steps, n, eta, behaviour, metric, log_every,
                              generator, fast, options)


def _train_sampled(problem, method, steps, n, eta, behaviour, metric, log_every, generator, fast,
                   options) -> TrainCurve:
    """Body of train_sampled (same arguments), run inside single_thread()."""
    P = problem.P
    theta = problem.init_theta()                                            # [P, N, V]
    want_kl = needs_token_kl(method, **options)
    if behaviour == "reference":                                            # pre-sample all data
        mu = policy_probs(problem, problem.ref_logits)                      # [P, M]
        data = sample_responses(mu, steps * n, generator).view(P, steps, n).transpose(0, 1)
    logged_steps, values = [], []

    def log(step: int) -> None:
        with torch.no_grad():
            logged_steps.append(step)
            values.append(metric(theta).detach().clone())

    log(0)
    for step in range(1, steps + 1):
        if behaviour == "reference":
            ys = data[step - 1]                                             # [P, n]
        else:
            with torch.no_grad():
                ys = sample_responses(policy_probs(problem, theta), n, generator)
        inputs = loss_inputs(problem, theta, ys, with_token_kl=want_kl)
        loss = run_loss(method, inputs, problem.beta, fast=fast and step > 1, **options) * P
        (grad,) = torch.autograd.grad(loss, theta)
        with torch.no_grad():
            theta -= eta * grad
        if step % log_every == 0 or step == steps:
            log(step)
    return TrainCurve(logged_steps, torch.stack(values), theta.detach())


# ----------------------------------------------------------------------------------------------
# Exact-gradient (deterministic) Figure-1 dynamics, bandit only
# ----------------------------------------------------------------------------------------------
def expected_direction(method: str, theta: Tensor, ref_logits: Tensor, rewards: Tensor,
                       beta: float, mu: Tensor) -> Tensor:
    """Expected ascent direction E[d] of the §9 estimators for a bandit, closed form (§3.3, §9).

    theta, ref_logits, rewards, mu: [P, K] (mu = behaviour probabilities, fixed). Returns [P, K].
      agro  : mu * (R - E_mu R)                          = -grad L(pi, mu) / beta
      kl_pg : mu * (r - E_mu r - beta l) + beta pi E_mu[l]
    (E_mu[s(y) f(y)] = mu * f - pi E_mu f for softmax logits.)
    """
    lp = torch.log_softmax(theta, -1)
    l = lp - torch.log_softmax(ref_logits, -1)
    if method == "agro":
        R = rewards - beta * l
        return mu * (R - (mu * R).sum(-1, keepdim=True))
    if method == "kl_pg":
        er = (mu * rewards).sum(-1, keepdim=True)
        return mu * (rewards - er - beta * l) + beta * lp.exp() * (mu * l).sum(-1, keepdim=True)
    raise ValueError(f"expected_direction: unknown method {method!r} (agro, kl_pg)")


def train_exact(problem: TabularProblem, methods: Sequence[str] = ("agro", "kl_pg"), *,
                steps: int, eta: float, log_every: int | None = None) -> dict[str, TrainCurve]:
    """Deterministic Figure-1 dynamics theta += eta * E[d], mu = pi_ref fixed, bandit only (§9).

    Same directions as `expected_direction`, written as one numpy loop over all methods and
    prompts at once (1e5 updates take about a second), using
        d_kl_pg = d_agro + beta * (pi - mu) * E_mu[l]
    (KL-PG lacks AGRO's LOO baseline on l, whose expectation is beta * E_mu[s] E_mu[l] and
    E_mu[s] = mu - pi). Returns {method: TrainCurve} with values = normalized KL [L, P].
    """
    if problem.T != 1:
        raise ValueError("train_exact is for bandits (T = 1)")
    coef = {"agro": 0.0, "kl_pg": 1.0}
    unknown = [m for m in methods if m not in coef]
    if unknown:
        raise ValueError(f"train_exact: unknown method(s) {unknown}; valid: {sorted(coef)}")
    beta = problem.beta
    ref = problem.ref_logits[:, 0].numpy()                                  # [P, K]
    lref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    mu = np.exp(lref)
    r0 = problem.rewards.numpy() - (mu * problem.rewards.numpy()).sum(-1, keepdims=True)  # r - E_mu r
    cb = beta * np.array([coef[m] for m in methods]).reshape(-1, 1, 1)      # [S, 1, 1]
    theta = np.stack([ref] * len(methods))                                  # [S, P, K]
    norm = _normalized_kl(problem)
    log_every = log_every or steps
    logged, vals = [], []

    def log(step: int) -> None:
        logged.append(step)
        vals.append(torch.stack([norm(torch.from_numpy(th)[:, None]) for th in theta]))

    log(0)
    for step in range(1, steps + 1):
        # sum(d) = 0 keeps sum(theta) fixed, so exp(theta) cannot overflow: no max-shift needed
        e = np.exp(theta)
        z = e.sum(-1, keepdims=True)
        l = theta - np.log(z) - lref                                        # log pi - log pi_ref
        el = (mu * l).sum(-1, keepdims=True)                                # E_mu[l]
        theta += eta * (mu * (r0 - beta * (l - el)) + cb * (e / z - mu) * el)
        if step % log_every == 0 or step == steps:
            log(step)
    values = torch.stack(vals)                                              # [L, S, P]
    return {m: TrainCurve(logged, values[:, i], torch.from_numpy(theta[i])[:, None])
            for i, m in enumerate(methods)}


def train_exact_on_policy(problem: TabularProblem, lr_coefs: Sequence[float] = (1.0, 0.0), *,
                          steps: int, eta: float, log_every: int | None = None
                          ) -> dict[float, TrainCurve]:
    """Deterministic descent on the on-policy loss, theta -= eta * E[grad agro_on], bandit (§4.1, §4.6).

    E[grad compute_loss("agro_on", lr_coef=c)] = (g_PD + c * g_LR) / beta, closed form for softmax
    logits with dR = R_pi - E_pi R_pi:
        (g_PD + c g_LR) / beta = pi * ( -dR + c * (dR^2 - E_pi dR^2) / (2 beta) )
    c = 1 is exact descent on L_on / beta; c = 0 is PD only (= exact RLOO / on-policy AGRO-off).
    One numpy loop over all lr_coefs and prompts. Returns {lr_coef: TrainCurve} with values =
    P(success) = E_pi r [L, P] (the expected reward; a success probability for binary rewards).
    """
    if problem.T != 1:
        raise ValueError("train_exact_on_policy is for bandits (T = 1)")
    beta = problem.beta
    ref = problem.ref_logits[:, 0].numpy()                                  # [P, K]
    lref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    r = problem.rewards.numpy()                                             # [P, K]
    c = np.array(lr_coefs, dtype=np.float64).reshape(-1, 1, 1) / (2 * beta)  # [S, 1, 1]
    theta = np.stack([ref] * len(lr_coefs))                                 # [S, P, K]
    log_every = log_every or steps
    logged, vals = [], []

    def log(step: int) -> None:
        e = np.exp(theta - theta.max(-1, keepdims=True))
        logged.append(step)
        vals.append(torch.from_numpy((e / e.sum(-1, keepdims=True) * r).sum(-1)))

    log(0)
    for step in range(1, steps + 1):
        lp = theta - theta.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        p = np.exp(lp)
        R = r - beta * (lp - lref)
        dR = R - (p * R).sum(-1, keepdims=True)
        sq = dR * dR
        theta -= eta * p * (c * (sq - (p * sq).sum(-1, keepdims=True)) - dR)
        if step % log_every == 0 or step == steps:
            log(step)
    values = torch.stack(vals)                                              # [L, S, P]
    return {float(k): TrainCurve(logged, values[:, i], torch.from_numpy(theta[i])[:, None])
            for i, k in enumerate(lr_coefs)}


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------
def figure1_problem(K: int = 10, beta: float = 0.1, instances: int = 10,
                    generator: torch.Generator | None = None) -> TabularProblem:
    """§9: theta_ref ~ N(0, I_K), r ~ U[0, 1]^K, one bandit prompt per instance."""
    ref = torch.randn(instances, K, dtype=DTYPE, generator=generator)
    r = torch.rand(instances, K, dtype=DTYPE, generator=generator)
    return TabularProblem.bandit(ref, r, beta)


def pitfall_problem(K: int = 10, beta: float = 0.1, p_ref: float = 0.28, successes: int = 3,
                    instances: int = 5, generator: torch.Generator | None = None) -> TabularProblem:
    """§4.6: K-armed bandits with binary rewards and reference success probability p_ref exactly.

    theta_ref ~ N(0, I_K); `successes` random arms get reward 1 and have their logits shifted by
    one constant so that sum_{success} pi_ref = p_ref.
    """
    ref = torch.randn(instances, K, dtype=DTYPE, generator=generator)
    perm = torch.argsort(torch.rand(instances, K, generator=generator), -1)
    r = torch.zeros(instances, K, dtype=DTYPE).scatter_(1, perm[:, :successes], 1.0)
    p = (torch.softmax(ref, -1) * r).sum(-1, keepdim=True)
    shift = math.log(p_ref / (1 - p_ref)) - torch.log(p / (1 - p))         # log-odds correction
    return TabularProblem.bandit(ref + shift * r, r, beta)


def _normalized_kl(problem: TabularProblem) -> Callable[[Tensor], Tensor]:
    base = kl_to_optimal(problem, problem.ref_logits)                       # [P]
    return lambda theta: kl_to_optimal(problem, theta) / base


def _success(problem: TabularProblem) -> Callable[[Tensor], Tensor]:
    return lambda theta: (policy_probs(problem, theta) * problem.rewards).sum(-1)


# ----------------------------------------------------------------------------------------------
# Figure 1
# ----------------------------------------------------------------------------------------------
def figure1(out_dir: str | Path, K: int = 10, beta: float = 0.1, n: int = 4, eta: float = 0.5,
            steps: int = 20000, instances: int = 10, log_every: int = 100, seed: int = 0,
            methods: Sequence[str] = ("agro", "kl_pg"), plot: bool = True,
            verbose: bool = True) -> dict[str, dict[str, float]]:
    """Reproduce Figure 1 (§9): off-policy data from mu = pi_ref, AGRO converges to pi*, KL-PG not.

    Writes out_dir/figure1.csv (method,instance,step,normalized_kl) and out_dir/figure1.png.
    All methods see the same problem instances and the same sampled data.
    Returns {method: {"median": ..., "max": ..., "min": ...}} of the final normalized KL.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    problem = figure1_problem(K, beta, instances, gen)
    data_seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    metric = _normalized_kl(problem)
    curves, summary = {}, {}
    t0 = time.perf_counter()
    for method in methods:
        curves[method] = train_sampled(problem, method, steps=steps, n=n, eta=eta,
                                       behaviour="reference", metric=metric, log_every=log_every,
                                       generator=torch.Generator().manual_seed(data_seed))
        final = curves[method].values[-1]
        summary[method] = {"median": final.quantile(0.5).item(), "max": final.max().item(),
                           "min": final.min().item()}
    elapsed = time.perf_counter() - t0
    with open(out / "figure1.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "instance", "step", "normalized_kl"])
        for method, c in curves.items():
            for i in range(instances):
                for j, s in enumerate(c.steps):
                    w.writerow([method, i, s, repr(c.values[j, i].item())])
    if plot:
        _plot(out / "figure1.png", curves, ylabel="KL(pi_t || pi*) / KL(pi_ref || pi*)",
              title=f"Figure 1: off-policy data (mu = pi_ref), K={K}, beta={beta}, n={n}, "
                    f"eta={eta}, {instances} instances", logy=True)
    if verbose:
        print(f"figure1: {steps} updates x {instances} instances x {len(methods)} methods "
              f"in {elapsed:.1f}s -> {out}")
        for m, s in summary.items():
            print(f"  {m:8s} final normalized KL: median {s['median']:.3g}  max {s['max']:.3g}  "
                  f"min {s['min']:.3g}")
    return summary


# ----------------------------------------------------------------------------------------------
# Pitfall of the exact on-policy loss (§4.6)
# ----------------------------------------------------------------------------------------------
def pitfall(out_dir: str | Path, K: int = 10, p_ref: float = 0.28, successes: int = 3, n: int = 4,
            eta: float = 0.5, steps: int = 2000, instances: int = 5,
            betas: Sequence[float] = (0.1, 0.3), lr_coefs: Sequence[float] = (1.0, 0.0),
            lr_baseline: str = "none", log_every: int = 25, seed: int = 0, plot: bool = True,
            verbose: bool = True) -> dict[tuple[float, float], dict[str, float]]:
    """On-policy AGRO (Eq. 6, `agro_on`) on binary-reward bandits: P(success) over updates (§4.6).

    For every beta and lr_coef (weight on the likelihood-ratio part g_LR; 0 = PD only = off-policy
    AGRO on fresh samples), trains `instances` bandits with fresh on-policy groups of n.
    Writes out_dir/pitfall.csv (method,lr_coef,beta,instance,step,p_success) and pitfall.png.
    Returns {(beta, lr_coef): {"median", "min", "max", "p_star", "kl_median"}}: final P(success)
    over instances, pi*'s success probability, and the median final KL(pi||pi*).
    Expected: beta = 0.1, lr_coef = 1 collapses P(success) towards 0 (p_ref < 1/2 - beta);
    lr_coef = 0 rises to pi*'s success probability; at beta = 0.3 both rise.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, summary, curves = [], {}, {}
    t0 = time.perf_counter()
    for beta in betas:
        gen = torch.Generator().manual_seed(seed)                           # same instances per beta
        problem = pitfall_problem(K, beta, p_ref, successes, instances, gen)
        p_star = (optimal_logprobs(problem).exp() * problem.rewards).sum(-1)
        for coef in lr_coefs:
            c = train_sampled(problem, "agro_on", steps=steps, n=n, eta=eta, behaviour="policy",
                              metric=_success(problem), log_every=log_every,
                              generator=torch.Generator().manual_seed(seed + 1),
                              lr_coef=float(coef), lr_baseline=lr_baseline)
            curves[f"beta={beta}, lr_coef={coef}"] = c
            final = c.values[-1]
            kl = kl_to_optimal(problem, c.theta)
            summary[(beta, coef)] = {"median": final.quantile(0.5).item(), "min": final.min().item(),
                                     "max": final.max().item(), "p_star": p_star.quantile(0.5).item(),
                                     "kl_median": kl.quantile(0.5).item()}
            for i in range(instances):
                for j, s in enumerate(c.steps):
                    rows.append(["agro_on", coef, beta, i, s, repr(c.values[j, i].item())])
    elapsed = time.perf_counter() - t0
    with open(out / "pitfall.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "lr_coef", "beta", "instance", "step", "p_success"])
        w.writerows(rows)
    if plot:
        _plot(out / "pitfall.png", curves, ylabel="P(success)",
              title=f"On-policy AGRO (Eq. 6), binary rewards, K={K}, p_ref={p_ref}, n={n}, "
                    f"eta={eta}", logy=False)
    if verbose:
        print(f"pitfall: {len(curves)} runs x {instances} instances x {steps} updates "
              f"in {elapsed:.1f}s -> {out}")
        for (beta, coef), s in summary.items():
            print(f"  beta={beta:<4} lr_coef={coef:<4} final P(success): median {s['median']:.3g}"
                  f"  [{s['min']:.3g}, {s['max']:.3g}]   pi*: {s['p_star']:.5g}"
                  f"   median KL(pi||pi*): {s['kl_median']:.3g}")
    return summary


LOG_FLOOR = 1e-16   # float64 round-off: a KL below this (even slightly negative) is drawn here


def _plot(path: Path, curves: dict[str, TrainCurve], ylabel: str, title: str, logy: bool) -> None:
    """Median line and min-max band over instances per curve (log scale: floored at LOG_FLOOR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        v = c.values.numpy()                                                # [L, P]
        vals = v.clip(min=LOG_FLOOR) if logy else v
        line, = ax.plot(c.steps, np.median(vals, 1), label=name)
        ax.fill_between(c.steps, vals.min(1), vals.max(1), color=line.get_color(), alpha=0.2)
    if logy:
        ax.set_yscale("log")
        ax.axhline(LOG_FLOOR, color="gray", lw=0.8, ls=":")
        ax.text(0, LOG_FLOOR * 3, "float64 round-off floor", fontsize=7, color="gray")
    ax.set_xlabel("update")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
