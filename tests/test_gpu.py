"""The whole path on a CUDA device: a few training steps end to end in fp32, bf16 and LoRA, the
held-out evaluation, and resume. Marked ``gpu``; skipped where CUDA is absent (the project's CI
machine has no GPU: these tests have not been run there). ``bench/gpu_smoke.sh`` runs them, and
the default job for a few steps, on a machine with one GPU.

What the CPU suite does check of device handling: every tensor a loss sees must be on the
device of ``logprobs`` (``compute_loss`` names the ones that are not; test below), and the
trainer moves each collated batch with ``Batch.to`` in one place.
"""
from __future__ import annotations

import json

import pytest
import torch

from agro import logprobs
from agro.config import TrainConfig, load_config
from agro.logprobs import chosen_logprobs
from agro.losses import compute_loss
from agro.trainer import Trainer
from fakes import HashGrader

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()

FAST = ["steps=2", "prompts_per_step=4", "group_size=3", "max_new_tokens=6", "eval_prompts=4",
        "eval_samples=2", "tensorboard=false", "progress=false", "plot=false", "lr=1e-3",
        "warmup_steps=0", "save_every=1"]


def test_compute_loss_names_tensors_on_another_device():
    """Runs everywhere: 'meta' tensors stand in for a second device."""
    lp = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"logprobs is on cpu but rewards on meta, on_policy on meta"):
        compute_loss("agro", lp, torch.zeros(4, 3), torch.ones(4, 3), torch.zeros(4, device="meta"),
                     2, 0.1, on_policy=torch.ones(4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"ref_logprobs on meta"):
        compute_loss("agro", lp, torch.zeros(4, 3, device="meta"), torch.ones(4, 3),
                     torch.zeros(4), 2, 0.1)


def test_batch_to_moves_every_tensor():
    from agro.rollouts import Group, collate

    g = Group(prompt_id="a", prompt_ids=[1, 2], completion_ids=[[3], [4, 5]], rewards=[0.0, 1.0],
              ref_logprobs=[[-1.0], [-1.0, -2.0]])
    b = collate([g], 0, current_version=0).to("meta")
    tensors = [v for v in vars(b).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 7 and all(t.device.type == "meta" for t in tensors)


def _run(tiny_model_dir, tmp_path, *extra, resume=False):
    cfg = load_config(TrainConfig, None, FAST + [f"model={tiny_model_dir}",
                                                 f"output_dir={tmp_path / 'run'}", *extra])
    tr = Trainer(cfg, resume=resume, grader=HashGrader())
    assert tr.device.type == "cuda" and next(tr.policy.parameters()).is_cuda
    res = tr.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return tr, res, rows


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("extra", [["precision=fp32"], ["precision=bf16"],
                                   ["precision=bf16", "lora=true", "lora_r=4"],
                                   ["precision=fp32", "loss=kl_pg_token"],
                                   ["precision=fp32", "loss=agro_on", "beta=0.5"]],
                         ids=["fp32", "bf16", "lora", "token-kl", "agro_on"])
def test_steps_end_to_end_on_cuda(tiny_model_dir, tmp_path, extra):
    if "precision=bf16" in extra and not bf16_ok:
        pytest.skip("this GPU has no bf16 support")
    tr, res, rows = _run(tiny_model_dir, tmp_path, *extra)
    assert res.steps_done == 2 and len(rows) == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert res.before is not None and res.after is not None and "kl_pi_ref" in res.after


@pytest.mark.gpu
@cuda
def test_resume_on_cuda_is_bit_identical(tiny_model_dir, tmp_path):
    a, _, _ = _run(tiny_model_dir, tmp_path / "a", "precision=fp32", "steps=4", "eval_prompts=0")
    _run(tiny_model_dir, tmp_path / "b", "precision=fp32", "steps=2", "eval_prompts=0")
    b, _, _ = _run(tiny_model_dir, tmp_path / "b", "precision=fp32", "steps=4", "eval_prompts=0",
                   resume=True)
    pa = dict(a.policy.named_parameters())
    # CUDA backward kernels (index_add in the packed pass, embedding) may be nondeterministic:
    # equal up to float reordering, far below the 4 steps' movement
    diff = max(float((p - pa[n]).abs().max()) for n, p in b.policy.named_parameters())
    assert diff < 1e-5, diff


@pytest.mark.gpu
@cuda
def test_packed_gather_is_deterministic_on_cuda():
    """The packed pass's row gather takes the op whose backward is deterministic on the device
    (on CUDA accumulating index_put_; index_add_ uses atomics): under
    torch.use_deterministic_algorithms(True) an op without a deterministic CUDA kernel raises."""
    from agro.logprobs import _gather_rows

    x = torch.randn(50, 16, device="cuda", requires_grad=True)
    idx = torch.tensor([3, 3, 3, 7, 1, 3], device="cuda")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            x.grad = None
            _gather_rows(x, idx).pow(2).sum().backward()
            grads.append(x.grad.clone())
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(grads[0][3], (2 * x.detach()[3]) * 4)


@pytest.mark.gpu
@cuda
def test_block_attention_equals_the_dense_mask_on_cuda(tiny_model_dir, monkeypatch):
    """A packed pass with attention by blocks (SDPA_BLOCK_MIN_LEN 0: the threshold off a CPU) on
    a CUDA model gives the dense block mask's log-probs and gradients (fp32), every layer
    through the blocks."""
    from agro.logprobs import completion_logprobs
    from agro.models import load_model
    from agro.rollouts import Group, collate

    model = load_model(tiny_model_dir).cuda().eval()
    gen = torch.Generator().manual_seed(3)
    groups = [Group(prompt_id=str(i),
                    prompt_ids=[1] + torch.randint(100, 30000, (k,), generator=gen).tolist(),
                    completion_ids=[torch.randint(100, 30000, (int(c),), generator=gen).tolist()
                                    for c in torch.randint(5, 20, (4,), generator=gen)],
                    rewards=[0.0] * 4) for i, k in enumerate((9, 5, 12))]
    b = collate(groups, pad_token_id=0, current_version=0, require_ref=False)
    args = (b.input_ids, b.attention_mask, b.completion_ids, b.prompt_len)
    ran, real = [], logprobs._block_attention_ran_everywhere
    monkeypatch.setattr(logprobs, "_block_attention_ran_everywhere",
                        lambda dec, lay: ran.append(real(dec, lay)) or ran[-1])
    out = []
    for threshold in (10 ** 9, 0):
        monkeypatch.setattr(logprobs, "SDPA_BLOCK_MIN_LEN", threshold)
        model.zero_grad(set_to_none=True)
        lp = completion_logprobs(model, *args, group_size=4)
        lp.sum().backward()
        out.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
    assert ran == [True]
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    for g0, g1 in zip(out[0][1], out[1][1]):
        assert (g0 - g1).abs().max() <= 1e-5 * g0.abs().max()


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(not bf16_ok, reason="needs bf16 on the GPU")
def test_head_chosen_logprobs_takes_the_fused_kernel_on_cuda_in_bf16():
    """Off the CPU a plain head under bf16 takes the fused kernel (agro.logprobs.fused_head_dtype),
    with the numbers of the bf16 head + the log-prob kernel."""
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False).cuda()
    h = torch.randn(9, 64, device="cuda", requires_grad=True)
    ids = torch.randint(0, 300, (9,), device="cuda")
    lp = logprobs.head_chosen_logprobs(head, h, ids, "bf16")
    assert lp.grad_fn is not None and "HeadChosenLogProb" in type(lp.grad_fn).__name__
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = chosen_logprobs(head(h), ids)
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=0)
