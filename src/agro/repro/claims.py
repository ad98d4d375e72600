"""The paper's LLM claims (§8, Figures 2-6) and ours (C6), as arms of the real trainer.

An *arm* is a named set of `TrainConfig` overrides on top of one shared base (the task, the model,
the step budget and the evaluation). Arm names are global, so a claim that needs an arm another
claim has already run (C1's `agro` is C2's lambda = 0, C4's p = 0, C5's default beta and C6's
lag 0) reuses its runs. A *claim* names its arms, the x-axis of its plots and the function that
turns the runs into a verdict (:mod:`agro.repro.verdicts`).

Departures from the paper (all forced by scale, and said in docs/PAPER.md): SmolLM2-135M-Instruct
instead of Llama-3 8B; two-operand arithmetic over 0..20 with + - * instead of MATH; 20 steps of
8 prompts x 4 samples per arm instead of epochs over the MATH train set; 3 seeds instead of 2;
held-out accuracy from one temperature-1 sample of each of the 275 held-out prompts (standard error
at most 0.0302, at p = 0.5) at steps 0, 10 and 20 (offline: after every epoch).
"""
from __future__ import annotations

from dataclasses import dataclass, field

# The task (why it was chosen: docs/PAPER.md "The task"). 1323 problems, 275 held out by hash.
TASK = {"task": "arithmetic", "arithmetic_range": "0-20:+-*", "prompt_template": "number",
        "max_new_tokens": 24}

BETA = 0.02                         # the default beta (TrainConfig.beta)
BETA_LO, BETA_HI = 0.0063, 0.063    # C5: with BETA, a decade (x sqrt(10) steps) around it
BETA_SAFE = 0.5                     # C2: above 1/2 - p for every prompt, where §4.6 says lambda=1 is safe

FULL_BASE = dict(
    TASK, model="default", precision="fp32", steps=20, prompts_per_step=8, group_size=4,
    micro_batch_groups=2, micro_batch_tokens=4096, lr=2e-5, warmup_steps=2, beta=BETA, loss="agro",
    eval_prompts=275, eval_samples=1, eval_every=10, eval_before=False,
    save_every=5, keep_checkpoints=1, save_final=False, tensorboard=False, plot=False,
    progress=False,
)
# Offline (C3): one file of OFFLINE_PROMPTS groups sampled once from pi_ref; OFFLINE_EPOCHS passes.
FULL_OFFLINE = dict(prompts=32, epochs=5, seed=1234)

QUICK_BASE = dict(
    FULL_BASE, steps=2, prompts_per_step=2, group_size=2, micro_batch_groups=1,
    max_new_tokens=6, eval_prompts=6, eval_samples=1, eval_every=1, save_every=1,
    generation_batch_size=16,
)
QUICK_OFFLINE = dict(prompts=4, epochs=2, seed=1234)


# Exact Eq. 6 (agro_math.md §4.2): lambda = 1, no baseline on the LR term, vanilla estimator,
# sequence-sum log-probs; pinned so a changed default cannot change what C2 tests.
EQ6 = {"lr_coef": 1.0, "lr_baseline": "none", "reg_estimator": "vanilla", "logprob_reduction": "sum"}


# c7: the staleness bounds and the three learners: agro and kl_pg with no importance weights, and
# grpo with the peers' correction (TRL 1.16's defaults: sequence-level ratio, masked above 3).
ASYNC_K = (0, 1, 4)
GRPO_IS = {"is_mode": "sequence_mask", "is_cap": 3.0}
ASYNC_LOSSES = (("agro", "agro", {}), ("kl_pg", "kl_pg", {"loss": "kl_pg"}),
                ("grpo_is", "grpo + masked IS", {"loss": "grpo", "loss_options": GRPO_IS}))
# ... and, at k = 1 and 4 (added after the first 27 runs, issue 10), the two arms that tell grpo's
# loss from its correction: the same ratio truncated at 3 instead of masked, and no correction.
# (At k = 0 the samples come from pi itself: the ratio is ~1, within 1e-5 in C7's k = 0 runs
# (docs/paper/c7/run_metrics.csv), so the three grpo arms would be one.)
GRPO_TIS = {"is_mode": "sequence_truncate", "is_cap": 3.0}
ASYNC_K_GRPO = (4, 1)
ASYNC_GRPO_EXTRA = (("grpo_tis", "grpo + truncated IS", {"loss": "grpo", "loss_options": GRPO_TIS}),
                    ("grpo", "grpo, no IS", {"loss": "grpo"}))


def _async_losses(k: int) -> tuple:
    """c7's learners at max_staleness k: their (name, label, overrides)."""
    return ASYNC_LOSSES + (ASYNC_GRPO_EXTRA if k in ASYNC_K_GRPO else ())


@dataclass(frozen=True)
class Arm:
    """One arm: `TrainConfig` overrides on the base. ``offline``: trains on the shared file."""

    name: str
    label: str
    overrides: dict = field(default_factory=dict)
    offline: bool = False


def _arm(name, label, offline=False, **overrides) -> Arm:
    return Arm(name, label, overrides, offline)


ARMS: dict[str, Arm] = {a.name: a for a in [
    _arm("agro", "agro (beta=0.02)"),
    _arm("kl_pg", "kl_pg (beta=0.02)", loss="kl_pg"),
    _arm("agro_on", "agro_on lambda=1 (beta=0.02)", loss="agro_on", loss_options=EQ6),
    _arm("agro_on-b0.5", "agro_on lambda=1 (beta=0.5)", loss="agro_on", beta=BETA_SAFE,
         loss_options=EQ6),
    _arm("agro-b0.5", "agro = lambda=0 (beta=0.5)", beta=BETA_SAFE),
    _arm("agro-b0", "agro (beta=0)", beta=0.0),
    _arm("agro-b0.0063", "agro (beta=0.0063)", beta=BETA_LO),
    _arm("agro-b0.063", "agro (beta=0.063)", beta=BETA_HI),
    _arm("replay-p0.5", "agro, replay p=0.5", source="replay", replay_prob=0.5),
    _arm("replay-p0.9", "agro, replay p=0.9", source="replay", replay_prob=0.9),
    _arm("stale2-agro", "agro, lag 2", source="stale", stale_lag=2),
    _arm("stale8-agro", "agro, lag 8", source="stale", stale_lag=8),
    _arm("stale2-kl_pg", "kl_pg, lag 2", source="stale", stale_lag=2, loss="kl_pg"),
    _arm("stale8-kl_pg", "kl_pg, lag 8", source="stale", stale_lag=8, loss="kl_pg"),
    _arm("offline-agro", "agro (beta=0.02), offline", offline=True),
    _arm("offline-kl_pg_token", "kl_pg_token (beta=0.02), offline", offline=True,
         loss="kl_pg_token"),
    _arm("offline-pg", "PG, beta=0, offline", offline=True, loss="kl_pg", beta=0.0),
    # c7: Ray rollout actors ahead of the learner by max_staleness = k versions (issue 10)
    *[_arm(f"async{k}-{name}", f"{label}, async k={k}", async_generation=True, max_staleness=k,
           **over)
      for k in ASYNC_K for name, label, over in _async_losses(k)],
]}


@dataclass(frozen=True)
class Claim:
    name: str
    title: str
    statement: str          # the claim as the issue / paper states it
    arms: tuple[str, ...]
    x: str = "step"         # x-axis of the accuracy plot: "step" or "epoch"
    kl_plot: bool = True
    # the plots' panels, side by side on a shared accuracy axis: (title, arms) each, together
    # every arm once, each panel's series a prefix of one order of learners (so a learner keeps
    # its colour); empty: one panel with every arm
    panels: tuple[tuple[str, tuple[str, ...]], ...] = ()


CLAIMS: dict[str, Claim] = {c.name: c for c in [
    Claim("c1", "On-policy: agro and kl_pg behave the same (Fig. 2)",
          "With fresh on-policy samples, off-policy AGRO (agro) and RLOO-style KL-regularized PG "
          "(kl_pg) behave the same within seed noise.",
          ("agro", "kl_pg")),
    Claim("c2", "On-policy AGRO (Eq. 6) learns fastest (Figs. 2-3) - and the §4.6 pitfall",
          "On-policy AGRO (agro_on, lambda = 1) learns faster per sample and reaches the best "
          "held-out accuracy. §4.6 predicts instead that at pi_ref descent on the exact on-policy "
          "loss lowers a prompt's success probability p whenever p < 1/2 - beta: lambda = 1 "
          "collapses at the default beta and is safe at beta = 0.5.",
          ("agro_on", "agro", "agro_on-b0.5", "agro-b0.5")),
    Claim("c3", "Offline: agro beats per-token KL-PG; beta = 0 degrades (Fig. 5)",
          "Fully offline (one file of groups sampled once from pi_ref, several epochs over it): "
          "agro beats kl_pg_token in peak and fixed-epoch held-out accuracy, and unregularized "
          "PG (beta = 0) degrades as epochs go on.",
          ("offline-agro", "offline-kl_pg_token", "offline-pg"), x="epoch", kl_plot=True),
    Claim("c4", "Replay: off-policy is as KL-efficient as on-policy (Fig. 4)",
          "Replay with probability p in {0, 0.5, 0.9}: off-policy learning is as KL-efficient as "
          "on-policy (accuracy vs KL(pi||pi_ref) curves overlap), while on-policy moves further "
          "per step.",
          ("agro", "replay-p0.5", "replay-p0.9")),
    Claim("c5", "beta: larger learns slower but is more KL-efficient (Fig. 6)",
          "beta in {0, 0.0063, 0.02, 0.063}: larger beta learns more slowly but is more "
          "KL-efficient; beta = 0 is KL-inefficient (and, off-policy, unstable: see c3).",
          ("agro-b0", "agro-b0.0063", "agro", "agro-b0.063")),
    Claim("c6", "Stale data without importance weights (ours)",
          "With generation lagging the learner by k in {0, 2, 8} policy versions and no "
          "importance weights, agro keeps its lag-0 accuracy and does at least as well as "
          "kl_pg at equal staleness.",
          ("agro", "stale2-agro", "stale8-agro", "kl_pg", "stale2-kl_pg", "stale8-kl_pg"),
          panels=(("lag 0", ("agro", "kl_pg")), ("lag 2", ("stale2-agro", "stale2-kl_pg")),
                  ("lag 8", ("stale8-agro", "stale8-kl_pg")))),
    Claim("c7", "Asynchronous actors at bounded staleness, no importance weights (ours, issue 10)",
          "With generation in Ray actors running ahead of the learner by max_staleness k in "
          "{0, 1, 4} policy versions, agro with no importance weights keeps its k = 0 accuracy "
          "and does at least as well as kl_pg (no importance weights) and as grpo with the "
          "peers' importance sampling, masked and truncated, at equal staleness.",
          # the first 27 runs' arms, then the grpo arms added later (most stale first: the order
          # they run in)
          tuple(f"async{k}-{n}" for k in ASYNC_K for n, _, _ in ASYNC_LOSSES)
          + tuple(f"async{k}-{n}" for k in ASYNC_K_GRPO for n, _, _ in ASYNC_GRPO_EXTRA),
          panels=tuple((f"max_staleness k = {k}", tuple(f"async{k}-{n}" for n, _, _ in _async_losses(k)))
                       for k in ASYNC_K)),
]}


def claim(name: str) -> Claim:
    if name not in CLAIMS:
        raise KeyError(f"unknown claim {name!r}; valid: {', '.join(CLAIMS)}")
    return CLAIMS[name]
