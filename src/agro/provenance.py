"""Which reference policy made an offline file's log-probs, and a check that it is this run's.

An offline group file (``agro generate``, :mod:`agro.datafiles`) stores per-token reference
log-probs ``log pi_ref(y_t | x, y_<t)`` computed once, at generation. Training uses them in the
log-ratio ``l_t = log pi_t - log pi_ref_t`` (agro_math.md §0, §5) and never runs the reference on
those groups again, so a file made with another reference model, another base model or another
precision would give a wrong log-ratio from step 0 (and a ``fresh:..,offline:..`` mix would train
against two references at once). Two defences, both in :func:`check_offline_groups`:

1. **Identity.** :func:`reference_identity` describes the reference: a sha256 of its weights, a
   sha256 of the tokenizer (vocabulary, special tokens, chat template), the precision, plus the
   model name, kind, parameter count and agro version for messages. ``agro generate`` stores it
   in every row's ``meta[META_KEY]`` (``meta["reference"]``); the trainer compares it with its
   own. The name, kind and version may differ; weights, tokenizer, precision and the dtype the
   reference's weights compute in (``weights_dtype``: bf16 runs store a frozen reference in bf16,
   a LoRA reference runs under autocast over fp32 weights) must match. A LoRA reference (adapters
   disabled) hashes to the same value as a frozen copy of the same base model, so in fp32 a file
   generated for full fine-tuning serves a LoRA run and vice versa; in bf16 the dtypes differ.
2. **Recomputation.** A few rows, spread over the file, are scored again with this run's
   reference and compared with the stored log-probs, with a tolerance per precision
   (:data:`TOKEN_TOL`, :data:`SEQ_TOL`; the measured noise is in :data:`SEQ_TOL`'s docstring).
   This catches what a hash cannot (a file whose identity was copied from another, a reference
   kernel that changed).

Both failures raise :class:`ProvenanceError` (a :class:`~agro.datafiles.DataError`) naming the
file, line and field; with ``trust=True`` they are printed as warnings and training goes on.

Departure from the paper: none (the paper does not describe its data files).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import __version__
from .datafiles import DataError, row_origin
from .rollouts import Group, collate

META_KEY = "reference"
"""Key of the reference identity in a group row's ``meta`` (written by ``agro generate``)."""

IDENTITY_FORMAT = 2
MUST_MATCH = ("weights_sha256", "tokenizer_sha256", "precision", "weights_dtype")
# format 1 (before bf16 references were stored in bf16) had no weights_dtype: its references
# computed from fp32 weights (bf16 by autocast)
_DEFAULTS = {"weights_dtype": "float32"}
"""Identity fields that must be equal between a file and the run; the others are informative."""

TOKEN_TOL = {"fp32": 1e-3, "bf16": 1.0}
"""Largest allowed ``|stored - recomputed|`` of one token's reference log-prob, per precision."""
SEQ_TOL = {"fp32": 1e-3, "bf16": 0.5}
"""Largest allowed ``|sum stored - sum recomputed|`` of a T-token sequence is
``SEQ_TOL[precision] * sqrt(T)`` (rounding noise adds up like a random walk).

Measured noise (stored in batches of 2 or 4 groups of 8 with mixed prompt lengths 38-99 tokens
and completions of 4-48 tokens, packed and unpacked kernel paths; recomputed one group per pass,
as :func:`check_offline_groups` does; max over all tokens / sequences):

=========================  ==================  ====================  ==========================
model, precision           per token           per sequence sum      tolerance (T = 48)
=========================  ==================  ====================  ==========================
tiny Llama (tests), fp32   1.9e-6              4.8e-6                1e-3 / 6.9e-3
tiny Llama (tests), bf16   3.9e-3              4.3e-3                1.0 / 3.5
SmolLM2-135M, fp32         1.9e-5              3.6e-5                1e-3 / 6.9e-3 (50x / 190x)
SmolLM2-135M, bf16         0.24                0.60                  1.0 / 3.5 (4x / 5.7x)
=========================  ==================  ====================  ==========================

fp32 vs bf16 scoring of the same rows differs by 0.19 per token / 0.49 per sequence on
SmolLM2-135M (3.5e-3 / 8.8e-3 on the tiny model): inside the bf16 noise, so a bf16 run cannot
tell an fp32 file by recomputation; the identity's ``precision`` field refuses it instead. An
fp32 run does catch bf16 log-probs by recomputation (190x its per-token tolerance on
SmolLM2-135M, 3.5x on the tiny model).
"""


class ProvenanceError(DataError):
    """An offline file whose reference is not this run's (reasons: ``no_reference_identity``,
    ``reference_mismatch``, ``ref_logprobs_mismatch``). ``stored`` and ``recomputed`` hold the
    two values compared (identity strings, or per-sequence log-prob sums)."""

    def __init__(self, path, line, field_, problem, reason, stored=None, recomputed=None):
        super().__init__(path, line, field_, problem, reason)
        self.stored = stored
        self.recomputed = recomputed


# --------------------------------------------------------------------------- identity
def _state_for_hash(reference) -> dict[str, torch.Tensor]:
    """The reference's tensors under canonical names.

    ``adapters_disabled`` (LoRA): the PeftModel's state dict without adapter tensors (``lora_*``,
    ``modules_to_save`` copies), with peft's wrapping removed from the names
    (``base_model.model.`` prefix, ``.base_layer``, ``.original_module``), so the names and
    tensors are those of the plain base model. ``frozen``: the frozen copy's state dict as is.
    """
    sd = reference.model.state_dict()
    if not reference.disable_adapter:
        return sd
    out = {}
    for name, t in sd.items():
        parts = name.split(".")
        if any(p.startswith("lora_") or p == "modules_to_save" for p in parts):
            continue
        if name.startswith("base_model.model."):
            parts = parts[2:]
        parts = [p for p in parts if p not in ("base_layer", "original_module")]
        out[".".join(parts)] = t
    return out


def weights_sha256(reference) -> tuple[str, int]:
    """``(sha256 hex, number of parameters)`` of the reference's weights (see
    :func:`_state_for_hash` for which tensors).

    The digest covers, in sorted name order, one line ``name dtype shape sha256(bytes)`` per
    tensor, so it is the same in every process and on every device (tensors are hashed from a
    CPU copy of their bytes). Tied tensors (embedding = LM head) are hashed once and their
    digest reused, which gives the same result as two equal untied tensors. Cost: one sha256
    pass over the weights: 0.31 s for SmolLM2-135M (538 MB fp32; 0.39 s for the whole identity)
    on a 2-core CPU with SHA extensions (1.7 GB/s).
    """
    stored = getattr(reference, "weights_digest", None)
    if stored is not None:    # taken before the weights were cast (Reference.store_bf16)
        return stored
    if getattr(reference, "cast_without_digest", False):
        raise ValueError("this reference's weights were cast to bf16 without keeping the digest "
                         "of the weights as loaded (Reference.store_bf16(keep_digest=False))")
    state = _state_for_hash(reference)
    cache: dict[tuple, str] = {}
    lines, n_params = [], 0
    for name in sorted(state):
        t = state[name].detach()
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        digest = cache.get(key)
        if digest is None:
            flat = t.cpu().contiguous().reshape(-1)
            raw = flat.view(torch.uint8).numpy() if flat.numel() else b""
            digest = hashlib.sha256(memoryview(raw)).hexdigest()
            cache[key] = digest
            n_params += t.numel()
        lines.append(f"{name} {str(t.dtype).removeprefix('torch.')} "
                     f"{'x'.join(map(str, t.shape))} {digest}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest(), n_params


def _weights_dtype(reference) -> str:
    """"bfloat16" if the reference's floating-point weights are stored in bf16, else "float32"."""
    ps = [p for p in reference.model.parameters() if p.is_floating_point()]
    bf = bool(ps) and all(p.dtype == torch.bfloat16 for p in ps)
    return "bfloat16" if bf else "float32"


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of what makes token ids mean the same text: the vocabulary (token -> id, added
    tokens included), the special tokens (bos/eos/unk/pad and all special ids) and the chat
    template. Independent of how the tokenizer was loaded (GGUF, directory, hub) and of runtime
    settings such as the padding side."""
    special = {a: getattr(tokenizer, a, None) for a in ("bos_token", "eos_token", "unk_token",
                                                        "pad_token")}
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
        "special": {k: (None if v is None else str(v)) for k, v in special.items()},
        "special_ids": sorted(int(i) for i in getattr(tokenizer, "all_special_ids", []) or []),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    blob = json.dumps(payload, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def reference_identity(model_spec: str | os.PathLike, reference, tokenizer, precision: str
                       ) -> dict[str, Any]:
    """The identity of the reference policy that scores (or scored) a run's groups.

    Args:
        model_spec: the model name or path the reference was loaded from (informative only).
        reference: an :class:`agro.logprobs.Reference` (``frozen`` or ``adapters_disabled``).
        tokenizer: the run's tokenizer.
        precision: 'fp32' or 'bf16', the precision the reference log-probs are computed in;
            must equal ``reference.precision``.

    Returns a JSON-able dict, stored by ``agro generate`` as ``meta["reference"]``::

        {"format": 1, "name": str, "kind": "frozen" | "adapters_disabled",
         "weights_sha256": hex, "num_parameters": int, "tokenizer_sha256": hex,
         "vocab_size": int, "precision": "fp32" | "bf16", "agro_version": str}

    Only :data:`MUST_MATCH` fields are compared by :func:`check_offline_groups`.
    """
    if precision != reference.precision:
        raise ValueError(f"reference_identity: precision {precision!r} differs from the "
                         f"reference's own precision {reference.precision!r}")
    digest, n_params = weights_sha256(reference)
    return {
        "format": IDENTITY_FORMAT,
        "name": str(model_spec),
        "kind": reference.kind,
        "weights_sha256": digest,
        "num_parameters": n_params,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": len(tokenizer),
        "precision": precision,
        "weights_dtype": _weights_dtype(reference),
        "agro_version": __version__,
    }


# --------------------------------------------------------------------------- checking a file
@dataclass
class OfflineCheck:
    """What :func:`check_offline_groups` found in one file (returned for the run log)."""

    path: str
    rows_checked: list[int] = field(default_factory=list)  # file lines recomputed
    max_token_diff: float = 0.0      # max |stored - recomputed| over every token checked
    max_seq_diff: float = 0.0        # max |sum stored - sum recomputed| over every sequence
    warnings: list[str] = field(default_factory=list)     # mismatches let through by trust

    def summary(self) -> str:
        head = (f"{self.path}: reference identity checked; {len(self.rows_checked)} rows "
                f"recomputed (lines {', '.join(map(str, self.rows_checked)) or '-'}), max diff "
                f"{self.max_token_diff:.2g} per token, {self.max_seq_diff:.2g} per sequence")
        return head + (f"; {len(self.warnings)} mismatch(es) trusted" if self.warnings else "")


def _where(path: str, g: Group, index: int) -> tuple[str, int]:
    """(file, line) of a group read by ``read_groups``; else (``path``, index + 1)."""
    origin = row_origin(g)
    return origin if origin is not None else (path, index + 1)


def _short(v: Any) -> str:
    s = str(v)
    return s[:16] + "…" if len(s) > 24 else s


def _describe(ident: dict) -> str:
    return (f"{ident.get('name', '?')} ({ident.get('kind', '?')}, "
            f"{ident.get('num_parameters', '?')} params, {ident.get('precision', '?')}, "
            f"agro {ident.get('agro_version', '?')})")


def _identity_errors(path: str, groups: Sequence[Group], identity: dict) -> list[ProvenanceError]:
    """One error per distinct problem (first line where it occurs)."""
    errors: list[ProvenanceError] = []
    seen: set[str] = set()
    fix = ("regenerate the file with `agro generate` using this run's model and precision, or set "
           "trust_offline_reference=true if you know it is right")
    for i, g in enumerate(groups):
        f, line = _where(path, g, i)
        stored = g.meta.get(META_KEY)
        if stored is None:
            if "missing" not in seen:
                seen.add("missing")
                errors.append(ProvenanceError(
                    f, line, f"meta.{META_KEY}", "no reference identity recorded (a file "
                    "written before agro recorded which reference scored it, or by another "
                    f"tool): its reference log-probs cannot be trusted; {fix}",
                    "no_reference_identity"))
            continue
        if not isinstance(stored, dict):
            errors.append(ProvenanceError(f, line, f"meta.{META_KEY}", "expected an object, "
                                          f"got {type(stored).__name__}", "bad_type:meta"))
            break
        diffs = [k for k in MUST_MATCH
                 if stored.get(k, _DEFAULTS.get(k)) != identity.get(k, _DEFAULTS.get(k))]
        if not diffs:
            continue
        sig = json.dumps([[k, stored.get(k)] for k in diffs])
        if sig in seen:
            continue
        seen.add(sig)
        what = "; ".join(f"{k}: file {_short(stored.get(k))} vs this run {_short(identity.get(k))}"
                         for k in diffs)
        errors.append(ProvenanceError(
            f, line, f"meta.{META_KEY}.{diffs[0]}",
            f"the file's reference log-probs were made by another reference: {what} (file: "
            f"{_describe(stored)}; this run: {_describe(identity)}); {fix}",
            "reference_mismatch", stored=stored.get(diffs[0]), recomputed=identity.get(diffs[0])))
    return errors


def spread_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)``, first and last included (deterministic).

    >>> spread_indices(10, 4)
    [0, 3, 6, 9]
    """
    k = min(max(0, int(k)), n)
    if k == 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _recompute_errors(path: str, groups: Sequence[Group], reference, pad_token_id: int,
                      precision: str, rows: int, result: OfflineCheck) -> list[ProvenanceError]:
    """Score ``rows`` groups again (one group per pass) and compare with the stored values."""
    tok_tol = TOKEN_TOL[precision]
    errors = []
    for i in spread_indices(len(groups), rows):
        g = groups[i]
        f, line = _where(path, g, i)
        result.rows_checked.append(line)
        batch = collate([g], pad_token_id, current_version=-1)
        lp = reference.token_logprobs(batch.input_ids, batch.attention_mask,
                                      batch.completion_ids, batch.prompt_len,
                                      batch.group_size).float().cpu()       # [n, T]
        worst = None  # (excess, seq, stored sum, recomputed sum, token diff, token, seq tol)
        for s, stored in enumerate(g.ref_logprobs):
            T = len(stored)
            st = torch.tensor(stored, dtype=torch.float64)                  # [T]
            rc = lp[s, :T].double()                                          # [T]
            d = (st - rc).abs()
            t_max = int(d.argmax())
            tok_diff, seq_diff = float(d[t_max]), abs(float(st.sum() - rc.sum()))
            seq_tol = SEQ_TOL[precision] * math.sqrt(T)
            result.max_token_diff = max(result.max_token_diff, tok_diff)
            result.max_seq_diff = max(result.max_seq_diff, seq_diff)
            excess = max(tok_diff / tok_tol, seq_diff / seq_tol)
            if excess > 1 and (worst is None or excess > worst[0]):
                worst = (excess, s, float(st.sum()), float(rc.sum()), tok_diff, t_max, seq_tol)
        if worst is not None:
            _, s, s_sum, r_sum, tok_diff, t_max, seq_tol = worst
            errors.append(ProvenanceError(
                f, line, f"ref_logprobs[{s}]",
                f"stored reference log-probs disagree with this run's reference model: sum "
                f"stored {s_sum:.4f} vs recomputed {r_sum:.4f} (diff {abs(s_sum - r_sum):.4g}), "
                f"max per-token diff {tok_diff:.4g} at token {t_max} (tolerance {precision}: "
                f"{tok_tol:g} per token, {seq_tol:.3g} per sequence of {len(g.ref_logprobs[s])} "
                "tokens). The file was made with "
                "another reference model or precision; regenerate it with `agro generate`, or "
                "set trust_offline_reference=true if you know it is right",
                "ref_logprobs_mismatch", stored=s_sum, recomputed=r_sum))
    return errors


def check_offline_groups(path: str | os.PathLike, groups: Sequence[Group], *, identity: dict,
                         reference, tokenizer, precision: str, rows: int = 4,
                         trust: bool = False, warn: Callable[[str], Any] = print
                         ) -> OfflineCheck:
    """Check that one offline file's reference log-probs are this run's reference's.

    Args:
        path: the file (for messages; groups read by :func:`agro.datafiles.read_groups` name
            their own file and line).
        groups: the file's groups, as read.
        identity: this run's :func:`reference_identity`.
        reference: this run's :class:`agro.logprobs.Reference` (at ``precision``).
        tokenizer: this run's tokenizer (its pad id pads the recomputed batch).
        precision: this run's precision; the recomputation tolerance is chosen by it.
        rows: groups to score again, spread over the file (0: identity check only).
        trust: turn every mismatch into a ``warn(message)`` and go on.

    (a) every group's ``meta["reference"]`` must match ``identity`` on :data:`MUST_MATCH`; a
    group with none (old format) is an error too. (b) ``rows`` groups are scored again, one
    group per pass, and each sequence must agree with its stored values within
    ``TOKEN_TOL[precision]`` per token and ``SEQ_TOL[precision] * sqrt(T)`` on its sum.

    Raises :class:`ProvenanceError` (file, line, field, both values) on the first problem
    unless ``trust``. Returns an :class:`OfflineCheck` (its ``summary()`` is a log line).
    """
    p = str(path)
    if precision != identity.get("precision"):
        raise ValueError(f"check_offline_groups: precision {precision!r} is not the run "
                         f"identity's {identity.get('precision')!r}")
    result = OfflineCheck(path=p)
    errors = _identity_errors(p, groups, identity)
    if errors and not trust:
        raise errors[0]
    if rows > 0 and groups:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        more = _recompute_errors(p, groups, reference, pad, precision, rows, result)
        if more and not trust:
            raise more[0]
        errors += more
    for err in errors:
        msg = f"WARNING (trust_offline_reference=true, going on): {err}"
        result.warnings.append(msg)
        warn(msg)
    return result
