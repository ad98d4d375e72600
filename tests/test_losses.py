"""Hand-computed checks of agro.losses (STYLE.md test layer 1: hand-computed loss gradients).

Expected gradients are written either as explicit numbers or as plain-Python formulas over lists
(loops, explicit leave-one-out means). They never call the module's helpers. Each is compared with
autograd of compute_loss in float64 at 1e-10. The toy batch has G = 2 groups of n = 3 samples, T = 3
tokens, with padding; the padded slots hold garbage, which must not leak.
"""

import math

import pytest
import torch

from agro import losses
from agro.losses import compute_loss

TOL = 1e-10
F64 = torch.float64

# ---- toy batch: G = 2, n = 3, T = 3 -------------------------------------------------------------
N, T, B = 3, 3, 6
BETA = 0.3
PAD = 3.7  # garbage in padded slots
LP = [[-0.5, -1.2, -0.3], [-0.8, -0.4, PAD], [-1.5, PAD, PAD],
      [-0.2, -0.9, -1.1], [-0.7, -0.6, PAD], [-1.0, -0.3, -0.4]]
REF = [[-0.6, -1.0, -0.5], [-0.9, -0.2, -PAD], [-1.1, PAD, -PAD],
       [-0.4, -0.8, -1.0], [-0.5, -0.9, PAD], [-1.2, -0.1, -0.6]]
MASK = [[1, 1, 1], [1, 1, 0], [1, 0, 0],
        [1, 1, 1], [1, 1, 0], [1, 1, 1]]
REW = [1.0, 0.0, 1.0, 0.5, 0.0, 2.0]
TOKKL = [[0.3, 0.1, 0.2], [0.05, 0.4, PAD], [0.2, PAD, PAD],
         [0.1, 0.15, 0.25], [0.3, 0.2, PAD], [0.12, 0.07, 0.5]]


# ---- plain-Python reference (no agro helpers) ----------------------------------------------------
def seq(x, b, mask=MASK):
    """sum over completion tokens of row b."""
    return sum(x[b][t] for t in range(len(mask[b])) if mask[b][t])


def seq_logratio(b, lp=LP, ref=REF, mask=MASK):
    return sum(lp[b][t] - ref[b][t] for t in range(len(mask[b])) if mask[b][t])


def loo(v, n=N):
    """leave-one-out mean within contiguous groups of n."""
    out = []
    for i in range(len(v)):
        g = (i // n) * n
        out.append((sum(v[g:g + n]) - v[i]) / (n - 1))
    return out


def sequence_weight_grad(w, mask=MASK, lengths=None):
    """d loss / d logprobs[b, t] = -mask * w_b / B (divided by |y_b| for the 'mean' reduction)."""
    nb = len(w)
    return [[-mask[b][t] * w[b] / nb / (lengths[b] if lengths else 1) for t in range(len(mask[b]))]
            for b in range(nb)]


def run(name, lp=LP, ref=REF, mask=MASK, rew=REW, n=N, beta=BETA, dtype=F64, **options):
    """compute_loss on list inputs. Returns (loss, metrics, grad wrt logprobs, grad wrt token_kl or None)."""
    lp_t = torch.tensor(lp, dtype=dtype, requires_grad=True)
    leaves = [lp_t]
    tk = options.get("token_kl")
    if isinstance(tk, list):
        tk = options["token_kl"] = torch.tensor(tk, dtype=dtype, requires_grad=True)
        leaves.append(tk)
    loss, metrics = compute_loss(name, lp_t, torch.tensor(ref, dtype=dtype), torch.tensor(mask, dtype=dtype),
                                 torch.tensor(rew, dtype=dtype), n, beta, **options)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return loss.detach(), metrics, grads[0], (grads[1] if len(grads) > 1 else None)


def assert_close(got, expected, tol=TOL):
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=got.dtype), rtol=0, atol=tol)


def agro_weights(beta=BETA, lp=LP, ref=REF, mask=MASK, rew=REW, n=N, lengths=None):
    l = [seq_logratio(b, lp, ref, mask) / (lengths[b] if lengths else 1) for b in range(len(rew))]
    R = [rew[b] - beta * l[b] for b in range(len(rew))]
    loo_R = loo(R, n)
    return [R[b] - loo_R[b] for b in range(len(rew))], R, l


# ---- registry ------------------------------------------------------------------------------------
def test_registry_lists_every_loss_and_its_options():
    assert losses.available_losses() == ["agro", "agro_on", "grpo", "kl_pg", "kl_pg_token"]
    assert set(losses.LOSSES) == set(losses.available_losses())
    opts = losses.loss_options("agro_on")
    assert opts["lr_coef"] == 1.0 and opts["lr_baseline"] == "none" and opts["reg_estimator"] == "vanilla"
    assert opts["logprob_reduction"] == "sum" and opts["on_policy"] is None
    assert "lr_coef" not in losses.loss_options("agro")


def test_exported_helpers_on_explicit_numbers():
    v = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 5.0], dtype=F64)
    assert_close(losses.loo_mean(v, 3), [4.0, 3.5, 1.5, 4.5, 2.5, 2.0])
    x = torch.tensor([[1.0, 2.0, float("inf")], [3.0, float("nan"), 0.5]], dtype=F64)
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=F64)
    assert_close(losses.sequence_sum(x, m), [3.0, 3.5])
    assert_close(losses.sequence_logprob(x, m, "mean"), [1.5, 1.75])


# ---- agro (Eq. 4, §3.2) --------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [BETA, 0.0])
def test_agro_gradient_by_hand(beta):
    w, _, _ = agro_weights(beta)
    _, _, g, _ = run("agro", beta=beta)
    assert_close(g, sequence_weight_grad(w))


def test_agro_two_samples_explicit_numbers():
    # l = [0.2, -0.1], R = r - 0.5 l = [0.9, 0.05], A = R - loo(R) = [0.85, -0.85], grad = -A / B
    _, _, g, _ = run("agro", lp=[[-1.0], [-2.0]], ref=[[-1.2], [-1.9]], mask=[[1], [1]], rew=[1.0, 0.0],
                     n=2, beta=0.5)
    assert_close(g, [[-0.425], [0.425]])


def _exact_sample_variance_loss(lp_t, n, beta, ref=REF, mask=MASK, rew=REW):
    """1/(2(n-1)) sum_i (R_i - Rbar)^2 averaged over groups, divided by beta (§3.2), written in the test."""
    m = torch.tensor(mask, dtype=F64)
    lr = torch.where(m.bool(), lp_t - torch.tensor(ref, dtype=F64), torch.zeros((), dtype=F64))
    R = torch.tensor(rew, dtype=F64) - beta * lr.sum(-1)
    Rg = R.view(-1, n)
    return (((Rg - Rg.mean(-1, keepdim=True)) ** 2).sum(-1) / (2 * (n - 1))).mean() / beta


def test_agro_gradient_is_exact_sample_variance_loss_over_beta():
    loss, metrics, g, _ = run("agro")
    lp_t = torch.tensor(LP, dtype=F64, requires_grad=True)
    exact = _exact_sample_variance_loss(lp_t, N, BETA)
    (g_exact,) = torch.autograd.grad(exact, lp_t)
    exact = exact.detach()
    assert_close(g, g_exact)
    # documented value: (C(R) - C(r)) / beta, with C(r) = mean over groups of half the sample variance of r
    c_r = (((1 - 2 / 3) ** 2 + (2 / 3) ** 2 + (1 - 2 / 3) ** 2) / 4 + ((0.5 - 2.5 / 3) ** 2 + (2.5 / 3) ** 2
                                                                       + (2 - 2.5 / 3) ** 2) / 4) / 2
    assert abs(float(loss) - (float(exact) - c_r / BETA)) < TOL
    assert abs(metrics["consistency"] - BETA * float(exact)) < TOL


def test_agro_two_samples_equals_quarter_squared_difference():
    lp, ref, mask, rew = LP[:4], REF[:4], MASK[:4], [1.0, 0.0, 0.5, 2.0]
    _, _, g, _ = run("agro", lp=lp, ref=ref, mask=mask, rew=rew, n=2)
    lp_t = torch.tensor(lp, dtype=F64, requires_grad=True)
    m = torch.tensor(mask, dtype=F64)
    R = torch.tensor(rew, dtype=F64) - BETA * (torch.where(m.bool(), lp_t - torch.tensor(ref, dtype=F64), 0.0)).sum(-1)
    quarter = ((R[0] - R[1]) ** 2 / 4 + (R[2] - R[3]) ** 2 / 4) / 2 / BETA  # mean over the 2 groups
    (g_exact,) = torch.autograd.grad(quarter, lp_t)
    assert_close(g, g_exact)


def test_agro_value_at_beta_zero_is_minus_reward_logratio_covariance():
    loss, _, _, _ = run("agro", beta=0.0)
    l = [seq_logratio(b) for b in range(B)]
    cov = 0.0
    for g in (0, 3):
        rbar, lbar = sum(REW[g:g + 3]) / 3, sum(l[g:g + 3]) / 3
        cov += sum((REW[i] - rbar) * (l[i] - lbar) for i in range(g, g + 3)) / 2
    assert abs(float(loss) + cov / 2) < TOL


def test_agro_and_agro_on_gradients_vanish_when_regularized_rewards_are_constant_in_each_group():
    # l_i = r_i / beta + const_g  =>  R_i = -beta * const_g for every sample of the group (pi*-like)
    rew = [1.0, 0.0, 0.25, 0.5, 0.0, 2.0]
    const = [0.1, 0.1, 0.1, -0.2, -0.2, -0.2]
    lp = [[-1.0 + rew[b] / BETA + const[b]] for b in range(B)]
    ref = [[-1.0]] * B
    for name, opts in [("agro", {}), ("agro_on", {}), ("agro_on", {"lr_baseline": "loo_var"}),
                       ("agro_on", {"lr_baseline": "loo_sq"})]:
        _, metrics, g, _ = run(name, lp=lp, ref=ref, mask=[[1]] * B, rew=rew, **opts)
        assert_close(g, [[0.0]] * B, tol=1e-12)
        assert metrics["consistency"] < 1e-20


# ---- agro_on (Eqs. 5-6, §4.2-4.3) ---------------------------------------------------------------
def _lr_baseline_by_hand(kind, R, A, n=N):
    c = []
    for i in range(len(R)):
        g = (i // n) * n
        others = [j for j in range(g, g + n) if j != i]
        if kind == "none":
            c.append(0.0)
        elif kind == "loo_var":
            m = sum(R[j] for j in others) / (n - 1)
            c.append(n / (n - 1) * sum((R[j] - m) ** 2 for j in others) / (n - 2))
        else:  # loo_sq
            c.append(sum(A[j] ** 2 for j in others) / (n - 1))
    return c


@pytest.mark.parametrize("lr_baseline", ["none", "loo_var", "loo_sq"])
@pytest.mark.parametrize("lr_coef", [1.0, 0.4])
def test_agro_on_gradient_by_hand(lr_baseline, lr_coef):
    A, R, _ = agro_weights()
    c = _lr_baseline_by_hand(lr_baseline, R, A)
    w = [A[b] - lr_coef * (A[b] ** 2 - c[b]) / (2 * BETA) for b in range(B)]
    _, metrics, g, _ = run("agro_on", lr_coef=lr_coef, lr_baseline=lr_baseline)
    assert_close(g, sequence_weight_grad(w))
    assert abs(metrics["loss_lr"] - lr_coef * sum(A[b] ** 2 - c[b] for b in range(B)) / (2 * BETA) / B) < TOL


def test_agro_on_loo_var_baseline_explicit_numbers():
    # one group, R = r (l = 0): R = [0, 1, 3]; loo(R) = [2, 1.5, 0.5]; A = [-2, -0.5, 2.5]
    # c_0 = 3/2 * var{1, 3} = 3/2 * 2 = 3;  c_1 = 3/2 * var{0, 3} = 6.75;  c_2 = 3/2 * var{0, 1} = 0.75
    # w = A - (A^2 - c) / (2 * 0.5) = [-2 - 1, -0.5 + 6.5, 2.5 - 5.5] = [-3, 6, -3];  grad = -w / 3
    _, _, g, _ = run("agro_on", lp=[[-1.0]] * 3, ref=[[-1.0]] * 3, mask=[[1]] * 3, rew=[0.0, 1.0, 3.0],
                     beta=0.5, lr_baseline="loo_var")
    assert_close(g, [[1.0], [-2.0], [1.0]])


def test_agro_on_with_lr_coef_zero_equals_agro():
    _, _, g_agro, _ = run("agro")
    _, _, g_on, _ = run("agro_on", lr_coef=0.0)
    assert_close(g_on, g_agro)


@pytest.mark.parametrize("lr_coef", [1.0, 0.7])
def test_agro_on_two_samples_loo_sq_is_pd_only(lr_coef):
    kw = dict(lp=LP[:4], ref=REF[:4], mask=MASK[:4], rew=[1.0, 0.0, 0.5, 2.0], n=2)
    _, _, g_agro, _ = run("agro", **kw)
    _, metrics, g_on, _ = run("agro_on", lr_baseline="loo_sq", lr_coef=lr_coef, **kw)
    assert_close(g_on, g_agro)
    assert metrics["loss_lr"] == 0.0
    _, _, g_none, _ = run("agro_on", lr_coef=lr_coef, **kw)  # and the plain LR term is not zero there
    assert (g_none - g_agro).abs().max() > 1e-3


def test_agro_on_rejects_beta_zero_and_small_groups_for_loo_var():
    with pytest.raises(ValueError, match="beta must be > 0"):
        run("agro_on", beta=0.0)
    with pytest.raises(ValueError, match="loo_var.*group_size >= 3"):
        run("agro_on", lp=LP[:4], ref=REF[:4], mask=MASK[:4], rew=REW[:4], n=2, lr_baseline="loo_var")
    with pytest.raises(ValueError, match="lr_coef"):
        run("agro_on", lr_coef=-1.0)


# ---- kl_pg (§3.3), kl_pg_token (§3.4), grpo ------------------------------------------------------
def test_kl_pg_gradient_by_hand():
    l = [seq_logratio(b) for b in range(B)]
    loo_r = loo(REW)
    w = [(REW[b] - loo_r[b]) - BETA * l[b] for b in range(B)]
    _, _, g, _ = run("kl_pg")
    assert_close(g, sequence_weight_grad(w))


def test_kl_pg_two_samples_explicit_numbers():
    # l = [0.2, -0.1], r - loo(r) = [1, -1], w = [1 - 0.1, -1 + 0.05] = [0.9, -0.95], grad = -w / 2
    _, _, g, _ = run("kl_pg", lp=[[-1.0], [-2.0]], ref=[[-1.2], [-1.9]], mask=[[1], [1]], rew=[1.0, 0.0],
                     n=2, beta=0.5)
    assert_close(g, [[-0.45], [0.475]])


def test_kl_pg_token_gradient_by_hand():
    loo_r = loo(REW)
    _, metrics, g, g_kl = run("kl_pg_token", token_kl=TOKKL)
    assert_close(g, sequence_weight_grad([REW[b] - loo_r[b] for b in range(B)]))
    assert_close(g_kl, [[BETA * MASK[b][t] / B for t in range(T)] for b in range(B)])
    assert abs(metrics["kl_token"] - sum(seq(TOKKL, b) for b in range(B)) / B) < TOL


def grpo_adv(eps=1e-6):
    """GRPO's advantage from plain Python: (r - group mean) / (unbiased group std + eps)."""
    adv = []
    for b in range(B):
        grp = REW[(b // N) * N:(b // N) * N + N]
        mean = sum(grp) / N
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (N - 1))
        adv.append((REW[b] - mean) / (std + eps))
    return adv


def test_grpo_gradient_by_hand():
    adv = grpo_adv()
    expected = [[MASK[b][t] / (B * sum(MASK[b])) * (-adv[b] + BETA * (1 - math.exp(REF[b][t] - LP[b][t])))
                 if MASK[b][t] else 0.0 for t in range(T)] for b in range(B)]
    _, metrics, g, _ = run("grpo")
    assert_close(g, expected)
    assert abs(metrics["adv_abs_mean"] - sum(abs(a) for a in adv) / B) < TOL


def test_grpo_two_samples_explicit_numbers():
    # r = [1, 0]: mean 0.5, unbiased std sqrt(0.5); A = +-0.5/sqrt(0.5) = +-sqrt(0.5); beta = 0, T = 1
    _, _, g, _ = run("grpo", lp=[[-1.0], [-2.0]], ref=[[-1.2], [-1.9]], mask=[[1], [1]], rew=[1.0, 0.0],
                     n=2, beta=0.0, eps=1e-300)
    assert_close(g, [[-math.sqrt(0.5) / 2], [math.sqrt(0.5) / 2]])


# behaviour log-probs of a sampler that is not the current policy (some ratios above the cap)
BEH = [[-0.9, -0.2, PAD], [-0.8, -1.9, -PAD], [-0.1, PAD, PAD],
       [-1.5, -0.9, -0.1], [-0.7, -0.6, PAD], [-2.5, -0.3, -0.4]]


def is_weight_by_hand(b, t, mode, cap):
    """rho of TRL's vllm_importance_sampling_mode, from plain Python."""
    if mode.startswith("token"):
        rho = math.exp(LP[b][t] - BEH[b][t])
    else:
        rho = math.exp(sum(LP[b][u] - BEH[b][u] for u in range(T) if MASK[b][u]))
    if mode.endswith("truncate"):
        return min(rho, cap)
    return rho if rho <= cap else 0.0


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("cap", [1.5, 3.0])
def test_grpo_importance_weights_by_hand(mode, cap):
    adv = grpo_adv()
    rho = [[is_weight_by_hand(b, t, mode, cap) if MASK[b][t] else 0.0 for t in range(T)]
           for b in range(B)]
    assert any(0 < r < cap for row in rho for r in row) and \
        any(r in (0.0, cap) for b, row in enumerate(rho) for t, r in enumerate(row) if MASK[b][t]), \
        "the case must exercise both kept and capped/masked ratios"
    expected = [[MASK[b][t] / (B * sum(MASK[b])) * (-adv[b] * rho[b][t]
                                                   + BETA * (1 - math.exp(REF[b][t] - LP[b][t])))
                 if MASK[b][t] else 0.0 for t in range(T)] for b in range(B)]
    _, metrics, g, _ = run("grpo", is_mode=mode, is_cap=cap,
                           behavior_logprobs=torch.tensor(BEH, dtype=F64))
    assert_close(g, expected)
    toks = sum(map(sum, MASK))
    assert abs(metrics["is_weight_mean"] - sum(map(sum, rho)) / toks) < TOL


def test_grpo_importance_weights_are_one_on_policy_and_required_when_on():
    _, m0, g0, _ = run("grpo")
    for mode in ("token_mask", "sequence_truncate"):
        _, m1, g1, _ = run("grpo", is_mode=mode, behavior_logprobs=torch.tensor(LP, dtype=F64))
        assert_close(g1, g0)
        assert m1["is_weight_mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs behavior_logprobs"):
        run("grpo", is_mode="token_truncate")
    with pytest.raises(ValueError, match="is_mode"):
        run("grpo", is_mode="token", behavior_logprobs=torch.tensor(LP, dtype=F64))
    with pytest.raises(ValueError, match="is_cap"):
        run("grpo", is_mode="token_mask", is_cap=0.0, behavior_logprobs=torch.tensor(LP, dtype=F64))


# ---- on_policy gating ----------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [[True, False], [True, True, True, False, False, False]])
def test_off_policy_groups_get_exactly_the_agro_gradient_under_agro_on(flags):
    _, _, g_agro, _ = run("agro")
    _, _, g_on_all, _ = run("agro_on")
    _, metrics, g_mixed, _ = run("agro_on", on_policy=torch.tensor(flags))
    assert_close(g_mixed[3:], g_agro[3:])
    assert_close(g_mixed[:3], g_on_all[:3])
    assert metrics["on_policy_fraction"] == 0.5
    _, _, g_none, _ = run("agro_on", on_policy=False)
    assert_close(g_none, g_agro)


@pytest.mark.parametrize("name", ["agro", "kl_pg", "agro_on"])
def test_off_policy_groups_keep_the_vanilla_reg_estimator(name):
    # off-policy groups: vanilla g1 and (for agro_on) no LR term, i.e. exactly the off-policy form
    _, _, g_vanilla, _ = run("agro" if name == "agro_on" else name)
    _, _, g_causal, _ = run(name, reg_estimator="causal")
    _, _, g_mixed, _ = run(name, reg_estimator="causal", on_policy=torch.tensor([False, True]))
    assert_close(g_mixed[:3], g_vanilla[:3])
    assert_close(g_mixed[3:], g_causal[3:])
    assert (g_causal - g_vanilla).abs().max() > 1e-3


def test_on_policy_flags_must_be_constant_within_a_group():
    with pytest.raises(ValueError, match="same for all samples of a group"):
        run("agro_on", on_policy=torch.tensor([True, False, True, True, True, True]))
    with pytest.raises(ValueError, match="shape"):
        run("agro_on", on_policy=torch.tensor([True, False, True]))


# ---- token-level regularization estimators (§5) --------------------------------------------------
# Tiny case: one group of n = 2, T = 2, beta = 1, r = 0, ref = 0, so the token log-ratios are the logprobs:
#   y_1: l_t = [0.1, 0.2] (l = 0.3);  y_2: l_t = [0.3, -0.1] (l = 0.2);  loo(l) = [0.2, 0.3]
#   token KLs: y_1 [0.4, 0.1], y_2 [0.2, 0.3]
# agro ascent weight per token: beta*loo_b(l) - beta*(reg part);  grad = -(that) / B
TINY = dict(lp=[[0.1, 0.2], [0.3, -0.1]], ref=[[0.0, 0.0], [0.0, 0.0]], mask=[[1, 1], [1, 1]],
            rew=[0.0, 0.0], n=2, beta=1.0)
TINY_KL = [[0.4, 0.1], [0.2, 0.3]]


@pytest.mark.parametrize("estimator, expected", [
    # vanilla: reg part l_b            -> y_1: -(0.2-0.3)/2 = 0.05 ; y_2: -(0.3-0.2)/2 = -0.05
    ("vanilla", [[0.05, 0.05], [-0.05, -0.05]]),
    # causal: reg part sum_{s>=t} l_s  -> y_1: [0.3, 0.2] ; y_2: [0.2, -0.1]
    ("causal", [[0.05, 0.0], [-0.05, -0.2]]),
    # local: reg part sum_{s>t} l_s    -> y_1: [0.2, 0] ; y_2: [-0.1, 0]
    ("local", [[0.0, -0.1], [-0.2, -0.15]]),
    # local_plus: reg part sum_{s>t} KL_s -> y_1: [0.1, 0] ; y_2: [0.3, 0]
    ("local_plus", [[-0.05, -0.1], [0.0, -0.15]]),
])
def test_agro_reg_estimators_explicit_numbers(estimator, expected):
    _, _, g, g_kl = run("agro", reg_estimator=estimator, token_kl=TINY_KL, **TINY)
    assert_close(g, expected)
    kl_grad = 0.5 if estimator in ("local", "local_plus") else 0.0  # beta / B on every KL_t
    assert_close(g_kl, [[kl_grad, kl_grad], [kl_grad, kl_grad]])


def test_kl_pg_causal_estimator_explicit_numbers():
    # no LOO term on l: grad = +beta * sum_{s>=t} l_s / B
    _, _, g, _ = run("kl_pg", reg_estimator="causal", **TINY)
    assert_close(g, [[0.15, 0.1], [0.1, -0.05]])


@pytest.mark.parametrize("estimator", ["causal", "local", "local_plus"])
def test_agro_reg_estimators_on_toy_batch_by_formula(estimator):
    l = [seq_logratio(b) for b in range(B)]
    loo_l, loo_r = loo(l), loo(REW)
    tok_l = [[(LP[b][t] - REF[b][t]) * MASK[b][t] for t in range(T)] for b in range(B)]
    tok_kl = [[TOKKL[b][t] * MASK[b][t] for t in range(T)] for b in range(B)]

    def reg(b, t):
        if estimator == "causal":
            return sum(tok_l[b][s] for s in range(t, T))
        if estimator == "local":
            return sum(tok_l[b][s] for s in range(t + 1, T))
        return sum(tok_kl[b][s] for s in range(t + 1, T))

    expected = [[-MASK[b][t] / B * ((REW[b] - loo_r[b]) + BETA * loo_l[b] - BETA * reg(b, t)) for t in range(T)]
                for b in range(B)]
    loss, _, g, g_kl = run("agro", reg_estimator=estimator, token_kl=TOKKL)
    assert_close(g, expected)
    kl_grad = BETA / B if estimator != "causal" else 0.0
    assert_close(g_kl, [[kl_grad * MASK[b][t] for t in range(T)] for b in range(B)])
    loss_vanilla, _, _, _ = run("agro")
    assert abs(float(loss) - float(loss_vanilla)) < TOL  # the estimator swap changes the gradient only


def test_token_estimator_errors():
    with pytest.raises(ValueError, match="needs the option token_kl"):
        run("agro", reg_estimator="local")
    with pytest.raises(ValueError, match="requires logprob_reduction='sum'"):
        run("kl_pg", reg_estimator="causal", logprob_reduction="mean")
    with pytest.raises(ValueError, match="reg_estimator='g5' is not one of"):
        run("agro", reg_estimator="g5")
    with pytest.raises(ValueError, match="kl_pg_token: needs the option token_kl"):
        run("kl_pg_token")


# ---- logprob_reduction = "mean" -----------------------------------------------------------------
LEN = [3, 2, 1, 3, 2, 3]


def test_agro_mean_reduction_by_hand():
    w, _, _ = agro_weights(lengths=LEN)
    _, _, g, _ = run("agro", logprob_reduction="mean")
    assert_close(g, sequence_weight_grad(w, lengths=LEN))


def test_agro_on_mean_reduction_by_hand():
    """R uses the length-averaged log-ratio, so the PD part multiplies the averaged score; the LR
    part comes from the sampling distribution and multiplies the FULL score sum_t s_t."""
    A, R, _ = agro_weights(lengths=LEN)
    c = _lr_baseline_by_hand("loo_sq", R, A)
    expected = [[MASK[b][t] * (-A[b] / LEN[b] + (A[b] ** 2 - c[b]) / (2 * BETA)) / B
                 for t in range(T)] for b in range(B)]
    _, _, g, _ = run("agro_on", lr_baseline="loo_sq", logprob_reduction="mean")
    assert_close(g, expected)


def test_kl_pg_and_kl_pg_token_mean_reduction_by_hand():
    l = [seq_logratio(b) / LEN[b] for b in range(B)]
    loo_r = loo(REW)
    _, _, g, _ = run("kl_pg", logprob_reduction="mean")
    assert_close(g, sequence_weight_grad([REW[b] - loo_r[b] - BETA * l[b] for b in range(B)], lengths=LEN))
    _, _, g, g_kl = run("kl_pg_token", logprob_reduction="mean", token_kl=TOKKL)
    assert_close(g, sequence_weight_grad([REW[b] - loo_r[b] for b in range(B)], lengths=LEN))
    assert_close(g_kl, [[BETA * MASK[b][t] / (B * LEN[b]) for t in range(T)] for b in range(B)])


# ---- validation ----------------------------------------------------------------------------------
def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'ppo'; valid losses: agro, agro_on, grpo, kl_pg, kl_pg_token"):
        run("ppo")


def test_unknown_or_unaccepted_option_names_loss_and_valid_options():
    with pytest.raises(ValueError, match=r"loss 'agro' does not accept option\(s\) \['lr_coef'\]; valid options:.*reg_estimator"):
        run("agro", lr_coef=0.5)
    with pytest.raises(ValueError, match=r"loss 'grpo' does not accept option\(s\) \['temperature'\]; valid options: \['behavior_logprobs', 'eps', 'is_cap', 'is_mode', 'on_policy'\]"):
        run("grpo", temperature=1.0)
    with pytest.raises(ValueError, match="lr_baseline='var' is not one of"):
        run("agro_on", lr_baseline="var")


def test_shape_and_scalar_validation():
    with pytest.raises(ValueError, match="B=6 is not a positive multiple of group_size=4"):
        run("agro", n=4)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        run("agro", n=1)
    with pytest.raises(ValueError, match=r"mask shape \(6, 2\) does not match logprobs shape \(6, 3\)"):
        run("agro", mask=[row[:2] for row in MASK])
    with pytest.raises(ValueError, match="ref_logprobs shape"):
        run("agro", ref=REF[:4])
    with pytest.raises(ValueError, match=r"rewards must have shape \[B\]=\[6\]"):
        run("agro", rew=REW[:5])
    with pytest.raises(ValueError, match="beta must be a finite float >= 0"):
        run("agro", beta=-0.1)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        run("agro", mask=[[0.5] * 3] * 6)


# ---- metrics -------------------------------------------------------------------------------------
def test_metrics_keys_and_values_by_hand():
    rew = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    _, m, _, _ = run("agro_on", rew=rew)
    for key in ("loss", "reward_mean", "reg_reward_mean", "kl_k1", "kl_k3", "loss_pd", "loss_lr", "consistency",
                "frac_groups_equal_reward", "on_policy_fraction", "adv_abs_mean"):
        assert type(m[key]) is float, key
    l = [seq_logratio(b) for b in range(B)]
    assert abs(m["kl_k1"] - sum(l) / B) < TOL
    k3 = sum(math.exp(REF[b][t] - LP[b][t]) - (REF[b][t] - LP[b][t]) - 1
             for b in range(B) for t in range(T) if MASK[b][t]) / B
    assert abs(m["kl_k3"] - k3) < TOL
    assert m["frac_groups_equal_reward"] == 0.5
    assert m["on_policy_fraction"] == 1.0
    assert abs(m["reward_mean"] - 4 / 6) < TOL
    R = [rew[b] - BETA * l[b] for b in range(B)]
    assert abs(m["reg_reward_mean"] - sum(R) / B) < TOL
    cons = 0.0
    for g in (0, 3):
        mean = sum(R[g:g + 3]) / 3
        cons += sum((R[i] - mean) ** 2 for i in range(g, g + 3)) / (2 * 2)
    assert abs(m["consistency"] - cons / 2) < TOL
    assert abs(m["loss"] - (m["loss_pd"] + m["loss_lr"])) < TOL


# ---- dtype and padding robustness ---------------------------------------------------------------
def test_float32_inputs_stay_float32():
    loss, _, g, _ = run("agro_on", dtype=torch.float32)
    assert loss.dtype == torch.float32 and g.dtype == torch.float32


@pytest.mark.parametrize("name", ["agro", "agro_on", "kl_pg", "kl_pg_token", "grpo"])
def test_inf_and_nan_in_padding_do_not_leak(name):
    opts = {"token_kl": TOKKL} if name == "kl_pg_token" else {}
    _, _, g_clean, _ = run(name, **opts)
    bad = float("nan")
    lp = [[x if MASK[b][t] else bad for t, x in enumerate(row)] for b, row in enumerate(LP)]
    ref = [[x if MASK[b][t] else -float("inf") for t, x in enumerate(row)] for b, row in enumerate(REF)]
    opts = {"token_kl": [[x if MASK[b][t] else bad for t, x in enumerate(row)] for b, row in enumerate(TOKKL)]} \
        if name == "kl_pg_token" else {}
    loss, m, g, _ = run(name, lp=lp, ref=ref, **opts)
    assert math.isfinite(float(loss)) and all(math.isfinite(v) for v in m.values())
    assert_close(g, g_clean)


# ---- exact enumeration with variable-length completions (agro_math.md §4.1-4.2) -----------------
def _variable_length_model(seed=0):
    """Autoregressive tabular policy over tokens {0, 1, EOS=2}, at most 3 tokens: EOS ends a
    sequence, and the third token ends it whatever it is. One logit vector per EOS-free prefix."""
    prefixes = [(), (0,), (1,), (0, 0), (0, 1), (1, 0), (1, 1)]
    seqs = [(2,)] + [(a, 2) for a in (0, 1)] + [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1, 2)]
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(len(prefixes), 3, dtype=F64, generator=g).requires_grad_(True)
    ref = torch.randn(len(prefixes), 3, dtype=F64, generator=g)
    rewards = torch.rand(len(seqs), dtype=F64, generator=g)
    node = {p: i for i, p in enumerate(prefixes)}

    def token_logprobs(logits):  # [S, 3] per-token log-probs, 0 on padding
        lsm = torch.log_softmax(logits, -1)
        rows = [torch.stack([lsm[node[y[:t]], y[t]] for t in range(len(y))]) for y in seqs]
        return torch.stack([torch.cat([r, r.new_zeros(3 - len(r))]) for r in rows])

    mask = torch.tensor([[1.0 if t < len(y) else 0.0 for t in range(3)] for y in seqs], dtype=F64)
    return seqs, theta, ref, rewards, token_logprobs, mask


@pytest.mark.parametrize("n", [2, 3])
def test_agro_on_mean_reduction_matches_enumeration_with_variable_lengths(n):
    """E over all n-tuples y_i ~ pi of grad(agro_on loss) = grad L_on / beta, where
    L_on = 1/2 Var_{y~pi}[r(y) - beta * l(y)/|y|] is differentiated through BOTH the regularized
    reward and the sampling distribution (exact autograd over the 15 sequences)."""
    import itertools

    seqs, theta, ref_logits, r, token_logprobs, mask = _variable_length_model()
    beta = 0.4
    lp_all = token_logprobs(theta)                                          # [S, 3]
    ref_all = token_logprobs(ref_logits).detach()                           # [S, 3]
    lengths = mask.sum(-1)
    seq_lp = (lp_all * mask).sum(-1)                                        # [S]
    p = seq_lp.exp()
    assert abs(float(p.detach().sum()) - 1) < 1e-12
    R = r - beta * ((lp_all - ref_all) * mask).sum(-1) / lengths            # [S]
    L_on = 0.5 * (p * (R - (p * R).sum()) ** 2).sum()
    (exact,) = torch.autograd.grad(L_on, theta, retain_graph=True)

    tuples = list(itertools.product(range(len(seqs)), repeat=n))
    idx = torch.tensor(tuples).reshape(-1)                                  # [G*n]
    prob = p.detach()[torch.tensor(tuples)].prod(-1)                        # [G]
    G = len(tuples)
    lp = lp_all[idx]
    loss, _ = compute_loss("agro_on", lp, ref_all[idx], mask[idx], r[idx], n, beta,
                           logprob_reduction="mean")
    # groups do not interact and the loss is their mean: weight group g's rows by G * P(tuple g)
    (dlp,) = torch.autograd.grad(loss, lp, retain_graph=True)
    weights = (G * prob).repeat_interleave(n)[:, None]
    (expected_grad,) = torch.autograd.grad(lp, theta, grad_outputs=dlp * weights)
    assert float(exact.abs().max()) > 1e-3                                  # a real gradient
    torch.testing.assert_close(expected_grad, exact / beta, rtol=0, atol=1e-10)


def test_the_on_policy_pitfall_is_said_at_the_start_of_a_run_that_can_hit_it():
    """§4.6 with a weight lambda on the LR term: the gradient at pi_ref is
    (lambda (1/2 - p) - beta) grad p, so a run warns when beta < lambda/2, naming the threshold
    1/2 - beta/lambda; lambda = 0, beta >= lambda/2 and the other losses get none. agro_on's
    default lambda is 1."""
    from agro.losses import available_losses, loss_spec

    on = loss_spec("agro_on")
    w = on.start_warning({}, 0.02)
    assert "lr_coef=1 " in w and "p < 1/2 - beta/lr_coef = 0.48 " in w and "§4.6" in w
    assert "= 0.1 " in on.start_warning({"lr_coef": 0.5}, 0.2)
    assert "= 0.25 " in on.start_warning({"lr_coef": 2.0}, 0.5)
    assert on.start_warning({"lr_coef": 0.04}, 0.02) == ""
    assert on.start_warning({"lr_coef": 0.0}, 0.02) == ""
    assert on.start_warning({}, 0.5) == ""
    assert all(loss_spec(n).start_warning({}, 0.02) == "" for n in available_losses()
               if n != "agro_on")
