"""Tabular policies on which every AGRO expectation is an exact finite sum (agro_math.md §1-§6, §10).

A `TabularProblem` is a set of P prompts, each with a vocabulary of V tokens and responses of fixed
length T. The policy keeps one logit vector per prefix node (V^0 + ... + V^(T-1) nodes), so
`pi(y|x) = prod_t softmax(theta[x, node(y_<t)])[y_t]` over the M = V^T responses. A bandit is the
case T = 1 (one node, V = K actions). Everything is float64 and every gradient is torch autograd.

What lives here:
- exact quantities (§1-§6): J(pi), pi* (Eq. 2), V* = beta log Z, KL(pi||pi*), KL(pi||pi_ref),
  R_pi, the off-policy consistency loss L(pi, mu) = 1/2 Var_mu[R_pi], L_on, g_PD / g_LR,
  the optimal per-node logits (backward induction on log Z), and per-token quantities;
- enumeration of all n-tuples of responses, with their probabilities;
- the bridge `loss_inputs` that turns a tabular policy and sampled responses into the per-token
  tensors `logprobs / ref_logprobs / mask / rewards / token_kl` that `agro.losses.compute_loss`
  takes, so that estimator gradients in the lab are autograd through the real loss code;
- `per_group_gradients` / `expected_gradient`: the exact expectation (and variance) of the
  gradient of any loss over all n-tuples, with one batched `compute_loss` call;
- reference token-level surrogates of §5 (g1, g2, g3, g3+, G_sq, g1_off, g_local_off), written
  independently of `agro.losses` to cross-check it.

Departures from the paper: none in the math. All responses have the same length T (mask of ones).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

DTYPE = torch.float64

__all__ = [
    "TabularProblem", "LossInputs", "loss_inputs", "needs_token_kl", "run_loss",
    "objective", "optimal_logprobs", "optimal_value", "optimal_logits", "kl_to_optimal",
    "kl_to_ref", "regularized_reward", "consistency_loss", "on_policy_loss", "pd_lr_gradients",
    "policy_probs", "gradient", "scores",
    "enumerate_tuples", "expectation", "per_group_gradients", "expected_gradient",
    "sample_responses", "token_surrogates",
]


# ----------------------------------------------------------------------------------------------
# The problem: prompts, reference policy, rewards, beta
# ----------------------------------------------------------------------------------------------
@dataclass
class TabularProblem:
    """P prompts, vocabulary V, responses of length T, one logit vector per prefix node.

    Attributes:
        ref_logits: [P, N, V] reference logits per prefix node, N = sum_{t<T} V^t.
        rewards:    [P, M] reward of each complete response, M = V^T (response id = the tokens
                    read as a base-V number, first token most significant).
        beta:       KL coefficient (> 0).
        T:          response length (1 = bandit).
    Derived (set in __post_init__):
        seq_tokens: [M, T] token ids of each response.
        seq_nodes:  [M, T] prefix node of each position of each response.
    """

    ref_logits: Tensor
    rewards: Tensor
    beta: float
    T: int = 1

    def __post_init__(self) -> None:
        self.ref_logits = torch.as_tensor(self.ref_logits, dtype=DTYPE)
        self.rewards = torch.as_tensor(self.rewards, dtype=DTYPE)
        P, N, V = self.ref_logits.shape
        M = V ** self.T
        if N != sum(V ** t for t in range(self.T)):
            raise ValueError(f"ref_logits has {N} nodes; V={V}, T={self.T} needs "
                             f"{sum(V ** t for t in range(self.T))}")
        if self.rewards.shape != (P, M):
            raise ValueError(f"rewards must be [P, M] = [{P}, {M}], got {tuple(self.rewards.shape)}")
        if not self.beta > 0:
            raise ValueError("beta must be > 0")
        ids = torch.arange(M)
        place = [V ** (self.T - 1 - t) for t in range(self.T)]
        offset = [sum(V ** s for s in range(t)) for t in range(self.T)]
        self.seq_tokens = torch.stack([(ids // place[t]) % V for t in range(self.T)], 1)  # [M, T]
        self.seq_nodes = torch.stack([offset[t] + ids // (V ** (self.T - t))
                                      for t in range(self.T)], 1)                        # [M, T]
        self._offset = offset
        self._ref_token_logprobs = self.token_logprobs(self.ref_logits)           # [P, M, T]

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def bandit(cls, ref_logits: Tensor, rewards: Tensor, beta: float) -> "TabularProblem":
        """A K-armed bandit per prompt: ref_logits [P, K] (or [K]), rewards [P, K] (or [K])."""
        ref_logits = torch.as_tensor(ref_logits, dtype=DTYPE)
        rewards = torch.as_tensor(rewards, dtype=DTYPE)
        if ref_logits.dim() == 1:
            ref_logits, rewards = ref_logits[None], rewards[None]
        return cls(ref_logits[:, None, :], rewards, beta, T=1)

    @classmethod
    def random(cls, V: int, T: int, beta: float, prompts: int = 1,
               generator: torch.Generator | None = None) -> "TabularProblem":
        """ref logits ~ N(0, 1) per node, rewards ~ U[0, 1] per response."""
        N = sum(V ** t for t in range(T))
        ref = torch.randn(prompts, N, V, dtype=DTYPE, generator=generator)
        r = torch.rand(prompts, V ** T, dtype=DTYPE, generator=generator)
        return cls(ref, r, beta, T)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def P(self) -> int:
        return self.ref_logits.shape[0]

    @property
    def N(self) -> int:
        return self.ref_logits.shape[1]

    @property
    def V(self) -> int:
        return self.ref_logits.shape[2]

    @property
    def M(self) -> int:
        return self.rewards.shape[1]

    def select(self, prompts: Tensor | list[int]) -> "TabularProblem":
        """The problem restricted to / tiled over the given prompt indices ([G] long)."""
        idx = torch.as_tensor(prompts, dtype=torch.long)
        return TabularProblem(self.ref_logits[idx], self.rewards[idx], self.beta, self.T)

    def init_theta(self) -> Tensor:
        """theta_0 = theta_ref, a fresh leaf [P, N, V] with requires_grad=True."""
        return self.ref_logits.clone().requires_grad_(True)

    # -- per-token and per-response log-probabilities ------------------------------------------
    def token_logprobs(self, theta: Tensor) -> Tensor:
        """[P, M, T] log pi(y_t | x, y_<t) for every response y and position t."""
        lsm = torch.log_softmax(theta, -1)                      # [P, N, V]
        return lsm[:, self.seq_nodes, self.seq_tokens]         # [P, M, T]

    def seq_logprobs(self, theta: Tensor) -> Tensor:
        """[P, M] log pi(y|x) = sum_t log pi(y_t|x, y_<t)."""
        return self.token_logprobs(theta).sum(-1)

    def node_kl(self, theta: Tensor) -> Tensor:
        """[P, N] full-vocabulary KL(pi(.|x,h) || pi_ref(.|x,h)) at every prefix node h."""
        lsm = torch.log_softmax(theta, -1)
        ref = torch.log_softmax(self.ref_logits, -1)
        return (lsm.exp() * (lsm - ref)).sum(-1)

    def token_kl(self, theta: Tensor) -> Tensor:
        """[P, M, T] KL_t = KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t)) along every response (§3.4, §5)."""
        return self.node_kl(theta)[:, self.seq_nodes]

    @property
    def ref_token_logprobs(self) -> Tensor:
        """[P, M, T] per-token reference log-probs (cached: the reference is fixed)."""
        return self._ref_token_logprobs

    @property
    def ref_seq_logprobs(self) -> Tensor:
        """[P, M] log pi_ref(y|x)."""
        return self._ref_token_logprobs.sum(-1)


# ----------------------------------------------------------------------------------------------
# Exact quantities (sequence level). theta: [P, N, V]; results per prompt [P] or [P, M].
# ----------------------------------------------------------------------------------------------
def policy_probs(problem: TabularProblem, theta: Tensor) -> Tensor:
    """[P, M] pi(y|x)."""
    return problem.seq_logprobs(theta).exp()


def regularized_reward(problem: TabularProblem, theta: Tensor) -> Tensor:
    """[P, M] R_pi(x,y) = r(x,y) - beta * (log pi(y|x) - log pi_ref(y|x))   (§2)."""
    return problem.rewards - problem.beta * (problem.seq_logprobs(theta) - problem.ref_seq_logprobs)


def objective(problem: TabularProblem, theta: Tensor) -> Tensor:
    """[P] J(pi) = E_pi r - beta KL(pi||pi_ref) = E_pi R_pi   (Eq. 1)."""
    p = policy_probs(problem, theta)
    return (p * regularized_reward(problem, theta)).sum(-1)


def optimal_logprobs(problem: TabularProblem) -> Tensor:
    """[P, M] log pi*(y|x) = log pi_ref + r/beta - log Z   (Eq. 2)."""
    return torch.log_softmax(problem.ref_seq_logprobs + problem.rewards / problem.beta, -1)


def optimal_value(problem: TabularProblem) -> Tensor:
    """[P] V*(x) = beta log Z(x)   (§1 remark)."""
    return problem.beta * torch.logsumexp(problem.ref_seq_logprobs + problem.rewards / problem.beta, -1)


def optimal_logits(problem: TabularProblem) -> Tensor:
    """[P, N, V] per-node logits whose sequence policy is exactly pi* (§7 token-level consistency).

    Backward induction on log Z: log Z(y) = r(y)/beta for a complete y, log Z(h) =
    logsumexp_a [log pi_ref(a|h) + log Z(ha)], and log pi*(a|h) = log pi_ref(a|h) + log Z(ha) - log Z(h).
    """
    P, V, T = problem.P, problem.V, problem.T
    ref = torch.log_softmax(problem.ref_logits, -1)              # [P, N, V]
    out = torch.empty_like(ref)
    logz_next = problem.rewards / problem.beta                   # [P, V^T]
    for t in range(T - 1, -1, -1):
        lo = problem._offset[t]
        ref_t = ref[:, lo:lo + V ** t]                           # [P, V^t, V]
        child = logz_next.reshape(P, V ** t, V)                  # [P, V^t, V]
        out[:, lo:lo + V ** t] = torch.log_softmax(ref_t + child, -1)
        logz_next = torch.logsumexp(ref_t + child, -1)           # [P, V^t]
    return out


def kl_to_optimal(problem: TabularProblem, theta: Tensor) -> Tensor:
    """[P] KL(pi(.|x) || pi*(.|x))   (§6, the Figure-1 metric)."""
    lp = problem.seq_logprobs(theta)
    return (lp.exp() * (lp - optimal_logprobs(problem))).sum(-1)


def kl_to_ref(problem: TabularProblem, theta: Tensor) -> Tensor:
    """[P] KL(pi(.|x) || pi_ref(.|x)), exact sequence-level KL."""
    lp = problem.seq_logprobs(theta)
    return (lp.exp() * (lp - problem.ref_seq_logprobs)).sum(-1)


def _half_var(w: Tensor, R: Tensor) -> Tensor:
    """1/2 sum_y w(y) (R(y) - sum_y' w R)^2 along the last dim."""
    return 0.5 * (w * (R - (w * R).sum(-1, keepdim=True)) ** 2).sum(-1)


def consistency_loss(problem: TabularProblem, theta: Tensor, mu: Tensor) -> Tensor:
    """[P] off-policy loss L(pi, mu) = 1/2 Var_{y~mu}[R_pi(x,y)]   (§2). mu: [P, M] fixed probs."""
    return _half_var(mu, regularized_reward(problem, theta))


def on_policy_loss(problem: TabularProblem, theta: Tensor) -> Tensor:
    """[P] L_on(pi) = 1/2 Var_{y~pi}[R_pi(x,y)], pi in both slots   (§2)."""
    return _half_var(policy_probs(problem, theta), regularized_reward(problem, theta))


def gradient(fn: Callable[[Tensor], Tensor], theta: Tensor) -> Tensor:
    """Autograd gradient of fn(theta).sum() w.r.t. theta (a detached copy is differentiated)."""
    th = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(th).sum(), th)
    return g


def pd_lr_gradients(problem: TabularProblem, theta: Tensor) -> tuple[Tensor, Tensor]:
    """(g_PD, g_LR), each [P, N, V]: the two parts of grad L_on   (§4.1).

    g_PD differentiates only the R_pi slot (sampling distribution frozen at pi);
    g_LR differentiates only the sampling slot (R_pi frozen).
    """
    pi = policy_probs(problem, theta).detach()
    R = regularized_reward(problem, theta).detach()
    g_pd = gradient(lambda th: consistency_loss(problem, th, pi), theta)
    g_lr = gradient(lambda th: _half_var(policy_probs(problem, th), R), theta)
    return g_pd, g_lr


def scores(problem: TabularProblem, theta: Tensor) -> Tensor:
    """[P, M, N, V] s(y) = grad_theta log pi(y|x) w.r.t. the prompt's own logits (autograd)."""
    th = theta.detach()
    jac = torch.autograd.functional.jacobian(problem.seq_logprobs, th)   # [P, M, P, N, V]
    return torch.stack([jac[p, :, p] for p in range(problem.P)])


# ----------------------------------------------------------------------------------------------
# Sampling, enumeration and the bridge to agro.losses.compute_loss
# ----------------------------------------------------------------------------------------------
def sample_responses(probs: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """[P, n] i.i.d. response ids y ~ probs [P, M] for every prompt."""
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def enumerate_tuples(probs: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """All M^n ordered n-tuples of responses and their i.i.d. probabilities.

    probs: [M]. Returns tuples [M^n, n] (long) and weights [M^n] = prod_i probs[y_i] (sum to 1).
    """
    M = probs.shape[-1]
    tuples = torch.tensor(list(itertools.product(range(M), repeat=n)), dtype=torch.long)
    return tuples, probs[tuples].prod(-1)


def expectation(fn: Callable[[tuple[int, ...]], Tensor], probs: Tensor, n: int) -> Tensor:
    """Reference loop: sum over all n-tuples y of prod_i probs[y_i] * fn(y). probs: [M]."""
    tuples, w = enumerate_tuples(probs, n)
    return sum(wi * fn(tuple(t.tolist())) for t, wi in zip(tuples, w))


@dataclass
class LossInputs:
    """Per-token tensors for `agro.losses.compute_loss`, rows grouped by prompt (B = P * n).

    logprobs:     [B, T] log pi_theta(y_t|x, y_<t) of the sampled responses (differentiable).
    ref_logprobs: [B, T] log pi_ref(y_t|x, y_<t).
    mask:         [B, T] ones (all responses have length T).
    rewards:      [B]    r(x, y).
    token_kl:     [B, T] full-vocabulary KL_t along each response (differentiable), or None
                  when not requested.
    group_size:   n, the number of consecutive rows per prompt.
    """

    logprobs: Tensor
    ref_logprobs: Tensor
    mask: Tensor
    rewards: Tensor
    token_kl: Tensor | None
    group_size: int


def loss_inputs(problem: TabularProblem, theta: Tensor, responses: Tensor,
                with_token_kl: bool = True) -> LossInputs:
    """Turn a tabular policy and sampled responses into `compute_loss` inputs.

    theta: [P, N, V] logits (gradients flow into it); responses: [P, n] response ids, one group
    of n per prompt. Row b = p * n + i holds response responses[p, i].
    """
    P, n = responses.shape
    T = problem.T
    idx = responses[..., None].expand(P, n, T)                               # [P, n, T]
    lp = problem.token_logprobs(theta).gather(1, idx)                        # [P, n, T]
    ref = problem.ref_token_logprobs.gather(1, idx)                          # [P, n, T]
    r = problem.rewards.gather(1, responses)                                 # [P, n]
    B = P * n
    kl = problem.token_kl(theta).gather(1, idx).reshape(B, T) if with_token_kl else None
    return LossInputs(logprobs=lp.reshape(B, T), ref_logprobs=ref.reshape(B, T),
                      mask=torch.ones(B, T, dtype=DTYPE), rewards=r.reshape(B),
                      token_kl=kl, group_size=n)


def needs_token_kl(name: str, **options) -> bool:
    """Whether compute_loss(name, ..., **options) takes the `token_kl` option (asks the registry)."""
    from agro import losses

    return losses.loss_spec(name).needs_token_kl(options)


def run_loss(name: str, inputs: LossInputs, beta: float, *, fast: bool = False,
             **options) -> Tensor:
    """loss = agro.losses.compute_loss(name, ...)[0] on lab inputs; token_kl passed when needed.

    fast=True calls the registered loss function `agro.losses.LOSSES[name].fn` directly: the same
    loss code that compute_loss dispatches to, without its input validation and metrics (which
    cost about half of a tiny step). Lab inputs are always valid (float64, full mask, contiguous
    groups), so both give the same loss and gradient (checked in tests/test_lab.py).
    """
    from agro import losses

    if needs_token_kl(name, **options):
        if inputs.token_kl is None:
            raise ValueError(f"{name} with {options} needs token_kl; build inputs with it")
        options.setdefault("token_kl", inputs.token_kl)
    args = (inputs.logprobs, inputs.ref_logprobs, inputs.mask, inputs.rewards, inputs.group_size,
            beta)
    if fast:
        return losses.LOSSES[name].fn(*args, **options).loss
    return losses.compute_loss(name, *args, **options)[0]


LossFn = Callable[[LossInputs], Tensor]


def per_group_gradients(problem: TabularProblem, theta: Tensor, tuples: Tensor, loss_fn: LossFn,
                        prompt: int = 0) -> Tensor:
    """Gradient of the loss of each group alone, for many groups at once: [G, N, V].

    Every group g (a row of tuples [G, n], response ids of prompt `prompt`) gets its own copy of
    the prompt's logits, so one backward pass through one batched loss call (B = G * n) yields
    all per-group gradients. With a loss that is a mean over rows (1/B convention) the gradient
    w.r.t. copy g is 1/G of the gradient of the same loss on group g alone; we undo that factor.
    This relies on groups not interacting inside the loss, which holds for every group loss.
    """
    G = tuples.shape[0]
    sub = problem.select([prompt] * G)
    th = theta.detach()[prompt].expand(G, *theta.shape[1:]).clone().requires_grad_(True)
    loss = loss_fn(loss_inputs(sub, th, tuples))
    (g,) = torch.autograd.grad(loss, th)
    return g * G


def expected_gradient(problem: TabularProblem, theta: Tensor, probs: Tensor, n: int,
                      loss_fn: LossFn, prompt: int = 0) -> tuple[Tensor, Tensor]:
    """Exact E over y_1..y_n ~ probs (i.i.d.) of the gradient of loss_fn on one group.

    probs: [M] sampling distribution of prompt `prompt`. Returns (mean [N, V], total variance =
    E ||g - E g||^2, a scalar), enumerating all M^n tuples in one batched loss call.
    """
    tuples, w = enumerate_tuples(probs.detach(), n)
    g = per_group_gradients(problem, theta, tuples, loss_fn, prompt)          # [G, N, V]
    mean = torch.einsum("g,gnv->nv", w, g)
    var = torch.einsum("g,g->", w, ((g - mean) ** 2).sum((1, 2)))
    return mean, var


# ----------------------------------------------------------------------------------------------
# Reference token-level surrogates (§5, App. B.3), independent of agro.losses
# ----------------------------------------------------------------------------------------------
def token_surrogates(problem: TabularProblem, theta: Tensor, responses: Tensor,
                     mu_logits: Tensor | None = None) -> dict[str, Tensor]:
    """Per-response surrogate scalars whose autograd gives the §5 estimators: dict of [P, n].

    responses: [P, n]. Keys (gradients of the surrogate for one response y):
      g1      = (sum_t s_t)(sum_s l_s)                       -> 1/2 l(y)^2
      g2      = sum_t s_t sum_{s>=t} l_s                     (drops the lower triangle)
      g3      = sum_t [grad KL_t + s_t sum_{s>t} l_s]        (local expectation)
      g3p     = sum_t [grad KL_t + s_t sum_{s>t} sg(KL_s)]   (g3+)
      tok     = sum_t grad KL_t                              (per-token KL penalty, biased)
      gsq     = G_sq(y), App. B.3 estimate of E_pi[s l^2] (l held fixed)
      sl2     = s(y) sg(l(y)^2)                              (vanilla estimate of E_pi[s l^2])
    and, when mu_logits [P, N, V] (an autoregressive behaviour policy) is given:
      g_local_off = sum_t [sum_a mu(a|y_<t) l_t(a) grad log pi(a|y_<t) + s_t sum_{s!=t} l_s]
    """
    P, n = responses.shape
    T = problem.T
    idx = responses[..., None].expand(P, n, T)
    lp = problem.token_logprobs(theta).gather(1, idx)                        # [P, n, T]
    l = lp - problem.ref_token_logprobs.gather(1, idx)                       # [P, n, T]
    kl = problem.token_kl(theta).gather(1, idx)                              # [P, n, T]
    sg_l, sg_kl = l.detach(), kl.detach()
    L = sg_l.sum(-1, keepdim=True)                                           # [P, n, 1]
    incl = sg_l.flip(-1).cumsum(-1).flip(-1)                                 # sum_{s>=t} l_s
    excl = incl - sg_l                                                       # sum_{s>t} l_s
    excl_kl = sg_kl.flip(-1).cumsum(-1).flip(-1) - sg_kl                     # sum_{s>t} KL_s
    upto = sg_l.cumsum(-1)                                                   # L_{<=t}
    before = upto - sg_l                                                     # L_{<t}
    # per-node full-vocab terms along the responses
    lsm = torch.log_softmax(theta, -1)                                       # [P, N, V]
    ref = torch.log_softmax(problem.ref_logits, -1)
    nodes = problem.seq_nodes[responses]                                     # [P, n, T]
    pidx = torch.arange(P)[:, None, None]
    lsm_rows = lsm[pidx, nodes]                                              # [P, n, T, V]
    lvec = (lsm_rows - ref[pidx, nodes]).detach()                            # l_t(a)
    out = {
        "g1": 0.5 * l.sum(-1) ** 2,
        "g2": (lp * incl).sum(-1),
        "g3": (kl + lp * excl).sum(-1),
        "g3p": (kl + lp * excl_kl).sum(-1),
        "tok": kl.sum(-1),
        "gsq": (lp * (L ** 2 - upto ** 2) + (lsm_rows.exp() * lvec ** 2).sum(-1)
                + 2 * before * kl).sum(-1),
        "sl2": lp.sum(-1) * L[..., 0] ** 2,
    }
    if mu_logits is not None:
        mu_rows = torch.softmax(mu_logits, -1)[pidx, nodes]                  # [P, n, T, V]
        local = 0.5 * (mu_rows * (lsm_rows - ref[pidx, nodes]) ** 2).sum(-1)  # grad: sum_a mu l_t grad lp
        out["g_local_off"] = (local + lp * (L - sg_l)).sum(-1)
    return out
