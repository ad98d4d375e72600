"""Both generators (HFGenerator: transformers generate(); CachedGenerator: agro's KV-cache loop):
samples come from pi at temperature 1 (no inherited top-k), behaviour log-probs are those of the
distribution actually sampled, EOS handling, determinism, the registry."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agro.generation import (
    CachedGenerator, Generation, Generator, HFGenerator, SamplingParams, available_generators,
    inverse_cdf, make_generator, sample_from_logprobs,
)
from agro.logprobs import completion_logprobs
from agro.models import apply_lora, load_model, load_tokenizer
from agro.rollouts import Group, collate

PROMPTS = [[1, 520, 3310, 77, 9001], [1, 4040, 12], [1, 300, 301, 302, 303, 304, 305]]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(params=[HFGenerator, CachedGenerator], ids=["hf", "cached"])
def Gen(request):
    return request.param


@pytest.fixture
def llama(tiny_model_dir):
    return load_model(tiny_model_dir)


def score(model, gens: list[Generation], pad_id: int, with_logits: bool = False):
    """Re-score generated samples with the training kernel (fp32), in the rollouts layout."""
    groups = [Group(prompt_id=str(i), prompt_ids=g.prompt_ids, completion_ids=g.completion_ids,
                    rewards=[0.0] * len(g.completion_ids)) for i, g in enumerate(gens)]
    batch = collate(groups, pad_token_id=pad_id, current_version=0, require_ref=False)
    behaviour = torch.zeros(batch.completion_ids.shape)
    for b, lp in enumerate(lp for g in gens for lp in g.logprobs):
        behaviour[b, :len(lp)] = torch.tensor(lp)
    with torch.no_grad():
        out = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_ids,
                                  batch.prompt_len, "fp32", with_logits=with_logits)
    return batch, behaviour, out


def check_shapes(gens, n, max_new):
    assert len(gens) == len(PROMPTS)
    for g, p in zip(gens, PROMPTS):
        assert g.prompt_ids == p and len(g.completion_ids) == n and len(g.texts) == n
        for c, lp in zip(g.completion_ids, g.logprobs):
            assert 1 <= len(c) <= max_new and len(lp) == len(c)
            assert all(isinstance(x, float) and x <= 0 for x in lp)


# --------------------------------------------------------------------------- sampling from pi
@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_gpt2_dir"])
def test_behaviour_logprobs_at_temperature_1_equal_pi(Gen, which, request, tok):
    """Proves sampling is from pi (temperature 1) and that generate's positions for left-padded
    prompts match the kernel's (GPT-2 has absolute positions). 3 prompts x 3 samples in batches
    of 4 rows, so rows of one prompt are split across generate calls with different padding."""
    model = load_model(request.getfixturevalue(which))
    # a checkpoint's generation_config must not leak into sampling
    model.generation_config.top_k = 50
    model.generation_config.repetition_penalty = 1.5
    gen = Gen(model, tok, precision="fp32", batch_size=4)
    gens = gen.generate(PROMPTS, 3, SamplingParams(max_new_tokens=6))
    check_shapes(gens, 3, 6)
    batch, behaviour, pi = score(model, gens, tok.pad_token_id)
    torch.testing.assert_close(behaviour, pi, atol=1e-4, rtol=0)
    assert model.generation_config.top_k == 50  # restored after generation


def test_top_k_zero_is_honoured(Gen, llama, tok):
    """With top_k=0 sampled tokens are spread over the vocabulary (tiny random model: nearly
    uniform); with top_k=50 every sampled token is among pi's 50 most likely."""
    llama.generation_config.top_k = 50  # what many hub checkpoints ship
    llama.generation_config.min_p = 0.9  # a truncation transformers applies only if inherited
    gen = Gen(llama, tok, precision="fp32")

    def ranks(params):
        gens = gen.generate(PROMPTS, 4, params)
        batch, _, (_, logits) = score(llama, gens, tok.pad_token_id, with_logits=True)
        chosen = logits.gather(-1, batch.completion_ids[..., None])           # [B, T, 1]
        r = (logits > chosen).sum(-1)                                          # [B, T] rank
        return r[batch.completion_mask > 0]

    r0 = ranks(SamplingParams(max_new_tokens=8))
    assert (r0 < 50).float().mean() < 0.1 and r0.numel() > 50
    r50 = ranks(SamplingParams(max_new_tokens=8, top_k=50))
    assert (r50 < 50).all()


def _warped_logprobs(logits, tokens, temperature, top_p):
    """Independent temperature + nucleus (HF semantics: drop the low tail of mass <= 1 - top_p)."""
    z = logits / temperature
    sorted_z, idx = z.sort(dim=-1)                                  # ascending
    cum = sorted_z.softmax(-1).cumsum(-1)
    drop_sorted = cum <= 1 - top_p
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, idx, drop_sorted)
    z = z.masked_fill(drop, float("-inf"))
    return F.log_softmax(z, -1).gather(-1, tokens[..., None]).squeeze(-1)


def test_temperature_and_top_p_logprobs_are_the_sampling_distribution(Gen, llama, tok):
    gen = Gen(llama, tok, precision="fp32", batch_size=8)
    params = SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9)
    assert not params.samples_from_pi
    gens = gen.generate(PROMPTS, 3, params)
    check_shapes(gens, 3, 6)
    batch, behaviour, (pi, logits) = score(llama, gens, tok.pad_token_id, with_logits=True)
    m = batch.completion_mask > 0
    expected = _warped_logprobs(logits, batch.completion_ids, 0.7, 0.9) * batch.completion_mask
    torch.testing.assert_close(behaviour, expected, atol=1e-4, rtol=0)
    assert (behaviour - pi)[m].abs().mean() > 0.05  # not pi's log-probs


def test_greedy_is_deterministic_argmax_with_untempered_logprobs(Gen, llama, tok):
    gen = Gen(llama, tok, precision="fp32", batch_size=5)
    params = SamplingParams(max_new_tokens=5, greedy=True, temperature=0.5)  # temperature ignored
    torch.manual_seed(1)
    a = gen.generate(PROMPTS, 2, params)
    torch.manual_seed(2)
    b = gen.generate(PROMPTS, 2, params)
    assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
    for g in a:
        assert g.completion_ids[0] == g.completion_ids[1]
    batch, behaviour, (pi, logits) = score(llama, a, tok.pad_token_id, with_logits=True)
    m = batch.completion_mask > 0
    assert (logits.argmax(-1)[m] == batch.completion_ids[m]).all()
    torch.testing.assert_close(behaviour, pi, atol=1e-4, rtol=0)


def test_sampling_reproducible_with_torch_seed(Gen, llama, tok):
    gen = Gen(llama, tok, precision="fp32")
    p = SamplingParams(max_new_tokens=5)
    torch.manual_seed(7)
    a = gen.generate(PROMPTS, 2, p)
    torch.manual_seed(7)
    b = gen.generate(PROMPTS, 2, p)
    torch.manual_seed(8)
    c = gen.generate(PROMPTS, 2, p)
    assert a == b and a != c


# --------------------------------------------------------------------------- EOS
def test_stops_at_eos_keeps_it_and_nothing_after(Gen, llama, tok):
    free = Gen(llama, tok, precision="fp32").generate(PROMPTS, 1, SamplingParams(8, greedy=True))
    ref = [g.completion_ids[0] for g in free]
    assert all(len(c) == 8 for c in ref)  # the tiny model never emits its real EOS greedily
    stop = ref[0][2]  # make the 3rd greedy token of prompt 0 an end-of-sequence token
    llama.generation_config.eos_token_id = [tok.eos_token_id, stop]
    gen = Gen(llama, tok, precision="fp32", batch_size=3)
    assert gen.stop_ids == {tok.eos_token_id, stop}
    out = gen.generate(PROMPTS, 1, SamplingParams(8, greedy=True))
    for g, full in zip(out, ref):
        c, lp = g.completion_ids[0], g.logprobs[0]
        expected = full[:full.index(stop) + 1] if stop in full else full
        assert c == expected and len(lp) == len(c)
        assert stop not in c[:-1]
    assert out[0].completion_ids[0][-1] == stop and len(out[0].completion_ids[0]) <= 3
    assert any(len(g.completion_ids[0]) == 8 for g in out) or all(stop in r for r in ref)


# --------------------------------------------------------------------------- plumbing
def test_model_mode_and_generation_config_restored(Gen, llama, tok):
    llama.train()
    gc = llama.generation_config
    Gen(llama, tok, precision="fp32").generate(PROMPTS[:1], 2, SamplingParams(3))
    assert llama.training and llama.generation_config is gc
    llama.eval()
    Gen(llama, tok, precision="fp32").generate(PROMPTS[:1], 2, SamplingParams(3))
    assert not llama.training


@pytest.mark.parametrize("name", ["hf", "cached"])
def test_bf16_and_lora_generation(name, llama, tok):
    pol = apply_lora(llama, r=2, alpha=4, target_modules="all-linear")
    gen = make_generator(name, pol, tok, precision="bf16", batch_size=16)
    assert isinstance(gen, Generator) and gen.name == name
    gens = gen.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4))
    check_shapes(gens, 2, 4)
    groups = [Group(prompt_id=str(i), prompt_ids=g.prompt_ids, completion_ids=g.completion_ids,
                    rewards=[0.0, 0.0]) for i, g in enumerate(gens)]
    batch = collate(groups, pad_token_id=tok.pad_token_id, current_version=0, require_ref=False)
    with torch.no_grad():
        lp = completion_logprobs(pol, batch.input_ids, batch.attention_mask, batch.completion_ids,
                                 batch.prompt_len, "bf16")
    behaviour = torch.zeros_like(lp)
    for b, x in enumerate(x for g in gens for x in g.logprobs):
        behaviour[b, :len(x)] = torch.tensor(x)
    assert (behaviour - lp).abs().max() < 0.1  # bf16: same model, different kernels


def test_registry_and_params_validation(llama, tok):
    assert available_generators() == ["cached", "hf", "vllm"]
    with pytest.raises(ValueError, match="valid: cached, hf, vllm"):
        make_generator("sglang", llama, tok)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(4, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(4, top_p=1.5)
    assert SamplingParams(4).samples_from_pi and not SamplingParams(4, top_k=5).samples_from_pi
    with pytest.raises(ValueError, match="empty prompt"):
        HFGenerator(llama, tok).generate([[]], 2, SamplingParams(3))


# --------------------------------------------------------------------------- CachedGenerator
def test_cached_generator_equals_generate_greedy(llama, tok):
    """Same model, same prompts: the KV-cache loop's greedy continuations and log-probs are
    generate()'s (prefill shared per prompt, finished rows dropped along the way)."""
    llama.generation_config.eos_token_id = [tok.eos_token_id, 300]
    p = SamplingParams(max_new_tokens=7, greedy=True)
    a = HFGenerator(llama, tok, precision="fp32", batch_size=4).generate(PROMPTS, 3, p)
    b = CachedGenerator(llama, tok, precision="fp32", batch_size=4).generate(PROMPTS, 3, p)
    assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
    for x, y in zip(a, b):
        for la, lb in zip(x.logprobs, y.logprobs):
            torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-4, rtol=0)


def test_cached_generator_drops_finished_rows(llama, tok):
    """Rows that stop early leave the batch; the rest continue on the right cache rows: every
    sample's recorded log-probs still equal a full forward's, and nothing follows a stop token."""
    stops = list(range(1000, 6000))          # ~10 % of the tiny model's mass: rows end at all lengths
    llama.generation_config.eos_token_id = [tok.eos_token_id, *stops]
    gen = CachedGenerator(llama, tok, precision="fp32", batch_size=64)
    torch.manual_seed(3)
    out = gen.generate(PROMPTS, 6, SamplingParams(12))
    lengths = [len(c) for g in out for c in g.completion_ids]
    assert min(lengths) < 12 and max(lengths) == 12 and len(set(lengths)) >= 4, lengths
    stop_set = set(stops) | {tok.eos_token_id}
    for g in out:
        for c in g.completion_ids:
            assert not stop_set.intersection(c[:-1]) and (len(c) == 12 or c[-1] in stop_set)
    _, behaviour, pi = score(llama, out, tok.pad_token_id)
    torch.testing.assert_close(behaviour, pi, atol=1e-4, rtol=0)


def test_sample_from_logprobs_draws_the_distribution():
    """20,000 seeded draws per row: frequencies within 5 standard errors of p, and a token of
    probability 0 is never drawn (top-k / top-p masks)."""
    p = torch.tensor([[0.5, 0.2, 0.0, 0.3, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                      [0.05, 0.05, 0.1, 0.2, 0.25, 0.35]])
    logp = p.log()                                                   # -inf where p == 0
    torch.manual_seed(0)
    N = 20000
    draws = torch.stack([sample_from_logprobs(logp) for _ in range(N)])   # [N, 3]
    for r in range(3):
        freq = torch.bincount(draws[:, r], minlength=6).double() / N
        se = (p[r].double() * (1 - p[r].double()) / N).sqrt()
        assert ((freq - p[r]).abs() <= 5 * se + 1e-12).all(), (r, freq, p[r])
        assert (freq[p[r] == 0] == 0).all()


@pytest.mark.parametrize("rows_at_once", [None, 3])
@pytest.mark.parametrize("V,block", [(1000, 64), (1024, 64), (49152, 1024), (7, 1024)])
def test_inverse_cdf_two_levels_equal_one_float64_cumsum(V, block, rows_at_once, monkeypatch):
    """The two-level search returns the index a single float64 cumulative sum over the whole row
    returns, for random probabilities with zeros (whole zero blocks included) and random r;
    also with its float64 block sums taken a few rows at a time (``rows_at_once``: 64 rows in
    chunks of 3, the last one short)."""
    import agro.generation as G

    if rows_at_once is not None:
        monkeypatch.setattr(G, "_CDF_SUM_ELEMS", rows_at_once * -(-V // block) * block)
    g = torch.Generator().manual_seed(V)
    b = 64
    p = torch.rand(b, V, generator=g) ** 4
    p[torch.rand(b, V, generator=g) < 0.3] = 0                       # top-k/top-p style zeros
    if V >= 4 * block:
        p[:, block:3 * block] = 0                                    # whole blocks of zeros
    r = torch.rand(b, 1, dtype=torch.float64, generator=g)
    p[:, V // 2] += 0.5                                              # no row is all zeros
    p[:4, :min(V - 1, block + 3)] = 0                                # rows that start with zeros,
    p[:4, -1] = 0.5
    r[:4] = 0                                                        # drawn at r = 0 exactly
    r[4:8] = 1 - 2 ** -53                                            # and at the top edge
    p[6:8, -min(V - 1, block + 3):] = 0                              # (trailing zeros too)
    p[6:8, 0] = 0.5
    cdf = p.double().cumsum(-1)
    flat = torch.searchsorted(cdf, r * cdf[:, -1:], right=True).squeeze(-1).clamp(max=V - 1)
    got = inverse_cdf(p, r, block=block)
    assert torch.equal(got, flat), (got != flat).nonzero()
    assert (p.gather(-1, got[:, None]) > 0).all()
    assert inverse_cdf(p[:0], r[:0], block=block).shape == (0,)     # no rows: no draws


@pytest.mark.parametrize("cls", [HFGenerator, CachedGenerator])
def test_bf16_sampling_uses_a_bf16_copy_refreshed_by_sync_weights(cls, llama, tok):
    gen = cls(llama, tok, precision="bf16")
    assert gen.model is not llama and next(gen.model.parameters()).dtype == torch.bfloat16
    assert next(llama.parameters()).dtype == torch.float32          # the policy keeps fp32
    name, p = next((n, p) for n, p in llama.named_parameters() if p.requires_grad)
    with torch.no_grad():
        p.add_(0.25)
    stale = dict(gen.model.named_parameters())[name].detach().clone()
    gen.sync_weights(llama)
    fresh = dict(gen.model.named_parameters())[name]
    assert torch.equal(fresh, p.detach().to(torch.bfloat16)) and not torch.equal(fresh, stale)
    assert cls(llama, tok, precision="fp32").model is llama        # fp32 samples the policy itself
    from agro.models import apply_lora

    peft = apply_lora(llama, r=2, alpha=4)
    assert cls(peft, tok, precision="bf16").model is peft          # LoRA: no copy of the base


def test_bf16_sampling_copy_keeps_fp32_buffers_and_samples_close_to_the_policy(llama, tok):
    """Only the weights are cast: RoPE's inv_freq stays fp32 (a bf16 inv_freq shifts rotary angles
    by ~p * inv_freq * 2^-9). Behaviour log-probs of the copy agree with the policy's own bf16
    scoring within bf16 noise."""
    gen = CachedGenerator(llama, tok, precision="bf16")
    bufs = {n: b.dtype for n, b in gen.model.named_buffers() if b.is_floating_point()}
    assert bufs and all(d == torch.float32 for d in bufs.values()), bufs
    torch.manual_seed(3)
    prompts = [[1, 520, 3310, 77], [1, 4040, 12, 5, 6]]
    gens = gen.generate(prompts, 2, SamplingParams(8))
    groups = [Group(prompt_id=str(i), prompt_ids=g.prompt_ids, completion_ids=g.completion_ids,
                    rewards=[0.0] * 2) for i, g in enumerate(gens)]
    batch = collate(groups, tok.pad_token_id, current_version=0, require_ref=False)
    with torch.no_grad():
        lp = completion_logprobs(llama, batch.input_ids, batch.attention_mask,
                                 batch.completion_ids, batch.prompt_len, "bf16")
    behaviour = torch.zeros_like(lp)
    for b, row in enumerate(x for g in gens for x in g.logprobs):
        behaviour[b, :len(row)] = torch.tensor(row)
    mask = batch.completion_mask > 0
    assert (lp - behaviour)[mask].abs().max() < 0.1
