"""Offline files record which reference scored them, and the trainer refuses other references.

Files are written the way ``agro generate`` writes them (reference log-probs computed several
groups per batch, identity in ``meta["reference"]``) and checked the way the trainer checks them
(one group per pass, against the run's identity).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agro.collect import attach_ref_logprobs
from agro.datafiles import DataError, read_groups, write_groups, write_jsonl
from agro.logprobs import Reference
from agro.models import apply_lora, load_model, load_tokenizer
from agro.provenance import (
    META_KEY,
    SEQ_TOL,
    TOKEN_TOL,
    ProvenanceError,
    check_offline_groups,
    reference_identity,
    spread_indices,
    tokenizer_sha256,
    weights_sha256,
)
from agro.rollouts import Group, collate

N = 4  # group size


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = load_model(tiny_model_dir)
    m.eval()
    return m


@pytest.fixture(scope="module")
def other_model(tiny_model_dir):
    """The same architecture, initialised with another seed: another reference model."""
    from transformers import AutoConfig, LlamaForCausalLM

    state = torch.random.get_rng_state()
    torch.manual_seed(99)
    m = LlamaForCausalLM(AutoConfig.from_pretrained(str(tiny_model_dir)))
    torch.random.set_rng_state(state)
    m.eval()
    return m


def _groups(tok, k=6) -> list[Group]:
    """k groups of N completions, with prompt and completion lengths that differ (padding)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(k):
        prompt = tok(f"Question {i}: what is {'1 + ' * (i % 3)}{i}?",
                     add_special_tokens=False)["input_ids"]
        comps = [torch.randint(3, len(tok), (int(torch.randint(2, 20, (1,), generator=g)),),
                               generator=g).tolist() for _ in range(N)]
        out.append(Group(prompt_id=f"p{i}", prompt_ids=prompt, completion_ids=comps,
                         rewards=[float(j % 2) for j in range(N)]))
    return out


def _score(groups, reference, tok, groups_per_batch=3) -> list[Group]:
    """Attach reference log-probs as the Collector does: several groups per batch."""
    attach_ref_logprobs(groups, reference, tok.pad_token_id, groups_per_batch)
    return groups


def _write(path, groups, identity=None, **meta) -> Path:
    if identity is not None:
        meta[META_KEY] = identity
    write_groups(path, groups, meta={"model": "tiny", "vocab_size": 49152, **meta})
    return Path(path)


def _check(path, groups, run, **kw):
    reference, identity, tok = run
    return check_offline_groups(path, groups, identity=identity, reference=reference,
                                tokenizer=tok, precision=reference.precision, **kw)


@pytest.fixture(scope="module")
def run_fp32(model, tok, tiny_model_dir):
    ref = Reference.frozen_copy(model, "fp32")
    return ref, reference_identity(tiny_model_dir, ref, tok, "fp32"), tok


# --------------------------------------------------------------------------- identity
def test_identity_fields_and_lora_base_equals_frozen_copy(model, other_model, tok,
                                                          tiny_model_dir):
    frozen = Reference.frozen_copy(model, "fp32")
    ident = reference_identity(tiny_model_dir, frozen, tok, "fp32")
    assert set(ident) == {"format", "name", "kind", "weights_sha256", "num_parameters",
                          "tokenizer_sha256", "vocab_size", "precision", "weights_dtype",
                          "agro_version"}
    assert ident["kind"] == "frozen" and ident["precision"] == "fp32"
    # tied embedding / LM head counted once
    assert ident["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert json.loads(json.dumps(ident)) == ident

    # LoRA with non-zero adapters: the reference (adapters disabled) is still the base model
    lora_model = apply_lora(load_model(tiny_model_dir), r=4, alpha=8)
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    lora_ref = Reference.adapters_disabled(lora_model, "fp32")
    lora_ident = reference_identity("elsewhere", lora_ref, tok, "fp32")
    assert lora_ident["kind"] == "adapters_disabled"
    assert lora_ident["weights_sha256"] == ident["weights_sha256"]
    assert lora_ident["num_parameters"] == ident["num_parameters"]

    other = reference_identity(tiny_model_dir, Reference.frozen_copy(other_model, "fp32"), tok,
                               "fp32")
    assert other["weights_sha256"] != ident["weights_sha256"]
    # one weight changed by one ulp changes the hash
    bumped = Reference.frozen_copy(model, "fp32")
    with torch.no_grad():
        w = bumped.model.model.layers[1].mlp.down_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(1.0))
    assert weights_sha256(bumped)[0] != ident["weights_sha256"]
    with pytest.raises(ValueError, match="precision"):
        reference_identity(tiny_model_dir, frozen, tok, "bf16")


def test_tokenizer_fingerprint(tok, tokenizer_dir):
    from transformers import AutoTokenizer

    same = AutoTokenizer.from_pretrained(str(tokenizer_dir))  # other loader, right padding
    assert tokenizer_sha256(same) == tokenizer_sha256(tok)
    same.chat_template = tok.chat_template + " "
    assert tokenizer_sha256(same) != tokenizer_sha256(tok)
    other = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    other.add_tokens(["<extra_token>"])
    assert tokenizer_sha256(other) != tokenizer_sha256(tok)


def test_identity_is_the_same_in_another_process(run_fp32, tiny_model_dir):
    code = ("import json, sys, torch\n"
            "from agro.models import load_model, load_tokenizer\n"
            "from agro.logprobs import Reference\n"
            "from agro.provenance import reference_identity\n"
            "d = sys.argv[1]\n"
            "ref = Reference.frozen_copy(load_model(d), 'fp32')\n"
            "print(json.dumps(reference_identity(d, ref, load_tokenizer(d), 'fp32')))\n")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == run_fp32[1]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_identity_round_trips_and_origin_is_not_written(tmp_path, run_fp32, suffix):
    ref, ident, tok = run_fp32
    groups = _score(_groups(tok, 3), ref, tok)
    path = _write(tmp_path / f"o{suffix}", groups, ident)
    got, _ = read_groups(path)
    assert all(g.meta[META_KEY] == ident for g in got)
    again = _write(tmp_path / f"again{suffix}", got)
    back, _ = read_groups(again)
    assert all(g.meta[META_KEY] == ident for g in back)
    assert [g.meta["_origin"] for g in back] == [{"file": str(again), "line": i}
                                                 for i in (1, 2, 3)]


def test_spread_indices():
    assert spread_indices(10, 4) == [0, 3, 6, 9]
    assert spread_indices(3, 4) == [0, 1, 2]
    assert spread_indices(7, 1) == [0]
    assert spread_indices(5, 0) == []


# --------------------------------------------------------------------------- the check
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_same_reference_passes(tmp_path, run_fp32, suffix):
    ref, ident, tok = run_fp32
    path = _write(tmp_path / f"ok{suffix}", _score(_groups(tok), ref, tok), ident)
    groups, _ = read_groups(path)
    warnings = []
    result = _check(path, groups, run_fp32, rows=4, warn=warnings.append)
    assert result.rows_checked == [1, 3, 4, 6]
    assert 0 <= result.max_token_diff < TOKEN_TOL["fp32"] / 10
    assert warnings == [] and result.warnings == []
    assert "4 rows recomputed" in result.summary()


def test_logprobs_from_another_model_fail_with_file_line_and_values(tmp_path, run_fp32,
                                                                     other_model):
    """The identity says "this run's reference" but the log-probs come from another model (a
    copied identity): only the recomputation can tell, and it names file, line, field, values."""
    ref, ident, tok = run_fp32
    groups = _groups(tok)
    _score(groups[:-1], ref, tok)
    _score(groups[-1:], Reference.frozen_copy(other_model, "fp32"), tok)  # last row only
    path = tmp_path / "forged.jsonl"
    _write(path, groups, ident)
    path.write_text("\n" + path.read_text())  # a blank first line: rows are on lines 2..7
    read, _ = read_groups(path)
    with pytest.raises(ProvenanceError) as ei:
        _check(path, read, run_fp32, rows=2)  # rows: first and last
    err = ei.value
    assert isinstance(err, DataError) and err.reason == "ref_logprobs_mismatch"
    assert err.line == 7 and err.field.startswith("ref_logprobs[")
    s = int(err.field[len("ref_logprobs["):-1])
    stored_sum = sum(read[-1].ref_logprobs[s])
    b = collate(read[-1:], tok.pad_token_id, current_version=-1)
    recomputed = ref.token_logprobs(b.input_ids, b.attention_mask, b.completion_ids,
                                    b.prompt_len, b.group_size)[s].sum().item()
    assert err.stored == pytest.approx(stored_sum, abs=1e-6)
    assert err.recomputed == pytest.approx(recomputed, abs=1e-4)
    assert abs(err.stored - err.recomputed) > TOKEN_TOL["fp32"]
    msg = str(err)
    assert msg.startswith(f"{path}:7: field 'ref_logprobs[{s}]': ")
    assert f"{err.stored:.4f}" in msg and f"{err.recomputed:.4f}" in msg
    assert "max per-token diff" in msg
    # the first row alone is fine: the check looked at the rows it says it looked at
    _check(path, read[:1], run_fp32, rows=4)


def test_file_from_another_model_is_refused_by_identity(tmp_path, run_fp32, other_model):
    ref, ident, tok = run_fp32
    other_ref = Reference.frozen_copy(other_model, "fp32")
    other_ident = reference_identity("other-model", other_ref, tok, "fp32")
    path = _write(tmp_path / "other.jsonl", _score(_groups(tok), other_ref, tok), other_ident)
    groups, _ = read_groups(path)
    with pytest.raises(ProvenanceError) as ei:
        _check(path, groups, run_fp32, rows=0)  # identity alone refuses it
    err = ei.value
    assert (err.line, err.field, err.reason) == (1, "meta.reference.weights_sha256",
                                                 "reference_mismatch")
    assert (err.stored, err.recomputed) == (other_ident["weights_sha256"],
                                            ident["weights_sha256"])
    assert "other-model" in str(err) and str(path) in str(err)


def test_file_from_another_precision_is_refused(tmp_path, model, run_fp32, tiny_model_dir):
    ref, ident, tok = run_fp32
    bf16 = Reference.frozen_copy(model, "bf16")
    bf16_ident = reference_identity(tiny_model_dir, bf16, tok, "bf16")
    assert bf16_ident["weights_sha256"] == ident["weights_sha256"]
    path = _write(tmp_path / "bf16.jsonl", _score(_groups(tok), bf16, tok), bf16_ident)
    groups, _ = read_groups(path)
    with pytest.raises(ProvenanceError) as ei:
        _check(path, groups, run_fp32, rows=0)
    assert (ei.value.field, ei.value.reason) == ("meta.reference.precision", "reference_mismatch")
    assert "file bf16 vs this run fp32" in str(ei.value)
    # with the precision in the identity forged, an fp32 run still sees bf16 log-probs
    path2 = _write(tmp_path / "bf16_forged.jsonl", groups, ident)
    groups2, _ = read_groups(path2)
    with pytest.raises(ProvenanceError) as ei:
        _check(path2, groups2, run_fp32, rows=len(groups2))
    assert ei.value.reason == "ref_logprobs_mismatch"


def test_old_file_without_identity_fails(tmp_path, run_fp32):
    ref, ident, tok = run_fp32
    path = _write(tmp_path / "old.jsonl", _score(_groups(tok), ref, tok))  # right log-probs
    groups, _ = read_groups(path)
    with pytest.raises(ProvenanceError) as ei:
        _check(path, groups, run_fp32, rows=4)
    err = ei.value
    assert (err.line, err.field, err.reason) == (1, "meta.reference", "no_reference_identity")
    assert "trust_offline_reference=true" in str(err)


def test_bf16_run_accepts_its_own_file_and_refuses_another_model(tmp_path, model, other_model,
                                                                 tok, tiny_model_dir):
    bf16 = Reference.frozen_copy(model, "bf16")
    run = (bf16, reference_identity(tiny_model_dir, bf16, tok, "bf16"), tok)
    path = _write(tmp_path / "b.jsonl", _score(_groups(tok), bf16, tok), run[1])
    groups, _ = read_groups(path)
    assert _check(path, groups, run, rows=6).max_token_diff < TOKEN_TOL["bf16"] / 10
    # Two random tiny models both predict nearly uniformly (they differ by 0.56 nats per token
    # at most, inside the bf16 noise of a real model): make the other one confident, as trained
    # models are (x10 logits: up to 7 nats per token apart).
    sharp = Reference.frozen_copy(other_model, "bf16")
    with torch.no_grad():
        sharp.model.lm_head.weight.mul_(10)
    _score(groups, sharp, tok)
    with pytest.raises(ProvenanceError, match="ref_logprobs"):
        _check(path, groups, run, rows=6)


def test_bf16_weights_reference_and_autocast_reference_do_not_mix(tmp_path, model, tok,
                                                                   tiny_model_dir):
    """bf16 runs store their (frozen) reference in bf16; a file scored by a reference that ran
    under autocast over fp32 weights (a LoRA bf16 run, or agro before weights_dtype existed: no
    field, read as float32) is refused by them, and their own files are accepted."""
    import copy

    stored = Reference.frozen_copy(copy.deepcopy(model), "bf16")
    stored.store_bf16()
    ident = reference_identity(tiny_model_dir, stored, tok, "bf16")
    assert ident["weights_dtype"] == "bfloat16" and ident["format"] == 2
    run = (stored, ident, tok)
    own = _write(tmp_path / "own.jsonl", _score(_groups(tok), stored, tok), ident)
    groups, _ = read_groups(own)
    _check(own, groups, run, rows=2)
    autocast = Reference.frozen_copy(model, "bf16")
    old = reference_identity(tiny_model_dir, autocast, tok, "bf16")
    assert old["weights_dtype"] == "float32" and old["weights_sha256"] == ident["weights_sha256"]
    old.pop("weights_dtype")                       # as agro wrote it before (format 1)
    path = _write(tmp_path / "old.jsonl", _score(_groups(tok), autocast, tok), old)
    groups, _ = read_groups(path)
    with pytest.raises(ProvenanceError) as ei:
        _check(path, groups, run, rows=0)
    assert ei.value.field == "meta.reference.weights_dtype"


def test_trust_warns_and_goes_on(tmp_path, run_fp32, other_model):
    ref, ident, tok = run_fp32
    other_ref = Reference.frozen_copy(other_model, "fp32")
    path = _write(tmp_path / "old_other.jsonl", _score(_groups(tok), other_ref, tok))
    groups, _ = read_groups(path)
    for kw in ({}, {"trust": False}):
        with pytest.raises(ProvenanceError):
            _check(path, groups, run_fp32, rows=2, **kw)
    warnings = []
    result = _check(path, groups, run_fp32, rows=2, trust=True, warn=warnings.append)
    assert len(warnings) == 3  # no identity; rows 1 and 6 recomputed, both wrong
    assert "no reference identity" in warnings[0]
    assert f"{path}:1: field 'ref_logprobs[" in warnings[1]
    assert f"{path}:6: field 'ref_logprobs[" in warnings[2]
    assert all(w.startswith("WARNING (trust_offline_reference=true") for w in warnings)
    assert result.warnings == warnings and result.rows_checked == [1, 6]
    assert result.max_token_diff > TOKEN_TOL["fp32"]


def test_rows_without_origin_are_named_by_index(run_fp32):
    """Groups not read from a file (built in memory) are named by position + 1."""
    ref, ident, tok = run_fp32
    groups = _score(_groups(tok, 3), ref, tok)
    with pytest.raises(ProvenanceError, match=r"^mem.jsonl:1: field 'meta.reference'"):
        _check("mem.jsonl", groups, run_fp32)
    for g in groups:
        g.meta[META_KEY] = ident
    seq = groups[2].ref_logprobs[1]
    orig = list(seq)
    seq[0] -= 10 * TOKEN_TOL["fp32"]
    with pytest.raises(ProvenanceError, match=r"^mem.jsonl:3: field 'ref_logprobs\[1\]'"):
        _check("mem.jsonl", groups, run_fp32)
    seq[0] = orig[0] - 0.5 * TOKEN_TOL["fp32"]  # within both tolerances
    _check("mem.jsonl", groups, run_fp32)
    # every token within its tolerance, the sum far outside (it scales with sqrt(T))
    seq[:] = [x - 0.9 * TOKEN_TOL["fp32"] for x in orig]
    assert 0.9 * TOKEN_TOL["fp32"] * len(seq) > 2 * SEQ_TOL["fp32"] * len(seq) ** 0.5
    with pytest.raises(ProvenanceError, match=r"^mem.jsonl:3: field 'ref_logprobs\[1\]'"):
        _check("mem.jsonl", groups, run_fp32)


def test_malformed_identity_is_a_data_error(tmp_path, run_fp32):
    ref, ident, tok = run_fp32
    groups = _score(_groups(tok, 2), ref, tok)
    rows = [{"format": 1, **g.to_dict(), "meta": {META_KEY: "fp32"}} for g in groups]
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    read, _ = read_groups(path)
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'meta.reference': expected an obj"):
        _check(path, read, run_fp32)


@pytest.mark.parametrize("key,value,refused", [
    ("weights_sha256", "0" * 64, True), ("tokenizer_sha256", "0" * 64, True),
    ("precision", "bf16", True), ("weights_dtype", "bfloat16", True),
    ("name", "some/other-path", False),
    ("kind", "adapters_disabled", False), ("agro_version", "0.0.1", False),
    ("num_parameters", 1, False),
])
def test_which_identity_fields_must_match(tmp_path, run_fp32, key, value, refused):
    ref, ident, tok = run_fp32
    path = _write(tmp_path / "f.jsonl", _score(_groups(tok, 2), ref, tok), {**ident, key: value})
    groups, _ = read_groups(path)
    if not refused:
        _check(path, groups, run_fp32, rows=0)
        return
    with pytest.raises(ProvenanceError) as ei:
        _check(path, groups, run_fp32, rows=0)
    assert ei.value.field == f"meta.reference.{key}" and ei.value.stored == value
