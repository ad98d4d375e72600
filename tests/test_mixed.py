"""bf16 working weights over fp32 masters (agro.models.MasterWeights) and the bf16 reference:
gradients land in fp32 and match autocast's, the one cast per step, and what a bf16 training run
holds (optimizer state fp32, learner = sampler weights, reference bf16, log-ratio 0 at step 0)."""
from __future__ import annotations

import pytest
import torch

from agro.config import TrainConfig, load_config
from agro.logprobs import Reference, completion_logprobs
from agro.models import MasterWeights, bf16_copy, is_bf16, load_model
from agro.trainer import Trainer
from fakes import HashGrader


def _batch(model, B=4, P=5, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (B // 2, P), generator=g).repeat_interleave(2, 0)
    comp = torch.randint(0, V, (B, T), generator=g)
    ids = torch.cat([prompt, comp], 1)
    return ids, torch.ones_like(ids), comp, P


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_working_copy_gradients_reach_fp32_masters_and_match_autocast(tiny_model_dir):
    torch.manual_seed(0)
    master = load_model(str(tiny_model_dir))
    ids, am, comp, P = _batch(master)
    w = torch.randn(comp.shape, generator=torch.Generator().manual_seed(1))

    # autocast on the fp32 weights (agro's bf16 path before MasterWeights), two micro-batches
    for half in (slice(0, 2), slice(2, 4)):
        lp = completion_logprobs(master, ids[half], am[half], comp[half], P, "bf16", group_size=2)
        (lp * w[half]).sum().backward()
    ref = _grads(master)
    master.zero_grad(set_to_none=True)

    mw = MasterWeights(master)
    assert is_bf16(mw.work) and not is_bf16(master)
    for half in (slice(0, 2), slice(2, 4)):
        lp = completion_logprobs(mw.work, ids[half], am[half], comp[half], P, "bf16", group_size=2)
        (lp * w[half]).sum().backward()
        mw.accumulate_grads()
    got = _grads(master)
    assert set(got) == set(ref)
    assert all(g.dtype == torch.float32 for g in got.values())
    assert all(p.grad is None for p in mw.work.parameters())
    num = sum(float((got[n] - ref[n]).pow(2).sum()) for n in ref) ** 0.5
    den = sum(float(ref[n].pow(2).sum()) for n in ref) ** 0.5
    assert num / den < 0.05, num / den        # bf16 rounding; a lost or doubled micro-batch is ~0.5-1


def test_gradients_accumulated_in_bf16_and_cast_once_stay_close_to_fp32(tiny_model_dir):
    """The default: micro-batch gradients add up in the bf16 working copy, one cast per step."""
    master = load_model(str(tiny_model_dir))
    ids, am, comp, P = _batch(master, B=8)
    w = torch.randn(comp.shape, generator=torch.Generator().manual_seed(2))
    for q in range(4):
        sl = slice(2 * q, 2 * q + 2)
        lp = completion_logprobs(master, ids[sl], am[sl], comp[sl], P, "fp32", group_size=2)
        (lp * w[sl]).sum().backward()
    ref = _grads(master)
    master.zero_grad(set_to_none=True)
    mw = MasterWeights(master)
    for q in range(4):
        sl = slice(2 * q, 2 * q + 2)
        lp = completion_logprobs(mw.work, ids[sl], am[sl], comp[sl], P, "bf16", group_size=2)
        (lp * w[sl]).sum().backward()
    mw.accumulate_grads()
    got = _grads(master)
    num = sum(float((got[n] - ref[n]).pow(2).sum()) for n in ref) ** 0.5
    den = sum(float(ref[n].pow(2).sum()) for n in ref) ** 0.5
    assert num / den < 0.05, num / den        # vs exact fp32; a lost micro-batch is ~0.5


def test_refresh_casts_masters_into_the_working_copy_and_leaves_buffers_fp32(tiny_model_dir):
    master = load_model(str(tiny_model_dir))
    mw = MasterWeights(master)
    with torch.no_grad():
        for p in master.parameters():
            p.add_(0.01)
    assert not all(torch.equal(w, m.to(torch.bfloat16))
                   for m, w in zip(master.parameters(), mw.work.parameters()))
    moved = [m.detach().clone() for m in master.parameters()]
    mw.refresh()
    for m, w, keep in zip(master.parameters(), mw.work.parameters(), moved):
        assert torch.equal(m, keep)                    # the masters are the source, untouched
        assert w.dtype == torch.bfloat16 and torch.equal(w, m.detach().to(torch.bfloat16))
    bufs = [b for n, b in mw.work.named_buffers() if "inv_freq" in n]
    assert bufs and all(b.dtype == torch.float32 for b in bufs)


def test_bf16_reference_keeps_its_identity_digest(tiny_model_dir):
    from agro.provenance import weights_sha256

    ref = Reference.frozen_copy(load_model(str(tiny_model_dir)), "bf16")
    before = weights_sha256(ref)
    ref.store_bf16()
    assert is_bf16(ref.model) and weights_sha256(ref) == before
    with pytest.raises(ValueError):
        Reference.frozen_copy(load_model(str(tiny_model_dir)), "fp32").store_bf16()


@pytest.mark.parametrize("extra", [["grad_accum=auto"], ["grad_accum=fp32"], ["grad_accum=bf16"]])
def test_a_bf16_run_learns_on_bf16_weights_with_fp32_masters(tiny_model_dir, tmp_path, extra):
    cfg = load_config(TrainConfig, None, extra + [
        f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "precision=bf16", "steps=2",
        "prompts_per_step=4", "group_size=2", "micro_batch_groups=2", "max_new_tokens=5",
        "eval_prompts=0", "lr=1e-2",
        "warmup_steps=0", "tensorboard=false", "progress=false", "plot=false", "save_every=0"])
    tr = Trainer(cfg, grader=HashGrader())
    assert tr.mixed is not None and tr.learner is tr.mixed.work
    assert tr.accum_fp32 == (extra == ["grad_accum=fp32"])          # auto: bf16 on a CPU
    calls = []
    real = tr.mixed.accumulate_grads
    tr.mixed.accumulate_grads = lambda: (calls.append(1), real())[1]
    start = [w.detach().clone() for w in tr.learner.parameters()]
    assert tr.generator.model is tr.learner                        # the sampler shares them
    assert is_bf16(tr.reference.model) and not is_bf16(tr.policy)
    tr.train()
    import json

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert abs(rows[0]["kl_k1"]) < 1e-5      # same bf16 weights as the reference at step 0
    assert tr.version == 2
    # per micro-batch (2 a step) with fp32 accumulation, else once a step (+1 no-op call per step)
    assert len(calls) == (2 * 2 + 2 if tr.accum_fp32 else 2)
    # the update reached the working copy (Adam moves weights by ~lr = 1e-2 a step; a refresh
    # that copied the wrong way would leave the working copy where it started)
    moved = max(float((w.detach() - s0).abs().max()) for w, s0 in zip(tr.learner.parameters(), start))
    assert moved > 5e-3, moved
    for m, w in zip(tr.policy.parameters(), tr.learner.parameters()):
        assert m.dtype == torch.float32 and torch.equal(w, m.detach().to(torch.bfloat16))
    states = [s for s in tr.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)
    # the masters moved (the update reached them through the working copy's gradients)
    fresh = load_model(str(tiny_model_dir))
    assert any(not torch.equal(a, b) for a, b in zip(tr.policy.parameters(), fresh.parameters()))


def test_bf16_copy_of_a_bf16_model_is_not_copied_again_by_the_sampler(tiny_model_dir):
    from agro.generation import CachedGenerator
    from agro.models import load_tokenizer

    work = bf16_copy(load_model(str(tiny_model_dir)))
    gen = CachedGenerator(work, load_tokenizer(str(tiny_model_dir)), precision="bf16")
    assert gen.model is work


def test_a_bf16_generate_file_trains_a_bf16_run_and_is_refused_by_fp32(tiny_model_dir, tmp_path):
    """`agro generate precision=bf16` scores with the bf16-stored reference (the sampling model
    itself); a bf16 training run's provenance check accepts it (identity and recomputed rows), an
    fp32 run refuses it."""
    from agro.provenance import ProvenanceError
    from fakes import make_offline_file

    path = make_offline_file(tiny_model_dir, tmp_path / "b16.jsonl", num_prompts=4, group_size=2,
                             precision="bf16")
    base = [f"model={tiny_model_dir}", "steps=1", "prompts_per_step=2", "group_size=2",
            "max_new_tokens=5", "eval_prompts=0", "source=offline", f"offline_path={path}",
            "offline_check_rows=4", "tensorboard=false", "progress=false", "plot=false",
            "save_every=0"]
    cfg = load_config(TrainConfig, None, base + ["precision=bf16", f"output_dir={tmp_path / 'a'}"])
    Trainer(cfg, grader=HashGrader()).train()
    cfg = load_config(TrainConfig, None, base + ["precision=fp32", f"output_dir={tmp_path / 'b'}"])
    with pytest.raises(ProvenanceError, match="precision"):
        Trainer(cfg, grader=HashGrader())
