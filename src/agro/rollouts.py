"""Typed rollout records: the unit of data everywhere in agro is a *group*.

A :class:`Group` is one prompt with its ``n >= 2`` completions, their rewards, their per-token
reference log-probabilities (computed once, when the group is scored, and stored with it), and
its provenance: which source produced it (fresh, replay, offline, stale), which policy version
sampled it, and with which sampling settings. Groups are sampled whole, stored whole, replayed
whole and mixed whole.

:func:`collate` turns a list of groups into a :class:`Batch` of padded tensors laid out as
``[left-padded prompt | right-padded completion]`` so that every completion starts at the same
column ``prompt_len``: the policy's logits for all completion tokens are then one contiguous slice.

Departure from the paper: none in substance. The paper trains on fresh or buffered samples; the
provenance fields are ours, so that on-policy-only terms (§4.2 of agro_math.md) can be switched
off for groups that are not fresh temperature-1 samples of the current policy.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

SOURCES = ("fresh", "replay", "offline", "stale")


def samples_from_pi(temperature: float, top_p: float, top_k: int | None, greedy: bool = False) -> bool:
    """The one rule for "these sampling settings draw from pi itself": temperature 1, no top-p or
    top-k truncation, not greedy (agro_math.md §4.2: on-policy estimators need exactly pi)."""
    return (not greedy and math.isclose(temperature, 1.0) and top_p >= 1.0
            and (top_k is None or top_k <= 0))


@dataclass
class Group:
    """One prompt and its n completions, with everything the learner needs.

    Per-sample lists all have length ``n``; ``ref_logprobs[i]`` has one float per token of
    ``completion_ids[i]``.
    """

    prompt_id: str
    prompt_ids: list[int]                # tokenized prompt (chat template applied)
    completion_ids: list[list[int]]      # [n][T_i] completion tokens (EOS included if emitted)
    rewards: list[float]                 # [n]
    ref_logprobs: list[list[float]] | None = None   # [n][T_i] log pi_ref(y_t | x, y_<t)
    behavior_logprobs: list[list[float]] | None = None  # [n][T_i] log mu, when known
    prompt: str = ""                     # prompt text as the model saw it (for logs and files)
    completions: list[str] = field(default_factory=list)  # [n] decoded completions
    answer: str = ""                     # gold answer
    source: str = "fresh"                # one of SOURCES
    policy_version: int = -1             # policy version that sampled it (-1: unknown / external)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    correct: list[float] | None = None   # [n] 1/0 task correctness (reward may add shaping)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.completion_ids)

    @property
    def samples_from_pi(self) -> bool:
        """True if the sampling settings draw from pi itself (temperature 1, no truncation) and
        the sampler's numerics were accepted as pi's (``meta["pi_exact"]``, set False for vLLM
        samples when the run's measured mismatch is above its tolerance)."""
        return (samples_from_pi(self.temperature, self.top_p, self.top_k)
                and self.meta.get("pi_exact", True) is not False)

    def is_on_policy(self, current_version: int) -> bool:
        """Whether on-policy-only loss terms are valid for this group at `current_version`.

        Only fresh groups sampled at temperature 1 / top_p 1 / no top-k by the *current*
        policy qualify; replayed, offline and stale groups use the off-policy form.
        """
        return (
            self.source == "fresh"
            and self.samples_from_pi
            and self.policy_version == current_version
        )

    def with_source(self, source: str) -> "Group":
        g = Group(**{**asdict(self), "source": source})
        return g

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Group":
        return cls(**d)


@dataclass
class Batch:
    """Padded tensors for a list of groups (B = G * n samples, contiguous per group).

    Layout: ``input_ids[b] = [pad.. prompt | completion ..pad]``; completion token ``t`` of
    sample ``b`` sits at column ``prompt_len + t``.
    """

    input_ids: torch.Tensor        # [B, P + T] long
    attention_mask: torch.Tensor   # [B, P + T] long (1 on real tokens)
    completion_mask: torch.Tensor  # [B, T] float (1.0 on completion tokens)
    completion_ids: torch.Tensor   # [B, T] long (pad where mask is 0)
    ref_logprobs: torch.Tensor     # [B, T] float32 (0 on padding)
    rewards: torch.Tensor          # [B] float32
    on_policy: torch.Tensor        # [B] bool
    group_size: int
    prompt_len: int                # P
    behavior_logprobs: torch.Tensor | None = None   # [B, T] float32 log mu (0 on padding); None
                                                    # unless every group recorded them

    @property
    def num_samples(self) -> int:
        return int(self.rewards.shape[0])

    def to(self, device) -> "Batch":
        """The same batch with every tensor on ``device`` (the one place a batch moves to the
        policy's device before the loss)."""
        tensors = {f: getattr(self, f).to(device) for f in
                   ("input_ids", "attention_mask", "completion_mask", "completion_ids",
                    "ref_logprobs", "rewards", "on_policy")}
        beh = None if self.behavior_logprobs is None else self.behavior_logprobs.to(device)
        return Batch(**tensors, group_size=self.group_size, prompt_len=self.prompt_len,
                     behavior_logprobs=beh)


def collate(
    groups: Sequence[Group], pad_token_id: int, current_version: int, require_ref: bool = True
) -> Batch:
    """Pad a list of groups into a :class:`Batch` (see its docstring for the layout)."""
    if not groups:
        raise ValueError("collate: no groups")
    n = groups[0].n
    for g in groups:
        if g.n != n:
            raise ValueError(
                f"collate: group {g.prompt_id!r} has {g.n} samples, expected {n}: all groups in a "
                "batch must have the same group_size"
            )
        if require_ref and g.ref_logprobs is None:
            raise ValueError(f"collate: group {g.prompt_id!r} has no reference log-probs")
    P = max(len(g.prompt_ids) for g in groups)
    T = max(1, max(len(c) for g in groups for c in g.completion_ids))
    B = len(groups) * n
    input_ids = torch.full((B, P + T), pad_token_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    cmask = torch.zeros((B, T), dtype=torch.float32)
    cids = torch.full((B, T), pad_token_id, dtype=torch.long)
    ref = torch.zeros((B, T), dtype=torch.float32)
    has_beh = all(g.behavior_logprobs is not None for g in groups)
    beh = torch.zeros((B, T), dtype=torch.float32) if has_beh else None
    rewards = torch.zeros(B, dtype=torch.float32)
    on_policy = torch.zeros(B, dtype=torch.bool)
    b = 0
    for g in groups:
        p = torch.tensor(g.prompt_ids, dtype=torch.long)
        onp = g.is_on_policy(current_version)
        for i in range(n):
            c = g.completion_ids[i]
            input_ids[b, P - len(p):P] = p
            attn[b, P - len(p):P] = 1
            if c:
                ct = torch.tensor(c, dtype=torch.long)
                input_ids[b, P:P + len(c)] = ct
                attn[b, P:P + len(c)] = 1
                cids[b, :len(c)] = ct
                cmask[b, :len(c)] = 1.0
                if g.ref_logprobs is not None:
                    ref[b, :len(c)] = torch.tensor(g.ref_logprobs[i], dtype=torch.float32)
                if beh is not None:
                    beh[b, :len(c)] = torch.tensor(g.behavior_logprobs[i], dtype=torch.float32)
            rewards[b] = float(g.rewards[i])
            on_policy[b] = onp
            b += 1
    return Batch(
        input_ids=input_ids,
        attention_mask=attn,
        completion_mask=cmask,
        completion_ids=cids,
        ref_logprobs=ref,
        rewards=rewards,
        on_policy=on_policy,
        group_size=n,
        prompt_len=P,
        behavior_logprobs=beh,
    )


def group_tokens(g: Group) -> int:
    """About the positions one group takes in a padding-free log-prob pass
    (:func:`agro.logprobs.completion_logprobs`): its prompt once, then every completion."""
    return len(g.prompt_ids) + sum(len(c) for c in g.completion_ids)


def split_groups(groups: Sequence[Group], groups_per_micro: int,
                 max_tokens: int = 0) -> list[list[Group]]:
    """Split groups, in order, into micro-batches of whole groups (the loss needs complete groups):
    at most ``groups_per_micro`` groups each and, when ``max_tokens`` > 0, at most ``max_tokens``
    positions as the pass lays them out: every group of a micro-batch is padded to its widest,
    so a micro-batch of k groups costs k x max(:func:`group_tokens`). A group wider than
    ``max_tokens`` is a micro-batch alone.

    The token budget is verl's dynamic batch size (``ppo_max_token_len_per_gpu``): short
    completions fill a micro-batch with more groups, so the matmuls get more rows (measured on the
    default job's late steps, ~9-token completions: 8 groups per micro-batch ran the learner step
    1.38x and the reference pass 1.40x as fast as 2; docs/RESULTS.md), long ones keep its rows
    bounded. It does not count what grows faster than the positions (the attention's L x L
    scores, the full-vocabulary logits of token-KL losses): lower it for those."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 (0: no limit), got {max_tokens}: resolve "
                         "micro_batch_tokens=-1 first (agro.config.micro_batch_tokens_for)")
    k = max(1, int(groups_per_micro))
    out: list[list[Group]] = []
    cur: list[Group] = []
    widest = 0
    for g in groups:
        t = group_tokens(g)
        if cur and (len(cur) >= k or (max_tokens > 0 and (len(cur) + 1) * max(widest, t) > max_tokens)):
            out.append(cur)
            cur, widest = [], 0
        cur.append(g)
        widest = max(widest, t)
    if cur:
        out.append(cur)
    return out
