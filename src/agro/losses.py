"""AGRO loss library: the paper's losses and baselines as pure tensor functions behind one registry.

    loss, metrics = compute_loss(name, logprobs, ref_logprobs, mask, rewards, group_size, beta, **options)

Shapes. There are B = G * n samples: G prompts, each with n = ``group_size`` >= 2 samples, stored next
to each other. T is the padded completion length.
    logprobs      [B, T]  log pi(y_t | x, y_<t) of each completion token (differentiable)
    ref_logprobs  [B, T]  log pi_ref of the same tokens (treated as a constant)
    mask          [B, T]  1 on completion tokens, 0 on padding (padded entries may hold anything, even inf)
    rewards       [B]
    loss          0-dim tensor to MINIMISE;  metrics: dict[str, float]
Everything runs in the dtype of ``logprobs``.

Notation and conventions (shared/docs/agro_math.md §0). l_b = sum_t mask*(logprobs - ref_logprobs)
is the sequence log-ratio, R = rewards - beta*l the regularized reward, and loo_b(v) the mean of v over
the other n-1 samples of b's group.
* Every AGRO-family gradient is the ascent direction divided by beta, d = -grad L / beta. The reward
  term then has no beta in front, so learning rates carry over from RLOO. With default options,
      d loss / d logprobs[b, t] = -mask[b, t] * w_b / B
  for a per-sample weight w_b, given in each loss's docstring.
* Consistency losses carry the 1/2 of §0: C(v) = 1/(2(n-1)) sum_i (v_i - vbar)^2 per group.
* Loss values. The gradient is pinned down by the spec. The value is chosen to mean something:
    agro     mean_g[ -Cov(r, l) + beta/2 * Var(l) ]  =  (C(R) - C(r)) / beta   (unbiased sample (co)variances)
             This is the exact §3.2 sample-variance loss C(R)/beta minus its theta-independent part
             C(r)/beta. So it is an exact loss (autograd, no stop-gradient). It stays finite at beta = 0,
             and its minimum over the policy, -C(r)/beta, is reached exactly when R is constant in every
             group (pi* in expectation). The `consistency` metric reports C(R) itself.
    kl_pg    mean_g[ -Cov(r, l) ] + beta/2 * mean_b l_b^2        (§3.3's autograd form, also exact)
    agro_on  the agro value (`loss_pd`) + `loss_lr` = lr_coef/(2 beta) * mean_b on_b (A_b^2 - c_b).
             `loss_lr` is the importance-ratio surrogate evaluated at ratio 1; its gradient is the LR part.
    kl_pg_token   mean_g[ -Cov(r, l) ] + beta * mean_b sum_t mask*token_kl
    grpo     the usual per-sequence token-mean of -A*ratio + beta*k3, then the mean over sequences.

Departures from the paper (Tang et al. 2025, arXiv:2503.19612):
* Scale. Gradients are written in ascent form divided by beta (see above). The paper's Eq. (6) is the
  gradient of the loss itself, which is -beta times ours.
* `agro_on` has a weight `lr_coef` (lambda) on the likelihood-ratio term: w = A - lambda (A^2 - c)/(2 beta).
  lambda = 1 is the exact gradient of the on-policy loss, as in the paper. §4.6 shows that exact descent
  on that loss can collapse the success rate of prompts with p < 1/2 - beta, so lambda < 1 is exposed.
  `lr_baseline="loo_sq"` is the paper's biased variance-reduced variant (§4.3). `"loo_var"` (unbiased,
  n >= 3) goes beyond the paper.
* On-policy gating, per group. The paper trains on batches that are either all on-policy or all
  offline. Here `on_policy` marks the groups that are fresh temperature-1 draws from the current
  policy. Only those groups get the on-policy-only terms (agro_on's LR term, and the causal / local
  regularization estimators). Every other group gets the off-policy form, which is valid for any
  behaviour policy (vanilla g1, no LR term).
* `reg_estimator` (§5) swaps the token-level estimators g2 / g3 / g3+ in for the vanilla g1 =
  s(y) * l(y) on on-policy groups. The paper's experiments used g1 only. AGRO's LOO baseline on l,
  +beta * s(y_i) * loo_i(l), is kept. On-policy it has zero mean, so keeping it is valid (and it is what
  makes the off-policy groups correct).
* `logprob_reduction="mean"` divides each sequence's log-ratio by its number of completion tokens
  (length-averaged log-ratios, §8 "beta scale remark"), so R = r - beta*l/|y|. The paper uses "sum".
  The losses are functions of l/|y|, so in agro, kl_pg and kl_pg_token the whole per-sequence
  weight, the reward term's included, multiplies the length-averaged score s(y)/|y| (long
  completions get a proportionally smaller step, as in GRPO's per-sequence token mean); for
  kl_pg / kl_pg_token that is no longer an unbiased gradient of E r.
  This changes the fixed point, not only the scale: R = c constant on the support means
  pi(y) = pi_ref(y) * exp(|y| (r(y) - c) / beta) with c set by normalisation, not pi* of Eq. (2). agro_on's likelihood-ratio
  term still multiplies the full score sum_t grad log pi(y_t|.) (it comes from the sampling
  distribution, which does not depend on the reduction). The token-level estimators require
  "sum": the 1/|y| factor depends on later tokens, so the dropped terms would no longer have zero
  mean.
* `kl_pg_token` takes Omega as a SUM of token KLs (§3.4; the paper leaves this open). `grpo` is not in
  the paper; it is here as a familiar baseline. Its `is_mode` option gives it the peers' correction
  for samples that are not from the current policy (truncated or masked importance sampling on the
  recorded behaviour log-probs, as TRL's `vllm_importance_sampling_mode`; default off). AGRO's losses
  never take importance weights.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "LOSSES",
    "LossSpec",
    "LossOutput",
    "REG_ESTIMATORS",
    "LR_BASELINES",
    "available_losses",
    "loss_options",
    "loss_spec",
    "register_loss",
    "compute_loss",
    "sequence_sum",
    "sequence_length",
    "sequence_logprob",
    "seq_mean_token_mean",
    "loo_mean",
    "group_mean",
    "group_covariance",
    "group_half_variance",
    "suffix_sum",
    "ratio_one",
    "on_policy_mask",
    "agro_loss",
    "agro_on_loss",
    "kl_pg_loss",
    "kl_pg_token_loss",
    "grpo_loss",
]

REDUCTIONS = ("sum", "mean")


# ----------------------------------------------------------------------------------------------
# Aggregation over tokens, sequences and groups
# ----------------------------------------------------------------------------------------------
def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask is set, 0 elsewhere. [B, T] -> [B, T]. Padding that holds inf/nan gives no nan gradient."""
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def sequence_sum(x: Tensor, mask: Tensor) -> Tensor:
    """sum_t mask[b, t] * x[b, t].  x, mask: [B, T] -> [B]."""
    return _masked(x, mask).sum(-1)


def sequence_length(mask: Tensor) -> Tensor:
    """Number of completion tokens per sample, at least 1 (so an empty completion divides by 1). [B, T] -> [B]."""
    return mask.bool().sum(-1).clamp_min(1)


def sequence_logprob(logprobs: Tensor, mask: Tensor, reduction: str = "sum") -> Tensor:
    """Sequence log-probability (or log-ratio, if given per-token log-ratios). [B, T] -> [B].

    "sum" is the paper's log pi(y|x) = sum_t log pi(y_t|.). "mean" divides by the number of completion
    tokens (length-averaged, §8 beta-scale remark).
    """
    total = sequence_sum(logprobs, mask)  # [B]
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / sequence_length(mask).to(total.dtype)
    raise ValueError(f"logprob_reduction must be one of {REDUCTIONS}, got {reduction!r}")


def seq_mean_token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """GRPO aggregation: mean over each sequence's completion tokens, then mean over sequences. [B, T] -> []."""
    per_seq = sequence_sum(per_token, mask) / sequence_length(mask).to(per_token.dtype)  # [B]
    return per_seq.mean()


def _groups(values: Tensor, group_size: int) -> Tensor:
    """[B] -> [G, n] view; each row holds one prompt's contiguous samples."""
    if values.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of per-sample values, got shape {tuple(values.shape)}")
    if group_size < 2 or values.numel() % group_size != 0:
        raise ValueError(f"{values.numel()} samples cannot be split into groups of size {group_size} (need n >= 2)")
    return values.reshape(-1, group_size)


def loo_mean(values: Tensor, group_size: int) -> Tensor:
    """Leave-one-out mean: loo_b(v) = mean of v over the other n-1 samples of b's group. [B] -> [B]."""
    v = _groups(values, group_size)  # [G, n]
    return ((v.sum(-1, keepdim=True) - v) / (group_size - 1)).reshape(-1)


def group_mean(values: Tensor, group_size: int) -> Tensor:
    """Per-group mean. [B] -> [G]."""
    return _groups(values, group_size).mean(-1)


def group_covariance(x: Tensor, y: Tensor, group_size: int) -> Tensor:
    """Unbiased per-group sample covariance 1/(n-1) sum_i (x_i - xbar)(y_i - ybar). [B], [B] -> [G]."""
    xg, yg = _groups(x, group_size), _groups(y, group_size)  # [G, n]
    xc = xg - xg.mean(-1, keepdim=True)
    yc = yg - yg.mean(-1, keepdim=True)
    return (xc * yc).sum(-1) / (group_size - 1)


def group_half_variance(values: Tensor, group_size: int) -> Tensor:
    """Per-group consistency loss 1/(2(n-1)) sum_i (v_i - vbar)^2 (§3.2, half the unbiased variance). [B] -> [G]."""
    return 0.5 * group_covariance(values, values, group_size)


def suffix_sum(x: Tensor, inclusive: bool = True) -> Tensor:
    """out[b, t] = sum_{s >= t} x[b, s] (inclusive) or sum_{s > t} x[b, s]. [B, T] -> [B, T]."""
    inc = torch.flip(torch.cumsum(torch.flip(x, [-1]), -1), [-1])
    return inc if inclusive else inc - x


def ratio_one(seq_logprob: Tensor) -> Tensor:
    """exp(x - sg(x)): equal to 1 in value, with gradient d x. The importance ratio of a single update per batch."""
    return torch.exp(seq_logprob - seq_logprob.detach())


def on_policy_mask(on_policy, batch_size: int, group_size: int, device=None) -> Tensor:
    """Turn the `on_policy` option into a [B] bool tensor. Accepts None (all on-policy), a Python bool,
    or a bool / 0-1 tensor of shape [B] (constant within each group) or [G]."""
    n_groups = batch_size // group_size
    if on_policy is None or isinstance(on_policy, bool):
        return torch.full((batch_size,), on_policy is None or on_policy, dtype=torch.bool, device=device)
    flags = torch.as_tensor(on_policy, device=device)
    if flags.dtype != torch.bool:
        if not bool(((flags == 0) | (flags == 1)).all()):
            raise ValueError("on_policy must hold booleans (or 0/1)")
        flags = flags.bool()
    if flags.shape == (n_groups,):
        return flags.repeat_interleave(group_size)
    if flags.shape == (batch_size,):
        grouped = flags.reshape(n_groups, group_size)
        if not bool((grouped == grouped[:, :1]).all()):
            raise ValueError("on_policy must be the same for all samples of a group "
                             "(groups are on- or off-policy as a whole)")
        return flags
    raise ValueError(f"on_policy must have shape [B]=[{batch_size}] or [G]=[{n_groups}], got {tuple(flags.shape)}")


# ----------------------------------------------------------------------------------------------
# Regularization-gradient estimators (§5) and LR baselines (§4.2-4.3)
# ----------------------------------------------------------------------------------------------
# Each estimator maps (logprobs [B,T], ref_logprobs [B,T], mask [B,T], token_kl [B,T] | None) to a [B]
# surrogate whose gradient is g_k(y_b), an estimate of grad KL(pi||pi_ref) (sum reduction).
def _reg_vanilla(logprobs, ref_logprobs, mask, token_kl):
    """g1 = s(y) * l(y): autograd of 1/2 * l(y)^2."""
    return 0.5 * sequence_sum(logprobs - ref_logprobs, mask) ** 2


def _reg_causal(logprobs, ref_logprobs, mask, token_kl):
    """g2 = sum_t s_t * sum_{s>=t} l_s: surrogate sum_t logpi_t * sg(sum_{s>=t} l_s)."""
    future = suffix_sum(_masked(logprobs - ref_logprobs, mask).detach(), inclusive=True)
    return sequence_sum(logprobs * future, mask)


def _reg_local(logprobs, ref_logprobs, mask, token_kl):
    """g3 = sum_t [grad KL_t + s_t * sum_{s>t} l_s]: surrogate sum_t [KL_t + logpi_t * sg(sum_{s>t} l_s)]."""
    future = suffix_sum(_masked(logprobs - ref_logprobs, mask).detach(), inclusive=False)
    return sequence_sum(token_kl + logprobs * future, mask)


def _reg_local_plus(logprobs, ref_logprobs, mask, token_kl):
    """g3+ = sum_t [grad KL_t + s_t * sum_{s>t} KL_s]: surrogate sum_t [KL_t + logpi_t * sg(sum_{s>t} KL_s)]."""
    future = suffix_sum(_masked(token_kl, mask).detach(), inclusive=False)
    return sequence_sum(token_kl + logprobs * future, mask)


REG_ESTIMATORS: dict[str, Callable] = {
    "vanilla": _reg_vanilla,
    "causal": _reg_causal,
    "local": _reg_local,
    "local_plus": _reg_local_plus,
}
_REG_NEEDS_TOKEN_KL = ("local", "local_plus")


def reg_estimator_correction(estimator: str, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                             beta: float, on_policy: Tensor, token_kl: Tensor | None) -> Tensor:
    """Zero-valued term with gradient (beta/B) * sum_b on_b * (g_k(y_b) - g1(y_b)) (§5 "How these plug in").

    Added to a loss whose vanilla regularization gradient is (beta/B) * sum_b g1(y_b), it swaps in
    estimator g_k on the on-policy samples (on_policy [B] bool) and leaves every other term alone.
    """
    if estimator == "vanilla":
        return logprobs.new_zeros(())
    g_k = REG_ESTIMATORS[estimator](logprobs, ref_logprobs, mask, token_kl)  # [B]
    g_1 = _reg_vanilla(logprobs, ref_logprobs, mask, token_kl)  # [B]
    delta = (g_k - g_k.detach()) - (g_1 - g_1.detach())  # [B], exactly 0 in value
    return beta * (delta * on_policy.to(delta.dtype)).mean()


def _lr_baseline_none(R: Tensor, A: Tensor, group_size: int) -> Tensor:
    """c = 0: Eq. (6) as printed (unbiased)."""
    return torch.zeros_like(A)


def _lr_baseline_loo_var(R: Tensor, A: Tensor, group_size: int) -> Tensor:
    """c_i = n/(n-1) * unbiased sample variance of {R_j}_{j != i} (§4.3 unbiased alternative, n >= 3)."""
    n = group_size
    Rg = _groups(R, n)  # [G, n]
    loo = _groups(loo_mean(R, n), n)  # [G, n]
    dev = Rg[:, None, :] - loo[:, :, None]  # [G, i, j]: R_j - loo_i(R)
    others = ~torch.eye(n, dtype=torch.bool, device=R.device)  # [i, j]: j != i
    var_i = (dev**2 * others).sum(-1) / (n - 2)  # [G, n]
    return (n / (n - 1) * var_i).reshape(-1)


def _lr_baseline_loo_sq(R: Tensor, A: Tensor, group_size: int) -> Tensor:
    """c_i = loo_i(A^2): the paper's variance-reduced, biased variant (§4.3); c == A^2 when n = 2."""
    return loo_mean(A**2, group_size)


LR_BASELINES: dict[str, Callable] = {
    "none": _lr_baseline_none,
    "loo_var": _lr_baseline_loo_var,
    "loo_sq": _lr_baseline_loo_sq,
}


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------
@dataclass
class LossOutput:
    """What a registered loss returns.

    loss:        0-dim tensor to minimise.
    weights:     [B] sequence-level ascent weight w_b, detached (the `adv_abs_mean` metric). With a
                 token-level reg estimator, this is the vanilla-form weight.
    reg_rewards: [B] regularized reward R = r - beta*l as the loss defines it, detached (`consistency`).
    terms:       named 0-dim parts of the loss, detached, reported as metrics.
    """

    loss: Tensor
    weights: Tensor
    reg_rewards: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


def _static_checks_none(group_size: int, options: dict) -> None:
    """No option needs checking."""


def _no_warning(options: dict, beta: float) -> str:
    return ""


@dataclass(frozen=True)
class LossSpec:
    """What the registry knows of a loss, so that the trainer, the lab and config validation ask
    it instead of re-encoding its rules.

    fn:             the pure loss function (see :func:`register_loss`).
    options:        {option: default} of its keyword-only parameters.
    beta_positive:  it needs beta > 0 (e.g. agro_on's LR weight divides by beta).
    token_kl:       whether it needs the full-vocabulary token KL (``token_kl`` option): a bool,
                    or a function of the options (the local regularization estimators need it).
    checks:         static checks of (group_size, options) that need no tensors; raise ValueError.
    on_policy_terms: whether these options give it terms that are valid only on samples of the
                    current pi (§4.2; what the ``on_policy`` flags switch off): a bool or a
                    function of the options. A loss may take ``on_policy`` only for its metrics.
    behavior:       whether these options need the behaviour log-probs (``behavior_logprobs``
                    [B, T], what the sampler recorded): a bool or a function of the options.
    warning:        (options, beta) -> what a run with these settings should be told at its start
                    when its on-policy terms are in use ("" for nothing), e.g. agro_on's §4.6
                    pitfall.
    """

    name: str
    fn: Callable[..., LossOutput]
    options: dict
    beta_positive: bool = False
    token_kl: bool | Callable[[dict], bool] = False
    checks: Callable[[int, dict], None] = _static_checks_none
    on_policy_terms: bool | Callable[[dict], bool] = False
    behavior: bool | Callable[[dict], bool] = False
    warning: Callable[[dict, float], str] = _no_warning

    def start_warning(self, options: dict, beta: float) -> str:
        """What a run with these options and beta should be told at its start ("" if nothing)."""
        return self.warning(self.resolved(options), beta)

    def needs_behavior(self, options: dict) -> bool:
        """Whether a call with these options needs ``behavior_logprobs`` ([B, T], detached)."""
        rule = self.behavior
        return bool(rule(self.resolved(options)) if callable(rule) else rule)

    def has_on_policy_terms(self, options: dict) -> bool:
        """Whether a call with these options has on-policy-only terms."""
        rule = self.on_policy_terms
        return bool(rule(self.resolved(options)) if callable(rule) else rule)

    @property
    def accepts_on_policy(self) -> bool:
        """Whether the loss takes per-group ``on_policy`` flags (on-policy-only terms)."""
        return "on_policy" in self.options

    def resolved(self, options: dict) -> dict:
        """``options`` over the defaults."""
        return {**self.options, **options}

    def needs_token_kl(self, options: dict) -> bool:
        """Whether a call with these options needs the ``token_kl`` input ([B, T], differentiable)."""
        rule = self.token_kl
        return bool(rule(self.resolved(options)) if callable(rule) else rule)

    def validate(self, beta: float, group_size: int, options: dict) -> None:
        """Every check that needs no tensors: option names, beta, group size, option values.
        Raises ValueError naming the loss, the option and the valid choices. `compute_loss` and
        config validation (before any model loads) both call it."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"loss {self.name!r} does not accept option(s) {unknown}; "
                             f"valid options: {sorted(self.options)}")
        if self.beta_positive and not beta > 0:
            raise ValueError(f"{self.name}: beta must be > 0, got {beta}")
        self.checks(group_size, self.resolved(options))


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, beta_positive: bool = False,
                  token_kl: bool | Callable[[dict], bool] = False,
                  checks: Callable[[int, dict], None] = _static_checks_none,
                  on_policy_terms: bool | Callable[[dict], bool] = False,
                  behavior: bool | Callable[[dict], bool] = False,
                  warning: Callable[[dict, float], str] = _no_warning):
    """Register `fn(logprobs, ref_logprobs, mask, rewards, group_size, beta, *, <options>) -> LossOutput`
    with what callers must know of it (:class:`LossSpec`).

    The loss's options are its keyword-only parameters, with their defaults.
    """

    def decorator(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        params = inspect.signature(fn).parameters.values()
        options = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        LOSSES[name] = LossSpec(name, fn, options, beta_positive, token_kl, checks, on_policy_terms,
                                behavior, warning)
        return fn

    return decorator


def available_losses() -> list[str]:
    """Sorted names of the registered losses."""
    return sorted(LOSSES)


def loss_spec(name: str) -> LossSpec:
    """The registry entry of loss `name`; an unknown name raises ValueError listing the valid ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(available_losses())}")
    return LOSSES[name]


def loss_options(name: str) -> dict[str, object]:
    """{option: default} for a registered loss."""
    return dict(loss_spec(name).options)


def _check_choice(loss: str, option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{loss}: {option}={value!r} is not one of {tuple(choices)}")


def _reg_checks(loss: str):
    """Static checks of the `reg_estimator` / `logprob_reduction` options of loss `loss`."""

    def checks(group_size: int, o: dict) -> None:
        _check_choice(loss, "reg_estimator", o["reg_estimator"], REG_ESTIMATORS)
        _check_choice(loss, "logprob_reduction", o["logprob_reduction"], REDUCTIONS)
        if o["reg_estimator"] != "vanilla" and o["logprob_reduction"] != "sum":
            raise ValueError(f"{loss}: reg_estimator={o['reg_estimator']!r} requires "
                             "logprob_reduction='sum' (with length-averaged log-ratios the dropped "
                             "terms are no longer zero-mean)")

    return checks


def _reg_needs_token_kl(options: dict) -> bool:
    """The local estimators (g3, g3+) use the full-vocabulary token KL (§5)."""
    return options.get("reg_estimator") in _REG_NEEDS_TOKEN_KL


def _agro_on_checks(group_size: int, o: dict) -> None:
    _reg_checks("agro_on")(group_size, o)
    _check_choice("agro_on", "lr_baseline", o["lr_baseline"], LR_BASELINES)
    if o["lr_baseline"] == "loo_var" and group_size < 3:
        raise ValueError("agro_on: lr_baseline='loo_var' needs group_size >= 3")
    c = o["lr_coef"]
    if not (isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0):
        raise ValueError(f"agro_on: lr_coef must be a finite float >= 0, got {c!r}")


def _agro_on_pitfall(o: dict, beta: float) -> str:
    """The §4.6 pitfall of the exact on-policy loss. At pi_ref with a binary reward, agro_on's
    gradient with weight lambda = lr_coef on the likelihood-ratio term is
    (lambda (1/2 - p) - beta) grad p (agro_math.md §4.6 has lambda = 1), so descent lowers the
    success probability of a prompt with p < 1/2 - beta/lambda: a pitfall whenever
    beta < lambda/2 (docs/PAPER.md C2 measured the collapse). Empty when it cannot apply
    (lambda = 0, beta >= lambda/2)."""
    lam = float(o["lr_coef"])
    if lam <= 0 or beta >= lam / 2:
        return ""
    return (f"warning: loss agro_on with lr_coef={lam:g} at beta={beta:g}: at pi_ref its descent "
            f"lowers the success probability of every prompt with p < 1/2 - beta/lr_coef = "
            f"{0.5 - beta / lam:.3g} (agro_math.md §4.6). From a weak base model this collapses: "
            "docs/PAPER.md C2 measured held-out accuracy 0.116 -> 0.027 at lr_coef=1, "
            "beta=0.02. Use loss=agro (lr_coef = 0), or beta >= lr_coef/2.")


def _kl_pg_token_checks(group_size: int, o: dict) -> None:
    _check_choice("kl_pg_token", "logprob_reduction", o["logprob_reduction"], REDUCTIONS)


IS_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _grpo_checks(group_size: int, o: dict) -> None:
    eps = o["eps"]
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"grpo: eps must be a float > 0, got {eps!r}")
    _check_choice("grpo", "is_mode", o["is_mode"], IS_MODES)
    c = o["is_cap"]
    if not (isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0):
        raise ValueError(f"grpo: is_cap must be a float > 0, got {c!r}")


def _grpo_needs_behavior(o: dict) -> bool:
    return o.get("is_mode", "none") != "none"


def behavior_log_ratio(logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor,
                       mode: str) -> Tensor:
    """log rho = log pi_theta - log mu, detached: [B, T]; per token (``token_*``) or, for
    ``sequence_*``, the sequence's summed log-ratio at every token. 0 on padding."""
    with torch.no_grad():
        d = _masked(logprobs.detach() - behavior_logprobs.to(logprobs.dtype), mask)   # [B, T]
        if mode.startswith("sequence"):
            d = _masked(d.sum(-1, keepdim=True).expand_as(d), mask)
        return d


def behavior_is_weights(logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, mode: str,
                        cap: float) -> Tensor:
    """The peers' correction for samples not drawn from the current policy, detached: [B, T].

    rho = pi_theta(y) / mu(y) from the learner's log-probs and the sampler's recorded ones, per
    token (``token_*``) or per sequence (``sequence_*``: exp of the summed log-ratio, the same for
    every token); ``*_truncate``: min(rho, cap); ``*_mask``: rho where rho <= cap, else 0. The same
    rule as TRL's ``vllm_importance_sampling_mode`` / ``_clip_max`` (TRL 1.16 defaults:
    sequence_mask, 3.0). Shapes: logprobs, behavior_logprobs, mask [B, T].
    """
    with torch.no_grad():
        rho = torch.exp(behavior_log_ratio(logprobs, behavior_logprobs, mask, mode))
        if mode.endswith("truncate"):
            rho = rho.clamp(max=cap)
        else:
            rho = torch.where(rho <= cap, rho, torch.zeros_like(rho))
        return _masked(rho, mask)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def _non_vanilla_estimator(o: dict) -> bool:
    """The §5 token-level estimators g2 / g3 / g3+ are on-policy-only corrections."""
    return o.get("reg_estimator", "vanilla") != "vanilla"


@register_loss("agro", token_kl=_reg_needs_token_kl, checks=_reg_checks("agro"),
               on_policy_terms=_non_vanilla_estimator)
def agro_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, rewards: Tensor, group_size: int,
              beta: float, *, reg_estimator: str = "vanilla", on_policy=None, logprob_reduction: str = "sum",
              token_kl: Tensor | None = None) -> LossOutput:
    """Off-policy AGRO, Eq. (4), §3.2. Valid for any behaviour policy; beta = 0 allowed.

    Shapes: logprobs, ref_logprobs, mask, token_kl [B, T]; rewards, on_policy [B].
    Weight: w = R - loo(R), with R = r - beta*l.  d loss/d logprobs[b,t] = -mask*w_b/B.
    Loss: mean_g[ -Cov(r, l) + beta/2 Var(l) ] = (C(R) - C(r))/beta. This is the exact sample-variance
    loss (per-sample identity of §3.2) minus a theta-independent constant, differentiated by autograd.
    reg_estimator != "vanilla" swaps g1 for g_k on on-policy groups (§5); the LOO term on l is kept.
    """
    n = group_size
    on = on_policy_mask(on_policy, rewards.numel(), n, rewards.device)  # [B]
    l = sequence_logprob(logprobs - ref_logprobs, mask, logprob_reduction)  # [B]
    loss_reward = -group_covariance(rewards, l, n).mean()
    loss_reg = 0.5 * beta * group_covariance(l, l, n).mean()
    swap = reg_estimator_correction(reg_estimator, logprobs, ref_logprobs, mask, beta, on, token_kl)
    R = rewards - beta * l.detach()  # [B]
    weights = R - loo_mean(R, n)  # [B]
    return LossOutput(loss_reward + loss_reg + swap, weights, R,
                      {"loss_reward": loss_reward.detach(), "loss_reg": loss_reg.detach()})


@register_loss("agro_on", beta_positive=True, token_kl=_reg_needs_token_kl, checks=_agro_on_checks,
               on_policy_terms=True, warning=_agro_on_pitfall)
def agro_on_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, rewards: Tensor, group_size: int,
                 beta: float, *, lr_coef: float = 1.0, lr_baseline: str = "none", reg_estimator: str = "vanilla",
                 on_policy=None, logprob_reduction: str = "sum", token_kl: Tensor | None = None) -> LossOutput:
    """On-policy AGRO, Eqs. (5)-(6), §4.2-4.3. Needs beta > 0.

    Shapes: logprobs, ref_logprobs, mask, token_kl [B, T]; rewards, on_policy [B].
    Weight: w = A - on * lr_coef * (A^2 - c)/(2 beta), with A = R - loo(R). The first term is the PD
    part (= agro), the second the LR part, applied to on-policy groups only.
    c by lr_baseline: "none" c = 0; "loo_var" c_i = n/(n-1) * unbiased Var({R_j}_{j!=i}) (unbiased,
    n >= 3); "loo_sq" c_i = loo_i(A^2) (paper's biased variant, §4.3; it vanishes for n = 2).
    Loss: loss_pd (the agro value) + loss_lr = lr_coef/(2 beta) * mean_b on_b (A_b^2 - c_b)
    (ratio-one surrogate).
    """
    n = group_size
    pd = agro_loss(logprobs, ref_logprobs, mask, rewards, n, beta, reg_estimator=reg_estimator,
                   on_policy=on_policy, logprob_reduction=logprob_reduction, token_kl=token_kl)
    on = on_policy_mask(on_policy, rewards.numel(), n, rewards.device).to(rewards.dtype)  # [B]
    A = pd.weights  # [B], detached
    c = LR_BASELINES[lr_baseline](pd.reg_rewards, A, n)  # [B]
    lr_weight = on * lr_coef * (A**2 - c) / (2 * beta)  # [B], descent weight of the score
    # The LR term differentiates the sampling distribution pi(y|x), so it always multiplies the
    # full-sequence score grad log pi(y) = sum_t grad log pi(y_t|.), whatever reduction R uses.
    seq_lp = sequence_sum(logprobs, mask)  # [B]
    loss_lr = (lr_weight * ratio_one(seq_lp)).mean()
    terms = dict(pd.terms, loss_pd=pd.loss.detach(), loss_lr=loss_lr.detach(),
                 lr_weight_abs_mean=lr_weight.abs().mean())
    return LossOutput(pd.loss + loss_lr, A - lr_weight, pd.reg_rewards, terms)


@register_loss("kl_pg", token_kl=_reg_needs_token_kl, checks=_reg_checks("kl_pg"),
               on_policy_terms=_non_vanilla_estimator)
def kl_pg_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, rewards: Tensor, group_size: int,
               beta: float, *, reg_estimator: str = "vanilla", on_policy=None, logprob_reduction: str = "sum",
               token_kl: Tensor | None = None) -> LossOutput:
    """n-sample KL-regularized policy gradient with LOO reward baseline (the paper's "RLOO"), §3.3.

    Shapes: logprobs, ref_logprobs, mask, token_kl [B, T]; rewards, on_policy [B].
    Weight: w = (r - loo(r)) - beta*l. Unlike AGRO there is no LOO baseline on l, so off-policy data
    give the wrong fixed point (§3.3).
    Loss: mean_g[ -Cov(r, l) ] + beta/2 * mean_b l_b^2 (exact autograd form).
    """
    n = group_size
    on = on_policy_mask(on_policy, rewards.numel(), n, rewards.device)  # [B]
    l = sequence_logprob(logprobs - ref_logprobs, mask, logprob_reduction)  # [B]
    loss_reward = -group_covariance(rewards, l, n).mean()
    loss_reg = 0.5 * beta * (l**2).mean()
    swap = reg_estimator_correction(reg_estimator, logprobs, ref_logprobs, mask, beta, on, token_kl)
    weights = (rewards - loo_mean(rewards, n)) - beta * l.detach()  # [B]
    return LossOutput(loss_reward + loss_reg + swap, weights, rewards - beta * l.detach(),
                      {"loss_reward": loss_reward.detach(), "loss_reg": loss_reg.detach()})


@register_loss("kl_pg_token", token_kl=True, checks=_kl_pg_token_checks)
def kl_pg_token_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, rewards: Tensor, group_size: int,
                     beta: float, *, token_kl: Tensor | None = None, on_policy=None,
                     logprob_reduction: str = "sum") -> LossOutput:
    """Policy gradient with LOO reward baseline and a per-token KL penalty (offline baseline), §3.4.

    Shapes: logprobs, ref_logprobs, mask, token_kl [B, T]; rewards, on_policy [B].
    token_kl (required) is the full-vocabulary KL(pi(.|y_<t) || pi_ref(.|y_<t)) at each position,
    differentiable w.r.t. the policy. Loss: mean_g[ -Cov(r, l) ] + beta * mean_b Omega_b, with
    Omega_b = sum_t mask*token_kl ("mean": divided by the length). So
    d loss/d logprobs[b,t] = -mask*(r_b - loo_b(r))/B and d loss/d token_kl[b,t] = beta*mask/B
    ("mean": both divided by |y_b|, as in agro and kl_pg).
    on_policy only feeds the metric: this loss has no on-policy-only term.
    """
    n = group_size
    l = sequence_logprob(logprobs - ref_logprobs, mask, logprob_reduction)  # [B]
    omega = sequence_logprob(token_kl, mask, logprob_reduction)  # [B]
    loss_reward = -group_covariance(rewards, l, n).mean()
    loss_reg = beta * omega.mean()
    return LossOutput(loss_reward + loss_reg, rewards - loo_mean(rewards, n), rewards - beta * l.detach(),
                      {"loss_reward": loss_reward.detach(), "loss_reg": loss_reg.detach()})


@register_loss("grpo", checks=_grpo_checks, behavior=_grpo_needs_behavior)
def grpo_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, rewards: Tensor, group_size: int,
              beta: float, *, eps: float = 1e-6, is_mode: str = "none", is_cap: float = 3.0,
              behavior_logprobs: Tensor | None = None, on_policy=None) -> LossOutput:
    """GRPO (Shao et al. 2024) with one update per batch (ratio = exp(lp - sg(lp)) = 1, so no clipping).

    Shapes: logprobs, ref_logprobs, mask, behavior_logprobs [B, T]; rewards, on_policy [B]. Not in
    the AGRO paper. Advantage A_b = (r_b - mean_g r) / (std_g r + eps), where std is the unbiased
    (n-1) group std, as in TRL/verl. Per token: -A_b * ratio_t * rho_bt + beta * k3_t, with
    k3_t = exp(ref-lp) - (ref-lp) - 1 and rho the detached importance weight of
    :func:`behavior_is_weights` (``is_mode``, ``is_cap``; 1 when is_mode='none'), applied to the
    policy-gradient term only, as TRL does. Aggregation: token mean per sequence, then mean over
    sequences (seq_mean_token_mean). So d loss/d lp[b,t] = mask/(B*|y_b|) * (-A_b*rho_bt +
    beta*(1 - exp(ref - lp))). on_policy only feeds the metric.
    """
    n = group_size
    lp = _masked(logprobs, mask)  # [B, T]
    rg = _groups(rewards, n)  # [G, n]
    adv = ((rg - rg.mean(-1, keepdim=True)) / (rg.std(-1, keepdim=True) + eps)).reshape(-1)  # [B]
    d = _masked(ref_logprobs - lp, mask)  # [B, T]
    k3 = torch.exp(d) - d - 1  # [B, T]
    pg = -adv[:, None] * ratio_one(lp)  # [B, T]
    terms = {}
    if is_mode != "none":
        if behavior_logprobs is None:
            raise ValueError(f"grpo: is_mode={is_mode!r} needs behavior_logprobs [B, T] (the "
                             "sampler's recorded log-probs)")
        rho = behavior_is_weights(lp, behavior_logprobs, mask, is_mode, is_cap)  # [B, T]
        pg = pg * rho
        tokens = mask.sum().clamp(min=1)
        above = (behavior_log_ratio(lp, behavior_logprobs, mask, is_mode) > math.log(is_cap)) \
            & (mask > 0)   # [B, T]: truncated or masked
        terms = {"is_weight_mean": (rho * mask).sum() / tokens,
                 "is_weight_above_cap_fraction": above.sum() / tokens}
    loss_pg = seq_mean_token_mean(pg, mask)
    loss_kl = beta * seq_mean_token_mean(k3, mask)
    l = sequence_sum(logprobs - ref_logprobs, mask).detach()  # [B]
    return LossOutput(loss_pg + loss_kl, adv, rewards - beta * l,
                      {"loss_pg": loss_pg.detach(), "loss_kl": loss_kl.detach(), **terms})


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def _check_scalars(group_size, beta) -> tuple[int, float]:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (leave-one-out baselines), got {group_size!r}")
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a float >= 0, got {beta!r}") from None
    if not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite float >= 0, got {beta!r}")
    return group_size, beta


def _prepare_inputs(logprobs, ref_logprobs, mask, rewards, group_size):
    """Validate shapes and return (logprobs, ref_logprobs, mask, rewards) in logprobs' dtype, padding zeroed."""
    for name, t in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask), ("rewards", rewards)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logprobs.dim() != 2 or not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating [B, T] tensor, "
                         f"got shape {tuple(logprobs.shape)}, {logprobs.dtype}")
    B, T = logprobs.shape
    for name, t in (("ref_logprobs", ref_logprobs), ("mask", mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match logprobs shape {(B, T)}")
    if rewards.shape != (B,):
        raise ValueError(f"rewards must have shape [B]=[{B}], got {tuple(rewards.shape)}")
    if B == 0 or B % group_size != 0:
        raise ValueError(f"batch size B={B} is not a positive multiple of group_size={group_size} "
                         "(each prompt's n samples must be contiguous)")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 and 1")
    dtype = logprobs.dtype
    keep = mask.bool()
    mask = mask.to(dtype)
    logprobs = _masked(logprobs, keep)
    ref_logprobs = _masked(ref_logprobs.detach().to(dtype), keep)
    return logprobs, ref_logprobs, mask, rewards.detach().to(dtype)


def _check_devices(logprobs: Tensor, **others) -> None:
    """Every tensor input on logprobs' device, else a ValueError naming the mismatched ones."""
    if not isinstance(logprobs, Tensor):
        return
    bad = [f"{k} on {t.device}" for k, t in others.items()
           if isinstance(t, Tensor) and t.device != logprobs.device]
    if bad:
        raise ValueError(f"compute_loss: logprobs is on {logprobs.device} but " + ", ".join(bad)
                         + "; move the batch to the policy's device first (Batch.to)")


@torch.no_grad()
def _metrics(out: LossOutput, logprobs, ref_logprobs, mask, rewards, group_size, on, token_kl) -> dict[str, float]:
    log_ratio = logprobs - ref_logprobs  # [B, T], padding already zero
    rg = _groups(rewards, group_size)  # [G, n]
    m = {
        "loss": out.loss.detach(),
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(unbiased=False),
        "reg_reward_mean": out.reg_rewards.mean(),
        "kl_k1": sequence_sum(log_ratio, mask).mean(),
        "kl_k3": sequence_sum(torch.exp(-log_ratio) + log_ratio - 1, mask).mean(),
        "consistency": group_half_variance(out.reg_rewards, group_size).mean(),
        "frac_groups_equal_reward": (rg == rg[:, :1]).all(-1).to(rewards.dtype).mean(),
        "on_policy_fraction": on.to(rewards.dtype).mean(),
        "adv_abs_mean": out.weights.abs().mean(),
        "completion_len_mean": mask.sum(-1).mean(),
    }
    if token_kl is not None:
        m["kl_token"] = sequence_sum(token_kl, mask).mean()
    m.update(out.terms)
    return {k: float(v) for k, v in m.items()}


def compute_loss(name: str, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, rewards: Tensor,
                 group_size: int, beta: float, **options) -> tuple[Tensor, dict[str, float]]:
    """Validate the inputs, run the registered loss `name`, and return (loss to minimise, metrics).

    Shapes: logprobs, ref_logprobs, mask [B, T]; rewards [B]; B = G * group_size, groups contiguous.
    Options are loss-specific (see loss_options(name)); an unknown option, an invalid value, or a
    tensor on another device than ``logprobs`` raises ValueError naming it.
    Metrics (plain floats): loss, reward_mean, reward_std, reg_reward_mean (mean R), kl_k1 (mean sequence
    sum of lp - ref), kl_k3 (mean sequence sum of exp(ref-lp) - (ref-lp) - 1), kl_token (if token_kl is
    given), consistency (C(R) averaged over groups), frac_groups_equal_reward, on_policy_fraction,
    adv_abs_mean (mean |w_b|), completion_len_mean, and the loss's own terms (loss_reward / loss_reg,
    loss_pd / loss_lr, loss_pg / loss_kl).
    """
    spec = loss_spec(name)
    _check_devices(logprobs, ref_logprobs=ref_logprobs, mask=mask, rewards=rewards,
                   on_policy=options.get("on_policy"), token_kl=options.get("token_kl"),
                   behavior_logprobs=options.get("behavior_logprobs"))
    group_size, beta = _check_scalars(group_size, beta)
    spec.validate(beta, group_size, options)
    if spec.needs_token_kl(options) and options.get("token_kl") is None:
        raise ValueError(f"{name}: needs the option token_kl with options {options} ([B, T] "
                         "full-vocabulary KL(pi||pi_ref) per position, differentiable)")
    if spec.needs_behavior(options):
        b = options.get("behavior_logprobs")
        if not isinstance(b, Tensor) or b.shape != logprobs.shape:
            raise ValueError(f"{name}: is_mode={options.get('is_mode')!r} needs behavior_logprobs, a "
                             f"tensor of shape {tuple(logprobs.shape)} (the sampler's log-probs)")
    logprobs, ref_logprobs, mask, rewards = _prepare_inputs(logprobs, ref_logprobs, mask, rewards, group_size)
    on = on_policy_mask(options.get("on_policy"), rewards.numel(), group_size, rewards.device)
    if "on_policy" in options:
        options["on_policy"] = on
    token_kl = options.get("token_kl")
    if token_kl is not None:
        if not isinstance(token_kl, Tensor) or token_kl.shape != logprobs.shape:
            raise ValueError(f"token_kl must be a tensor of shape {tuple(logprobs.shape)} (like logprobs)")
        token_kl = options["token_kl"] = _masked(token_kl.to(logprobs.dtype), mask)
    out = spec.fn(logprobs, ref_logprobs, mask, rewards, group_size, beta, **options)
    return out.loss, _metrics(out, logprobs, ref_logprobs, mask, rewards, group_size, on, token_kl)
