"""The 14 numerical tests of agro_math.md §10, against the project's own code.

Exact quantities come from agro.lab.tabular (enumeration over all responses / n-tuples, float64,
autograd); estimator gradients are autograd through the real agro.losses.compute_loss on tabular
policies (agro.lab.tabular.loss_inputs / run_loss). Tolerances are 1e-10 (true autograd): a wrong
sign, a factor of 2 or a missing baseline moves these quantities by O(1e-2) or more.

Convention (§0): compute_loss's gradient is the loss gradient divided by beta, so
E[grad compute_loss("agro")] = grad L(pi, mu) / beta and E[grad compute_loss("agro_on")] =
grad L_on / beta.
"""
import math

import pytest
import torch

from agro.lab import tabular as tb
from agro.lab.experiments import figure1_problem, pitfall_problem, train_exact

TOL = 1e-10


def close(a, b, tol=TOL):
    d = float((torch.as_tensor(a) - torch.as_tensor(b)).detach().abs().max())
    assert d < tol, d


def far(a, b, gap=1e-4):
    d = float((torch.as_tensor(a) - torch.as_tensor(b)).detach().abs().max())
    assert d > gap, d


def loss_fn(name, beta, **opts):
    return lambda inp: tb.run_loss(name, inp, beta, **opts)


@pytest.fixture
def bandit():
    g = torch.Generator().manual_seed(0)
    K, beta = 4, 0.3
    prob = tb.TabularProblem.bandit(torch.randn(K, dtype=tb.DTYPE, generator=g),
                                    torch.rand(K, dtype=tb.DTYPE, generator=g), beta)
    theta = prob.init_theta() + torch.randn(1, 1, K, dtype=tb.DTYPE, generator=g)
    mu = torch.softmax(torch.randn(1, K, dtype=tb.DTYPE, generator=g), -1)
    return prob, theta, mu


@pytest.fixture
def seqprob():
    g = torch.Generator().manual_seed(1)
    prob = tb.TabularProblem.random(V=3, T=2, beta=0.2, generator=g)
    theta = prob.init_theta() + 0.5 * torch.randn(prob.ref_logits.shape, dtype=tb.DTYPE, generator=g)
    return prob, theta


def mean_score_term(prob, theta, w, f):
    """sum_y w(y) s(y) f(y) for prompt 0: [N, V]."""
    s = tb.scores(prob, theta)[0]                                    # [M, N, V]
    return torch.einsum("m,mnv->nv", w[0] * f[0], s)


# 1
@pytest.mark.parametrize("which", ["bandit", "seq"])
def test_01_theorem1_generation_consistency(bandit, seqprob, which):
    prob = bandit[0] if which == "bandit" else seqprob[0]
    star = tb.optimal_logits(prob)
    R = tb.regularized_reward(prob, star)
    close(R, tb.optimal_value(prob)[:, None].expand_as(R), 1e-12)
    close(prob.seq_logprobs(star), tb.optimal_logprobs(prob), 1e-12)


# 2
def test_02_lemma5(seqprob):
    prob, theta = seqprob
    p = tb.policy_probs(prob, theta)
    ER = (p * tb.regularized_reward(prob, theta)).sum(-1)
    kl = tb.kl_to_optimal(prob, theta)
    close(kl, (tb.optimal_value(prob) - ER) / prob.beta, 1e-12)
    Jstar = tb.objective(prob, tb.optimal_logits(prob))
    close(Jstar - tb.objective(prob, theta), prob.beta * kl, 1e-12)
    assert float(kl) > 1e-3


# 3, 4
def test_03_04_lemma3_and_decomposition(bandit):
    prob, theta, mu = bandit
    g = tb.gradient(lambda th: tb.consistency_loss(prob, th, mu), theta)[0]
    R = tb.regularized_reward(prob, theta).detach()
    ER = (mu * R).sum(-1, keepdim=True)
    close(g, -prob.beta * mean_score_term(prob, theta, mu, R - ER))
    r = prob.rewards
    reward_term = -prob.beta * mean_score_term(prob, theta, mu, r - (mu * r).sum(-1, keepdim=True))
    l = lambda th: prob.seq_logprobs(th) - prob.ref_seq_logprobs
    var_l = lambda th: 0.5 * (mu * (l(th) - (mu * l(th)).sum(-1, keepdim=True)) ** 2).sum(-1)
    close(g, reward_term + prob.beta ** 2 * tb.gradient(var_l, theta)[0])
    far(g, reward_term, 1e-3)  # the regularization part is really there


# 5
def test_05_on_policy_pd_lr(seqprob):
    prob, theta = seqprob
    g_pd, g_lr = tb.pd_lr_gradients(prob, theta)
    close(g_pd, -prob.beta * tb.gradient(lambda th: tb.objective(prob, th), theta))
    close(tb.gradient(lambda th: tb.on_policy_loss(prob, th), theta), g_pd + g_lr)
    p = tb.policy_probs(prob, theta).detach()
    R = tb.regularized_reward(prob, theta).detach()
    close(g_lr[0], mean_score_term(prob, theta, p, 0.5 * (R - (p * R).sum(-1, keepdim=True)) ** 2))


# 6
@pytest.mark.parametrize("n", [2, 3])
def test_06_eq4_unbiased_off_policy(bandit, n):
    prob, theta, mu = bandit
    mean, _ = tb.expected_gradient(prob, theta, mu[0], n, loss_fn("agro", prob.beta))
    target = tb.gradient(lambda th: tb.consistency_loss(prob, th, mu), theta)[0] / prob.beta
    close(mean, target)
    # KL-PG is NOT unbiased for this loss off-policy
    mk, _ = tb.expected_gradient(prob, theta, mu[0], n, loss_fn("kl_pg", prob.beta))
    far(mk, target)


# 7
@pytest.mark.parametrize("ys", [(0, 2, 2, 3), (1, 3), (2, 2, 0)])
def test_07_per_sample_identity(bandit, ys):
    prob, theta, _ = bandit
    resp = torch.tensor([ys])
    th = theta.detach().clone().requires_grad_(True)
    inp = tb.loss_inputs(prob, th, resp, with_token_kl=False)
    (g,) = torch.autograd.grad(tb.run_loss("agro", inp, prob.beta), th)
    n = len(ys)

    def sample_var(t):
        R = tb.regularized_reward(prob, t)[0, list(ys)]
        if n == 2:
            return 0.25 * (R[0] - R[1]) ** 2
        return 0.5 * ((R - R.mean()) ** 2).sum() / (n - 1)
    close(g * prob.beta, tb.gradient(sample_var, theta))


# 8
@pytest.mark.parametrize("n", [2, 3, 4])
def test_08_eq6_unbiased_on_policy(bandit, n):
    prob, theta, mu = bandit
    p = tb.policy_probs(prob, theta).detach()[0]
    target = tb.gradient(lambda th: tb.on_policy_loss(prob, th), theta)[0] / prob.beta
    mean, _ = tb.expected_gradient(prob, theta, p, n, loss_fn("agro_on", prob.beta))
    close(mean, target)
    if n >= 3:
        mv, _ = tb.expected_gradient(prob, theta, p, n,
                                     loss_fn("agro_on", prob.beta, lr_baseline="loo_var"))
        close(mv, target)
    vr, _ = tb.expected_gradient(prob, theta, p, n, loss_fn("agro_on", prob.beta, lr_baseline="loo_sq"))
    pd_only, _ = tb.expected_gradient(prob, theta, p, n, loss_fn("agro_on", prob.beta, lr_coef=0.0))
    if n == 2:
        close(vr, pd_only)          # n = 2: delta_1 == delta_2, the VR LR term vanishes
    if n == 3:
        far(vr, target)             # the §4.3 variance-reduced variant is biased
    # Eq. (6) on samples from mu != pi is biased
    mb, _ = tb.expected_gradient(prob, theta, mu[0], n, loss_fn("agro_on", prob.beta))
    far(mb, target)


# 9
def test_09_fixed_points(bandit):
    prob, _, mu = bandit
    star = tb.optimal_logits(prob)
    tuples, _ = tb.enumerate_tuples(mu[0], 3)
    for name in ("agro", "agro_on"):
        g = tb.per_group_gradients(prob, star, tuples, loss_fn(name, prob.beta))
        close(g, torch.zeros_like(g), 1e-12)
    close(tb.gradient(lambda th: tb.on_policy_loss(prob, th), star), 0.0, 1e-12)
    ek, _ = tb.expected_gradient(prob, star, mu[0], 3, loss_fn("kl_pg", prob.beta))
    far(ek, torch.zeros_like(ek))
    pstar = tb.policy_probs(prob, star)[0]
    ek_star, _ = tb.expected_gradient(prob, star, pstar, 3, loss_fn("kl_pg", prob.beta))
    close(ek_star, torch.zeros_like(ek_star))


# 10
def test_10_figure1_exact_dynamics():
    prob = figure1_problem(instances=10, generator=torch.Generator().manual_seed(0))
    curves = train_exact(prob, ("agro", "kl_pg"), steps=100_000, eta=0.5)
    assert float(curves["agro"].values[-1].max()) < 1e-6
    assert float(curves["kl_pg"].values[-1].min()) > 1e-3


# 11
def test_11_token_level_estimators():
    g = torch.Generator().manual_seed(2)
    prob = tb.TabularProblem.random(V=3, T=3, beta=0.5, generator=g)
    prob.rewards.zero_()                      # isolate the regularization gradient
    theta = prob.init_theta() + 0.7 * torch.randn(prob.ref_logits.shape, dtype=tb.DTYPE, generator=g)
    p = tb.policy_probs(prob, theta).detach()[0]
    target = tb.gradient(lambda th: tb.kl_to_ref(prob, th), theta)[0]  # grad KL(pi||pi_ref)
    variances = {}
    for est in ("vanilla", "causal", "local", "local_plus"):
        mean, var = tb.expected_gradient(prob, theta, p, 2,
                                         loss_fn("agro", prob.beta, reg_estimator=est))
        close(mean / prob.beta, target)  # with r = 0: E[grad] = beta * grad KL
        variances[est] = float(var)
    assert variances["vanilla"] > variances["local_plus"]
    tok, _ = tb.expected_gradient(prob, theta, p, 2, loss_fn("kl_pg_token", prob.beta))
    far(tok / prob.beta, target)           # per-token KL penalty is biased on-policy


def _per_response_grads(prob, theta, key, mu_logits=None):
    M = prob.rewards.shape[1]
    resp = torch.arange(M)[None]
    out = []
    for m in range(M):
        th = theta.detach().clone().requires_grad_(True)
        s = tb.token_surrogates(prob, th, resp, mu_logits=mu_logits)[key][0, m]
        out.append(torch.autograd.grad(s, th)[0][0])
    return torch.stack(out)                # [M, N, V]


# 12
def test_12_b3_low_variance_square():
    g = torch.Generator().manual_seed(3)
    prob = tb.TabularProblem.random(V=3, T=3, beta=0.5, generator=g)
    theta = prob.init_theta() + 0.7 * torch.randn(prob.ref_logits.shape, dtype=tb.DTYPE, generator=g)
    p = tb.policy_probs(prob, theta).detach()[0]
    gsq, sl2 = (_per_response_grads(prob, theta, k) for k in ("gsq", "sl2"))
    m1, m2 = torch.einsum("m,mnv->nv", p, gsq), torch.einsum("m,mnv->nv", p, sl2)
    close(m1, m2)
    v = lambda G, m: float(torch.einsum("m,m->", p, ((G - m) ** 2).sum((1, 2))))
    assert v(gsq, m1) < v(sl2, m2)


# 13
def test_13_off_policy_token_level():
    g = torch.Generator().manual_seed(4)
    prob = tb.TabularProblem.random(V=3, T=3, beta=0.5, generator=g)
    theta = prob.init_theta() + 0.7 * torch.randn(prob.ref_logits.shape, dtype=tb.DTYPE, generator=g)
    mu_logits = torch.randn(prob.ref_logits.shape, dtype=tb.DTYPE, generator=g)
    mu = tb.policy_probs(prob, mu_logits)[0]
    l = lambda th: prob.seq_logprobs(th) - prob.ref_seq_logprobs
    target = tb.gradient(lambda th: 0.5 * (mu * l(th) ** 2).sum(-1), theta)[0]
    E = lambda k: torch.einsum("m,mnv->nv", mu, _per_response_grads(prob, theta, k, mu_logits))
    close(E("g1"), target)
    close(E("g_local_off"), target)
    far(E("g2"), target)                   # dropping the lower triangle is invalid off-policy


# 14
def test_14_pitfall_exact_on_policy_descent():
    prob = pitfall_problem(beta=0.1, instances=1, generator=torch.Generator().manual_seed(0))
    succ = lambda th: float((tb.policy_probs(prob, th) * prob.rewards).sum())
    p_ref = succ(prob.ref_logits)
    assert abs(p_ref - 0.28) < 1e-12
    p_star = succ(tb.optimal_logits(prob))
    th_on, th_pd = prob.init_theta(), prob.init_theta()
    eta = 0.5 / prob.beta
    for _ in range(3000):
        th_on = th_on - eta * tb.gradient(lambda th: tb.on_policy_loss(prob, th), th_on)
        th_pd = th_pd - eta * tb.pd_lr_gradients(prob, th_pd)[0]
    assert succ(th_on) < p_ref / 2, succ(th_on)          # exact L_on descent collapses
    # PD-only (= off-policy AGRO on fresh samples) heads to pi*: P(success) rises towards
    # p_star and KL(pi || pi*) falls by orders of magnitude.
    kl0 = float(tb.kl_to_optimal(prob, prob.ref_logits))
    assert succ(th_pd) > 0.99 and p_star > 0.99
    assert float(tb.kl_to_optimal(prob, th_pd)) < 1e-2 * kl0
