"""agro.fast_decode: decode steps on a preallocated cache give the model's own next-token logits.

Each step's logits are checked against transformers' forward over the whole sequence so far
(left-padded prompts, rows leaving the batch midway), for a Llama and a Qwen2 (biased q/k/v
projections), in fp32 to float rounding and in bf16 against the fp32 model."""
from __future__ import annotations

import pytest
import torch

from agro import fast_decode
from agro.generation import CachedGenerator, SamplingParams, left_pad
from agro.logprobs import position_ids_from_mask
from agro.models import apply_lora, bf16_copy, load_model, load_tokenizer

PROMPTS = [[1, 520, 3310, 77, 9001], [1, 4040, 12], [1, 300, 301, 302, 303, 304, 305]]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def tiny_qwen2(vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    g = torch.random.get_rng_state()
    torch.manual_seed(7)
    m = Qwen2ForCausalLM(cfg).eval()
    torch.random.set_rng_state(g)
    with torch.no_grad():     # random biases, so a dropped bias shows
        for layer in m.model.layers:
            for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                p.normal_(0, 0.5)
    return m


@pytest.fixture(params=["llama", "qwen2"])
def model(request, tiny_model_dir, tok):
    if request.param == "llama":
        return load_model(tiny_model_dir).eval()
    return tiny_qwen2(len(tok))


def _needs_onednn_bf16() -> None:
    """Skip where oneDNN runs no bf16 GEMM (an AVX2-only CPU): packing bf16 weights cannot apply."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("oneDNN runs no bf16 GEMM on this CPU")


def decode_both(model, n: int, steps: int, keep_after: int | None = None, lazy: bool = False,
                packed: bool = True):
    """Prefill PROMPTS (left-padded), repeat each n times, feed the same random tokens to the
    static decoder and to the model's full forward; returns both per-step logits lists. After
    step ``keep_after`` only every other row stays: dropped from the cache (``select``), or,
    ``lazy``, left in it and skipped (``step_rows``). ``packed``: the decoder on packed weights
    (asserted to be what it runs), else on the modules' own."""
    g = torch.Generator().manual_seed(0)
    ids, am = left_pad(PROMPTS, 0)
    B = len(PROMPTS) * n
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                    use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        am_r = am.repeat_interleave(n, 0)
        dec = fast_decode.StaticDecoder.from_prefill(model, cache, am_r, steps,
                                                     "auto" if packed else None)
        assert (dec.packed is not None) == packed
        seq = ids.repeat_interleave(n, 0)                                # [B, P]
        mask = am_r.clone()
        pos = am_r.sum(-1)
        rows = torch.arange(B)
        slot = None
        got, ref = [], []
        for t in range(steps):
            if keep_after is not None and t == keep_after:
                idx = torch.arange(0, rows.shape[0], 2)
                if lazy:
                    slot = idx
                else:
                    dec.select(idx)
                rows, pos = rows[idx], pos[idx]
            tok = torch.randint(100, 5000, (B,), generator=g)[rows]
            got.append((dec.step(tok, pos) if slot is None else dec.step_rows(slot, tok, pos)).float())
            seq = torch.cat([seq, torch.randint(0, 1, (B, 1))], 1)
            seq[rows, -1] = tok
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            full = model(input_ids=seq[rows], attention_mask=mask[rows],
                         position_ids=position_ids_from_mask(mask[rows])).logits[:, -1]
            ref.append(full.float())
            pos = pos + 1
    return got, ref


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "modules"])
@pytest.mark.parametrize("lazy", [False, True])
def test_static_decode_equals_the_full_forward_fp32(model, lazy, packed):
    got, ref = decode_both(model, n=3, steps=6, keep_after=3, lazy=lazy, packed=packed)
    for t, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=f"step {t}")


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "modules"])
def test_static_decode_in_bf16_is_close_to_the_fp32_model(model, packed):
    """The bf16 copy decoded on the static (bf16) cache: its logits are within bf16 rounding of
    the fp32 model's full forward, relative to their spread (measured 0.0053-0.0063 on both tiny
    models; 0.005-0.006 on the fp32 cache before 2026-12-04; the prompts' padding left unmasked
    gives 0.09-0.54). The tiny random models attend
    almost uniformly, so rotary errors are the fp32 test's job."""
    m16 = bf16_copy(model)
    if packed:
        _needs_onednn_bf16()
        assert fast_decode.packing_applies(m16)
    _, ref = decode_both(model, n=2, steps=5)
    got, _ = decode_both(m16, n=2, steps=5, packed=packed)
    for a, b in zip(got, ref):
        rel = float((a - b).norm() / (b - b.mean(-1, keepdim=True)).norm())
        assert rel < 0.02, rel


def test_packed_bf16_decode_matches_the_bf16_modules(model):
    """bf16 weights: the decoder on packed weights (q/k/v and gate/up stacked) gives the
    modules' logits up to a few bf16 roundings (measured bit-identical on the default model,
    docs/RESULTS.md; stacked GEMMs or other CPUs' kernels may round differently), tighter than
    the 0.02 the bf16 decoder is held to against the fp32 model."""
    _needs_onednn_bf16()
    m16 = bf16_copy(model)
    assert fast_decode.packing_applies(m16)
    a, _ = decode_both(m16, n=2, steps=4, packed=True)
    b, _ = decode_both(m16, n=2, steps=4, packed=False)
    for x, y in zip(a, b):
        rel = float((x - y).norm() / (y - y.mean(-1, keepdim=True)).norm())
        assert rel < 1e-2, rel


def test_packed_decode_keeps_every_bias(tok):
    """A Llama with biased attention and MLP projections (attention_bias, mlp_bias), random
    biases, and an LM head with a bias: the packed decoder equals the full forward in fp32, so
    no stacked or single bias is dropped or misplaced."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attention_bias=True, mlp_bias=True, tie_word_embeddings=False)
    torch.manual_seed(5)
    m = LlamaForCausalLM(cfg).eval()
    m.lm_head = torch.nn.Linear(64, len(tok), bias=True)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    assert fast_decode.packing_applies(m)
    got, ref = decode_both(m, n=2, steps=4, packed=True)
    for t, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=f"step {t}")


def test_packed_weights_are_refused_once_the_model_changes(model):
    """Packed weights are a copy: after an in-place write to any weight (an optimizer step, a
    bf16 refresh) a decoder refuses them instead of sampling from the old policy; packed again,
    the decoder follows the new weights."""
    ids, am = left_pad(PROMPTS, 0)
    pw = fast_decode.PackedWeights(model)
    assert pw.current(model)

    def build(packed):
        with torch.no_grad():
            cache = model(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
        return fast_decode.StaticDecoder.from_prefill(model, cache, am, 2, packed)

    build(pw)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.mul_(1.5)
    assert not pw.current(model)
    with pytest.raises(RuntimeError, match="packed weights"):
        build(pw)
    tok, pos = torch.tensor([5, 6, 7]), am.sum(-1)
    a = build(fast_decode.PackedWeights(model)).step(tok, pos)
    b = build(None).step(tok, pos)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_packing_applies_only_to_plain_linear_layers_on_a_cpu(tiny_model_dir, monkeypatch):
    """Packed where every replaced matmul is a plain nn.Linear of fp32 (or bf16) weights on a
    CPU; not for LoRA, fp16 weights, a projection of another class, an MLP without the
    gate/up/down layout, or with PACKED_WEIGHTS off (then the decoder runs its modules)."""
    llama = load_model(tiny_model_dir)
    assert fast_decode.packing_applies(llama)
    assert fast_decode.PackedWeights.of(llama) is not None
    assert not fast_decode.packing_applies(apply_lora(load_model(tiny_model_dir), r=4))
    assert not fast_decode.packing_applies(load_model(tiny_model_dir).half())

    class Linear2(torch.nn.Linear):
        pass

    odd = load_model(tiny_model_dir)
    odd.model.layers[1].self_attn.k_proj.__class__ = Linear2
    assert fast_decode.supports(odd) and not fast_decode.packing_applies(odd)
    odd = load_model(tiny_model_dir)
    del odd.model.layers[0].mlp.up_proj
    assert not fast_decode.packing_applies(odd)
    hooked = load_model(tiny_model_dir)
    hooked.model.layers[0].mlp.down_proj.register_forward_hook(lambda mod, i, o: o * 2)
    assert not fast_decode.packing_applies(hooked)          # a hook packing would bypass
    other_mlp = load_model(tiny_model_dir)
    other_mlp.model.layers[1].mlp.__class__ = type(
        "MyMLP", (type(other_mlp.model.layers[1].mlp),),
        {"forward": lambda self, x: self.down_proj(self.act_fn(self.up_proj(x)))})
    assert not fast_decode.packing_applies(other_mlp)
    wider = load_model(tiny_model_dir)
    att = wider.model.layers[1].self_attn
    att.o_proj = torch.nn.Linear(att.o_proj.in_features, att.o_proj.out_features, bias=True)
    assert fast_decode.packing_applies(wider)                # a bias alone is fine (stacked)
    mlp = wider.model.layers[1].mlp
    mlp.gate_proj = torch.nn.Linear(mlp.gate_proj.in_features, mlp.gate_proj.out_features + 8)
    assert not fast_decode.packing_applies(wider)            # layers of different shapes
    mixed = load_model(tiny_model_dir)
    mixed.model.layers[1].to(torch.bfloat16)
    assert not fast_decode.packing_applies(mixed)            # weights of two dtypes
    m16 = bf16_copy(llama)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert fast_decode.packing_applies(m16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not fast_decode.packing_applies(m16)              # oneDNN without bf16 GEMMs
    monkeypatch.setattr(fast_decode, "PACKED_WEIGHTS", False)
    assert not fast_decode.packing_applies(llama) and fast_decode.PackedWeights.of(llama) is None


def test_packing_is_skipped_when_memory_is_short(tiny_model_dir, monkeypatch):
    """No copy of the weights when it would take more than half the memory available (then the
    sampler decodes on the modules: PackedWeights.of gives it None)."""
    llama = load_model(tiny_model_dir)
    size = sum(p.numel() * p.element_size() for p in llama.parameters())
    monkeypatch.setattr(fast_decode, "_available_bytes", lambda: 2 * size - 1)
    assert fast_decode.PackedWeights.of(llama) is None
    monkeypatch.setattr(fast_decode, "_available_bytes", lambda: 2 * size)
    assert fast_decode.PackedWeights.of(llama) is not None
    monkeypatch.setattr(fast_decode, "_available_bytes", lambda: None)     # not Linux
    assert fast_decode.PackedWeights.of(llama) is not None


def test_available_memory_is_meminfo_capped_by_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    assert fast_decode._available_bytes(str(meminfo), str(cg)) == 20000000 * 1024   # no cgroup files
    (cg / "memory.max").write_text("max\n")
    (cg / "memory.current").write_text("1000\n")
    assert fast_decode._available_bytes(str(meminfo), str(cg)) == 20000000 * 1024   # no limit
    (cg / "memory.max").write_text(f"{4 << 30}\n")
    (cg / "memory.current").write_text(f"{3 << 30}\n")
    assert fast_decode._available_bytes(str(meminfo), str(cg)) == 1 << 30           # the limit's rest
    assert fast_decode._available_bytes(str(tmp_path / "none"), str(cg)) == 1 << 30
    assert fast_decode._available_bytes(str(tmp_path / "none"), str(tmp_path / "none")) is None


def test_plain_linear_refuses_what_a_kernel_would_bypass(monkeypatch):
    """Exactly nn.Linear with a 2-D weight and nothing else run by its call: no own or global
    hook or pre-hook, no forward set on the instance, no accelerate hook; a bias is allowed
    (callers that cannot take one check it). An MLP with a hook is refused by the packing."""
    from torch.nn.modules import module as _m

    from agro.models import hook_free, plain_linear

    def lin():
        return torch.nn.Linear(4, 3)

    assert plain_linear(lin()) and hook_free(lin())

    class Sub(torch.nn.Linear):
        pass

    assert not plain_linear(Sub(4, 3))
    a = lin()
    a.register_forward_hook(lambda m, i, o: o)
    b = lin()
    b.register_forward_pre_hook(lambda m, i: i)
    c = lin()
    c.forward = lambda x: x
    d = lin()
    d._hf_hook = object()
    assert not any(plain_linear(m) for m in (a, b, c, d))
    monkeypatch.setitem(_m._global_forward_hooks, 12345, lambda m, i, o: o)
    assert not plain_linear(lin())
    monkeypatch.delitem(_m._global_forward_hooks, 12345)
    assert plain_linear(lin()) and not hook_free(None)


def test_a_hook_on_the_mlp_stops_the_packing(tiny_model_dir):
    m = load_model(tiny_model_dir)
    assert fast_decode.packing_applies(m)
    m.model.layers[1].mlp.register_forward_hook(lambda mod, i, o: o * 2)
    assert not fast_decode.packing_applies(m)


def test_the_environment_turns_packing_off():
    import subprocess
    import sys

    code = "from agro import fast_decode as f; print(f.PACKED_WEIGHTS)"
    out = {v: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "AGRO_PACKED_DECODE": v}).stdout.strip()
           for v in ("0", "1")}
    assert out == {"0": "False", "1": "True"}


def test_the_sampler_packs_once_per_call_and_keeps_no_copy(tiny_model_dir, tok, monkeypatch):
    """One generate call over several chunks packs the weights once and hands them to every
    chunk's decoder; after the call nothing holds them (they are a copy of the weights, and must
    not sit beside the learner's activations); samples equal those of the modules' weights."""
    import gc
    import weakref

    model = load_model(tiny_model_dir)
    made = []
    real = fast_decode.PackedWeights.__init__

    def spy(self, m):
        real(self, m)
        made.append(weakref.ref(self))

    used = []
    real_from = fast_decode.StaticDecoder.from_prefill.__func__

    def from_prefill(cls, m, cache, mask, max_new, packed="auto"):
        used.append(packed)
        return real_from(cls, m, cache, mask, max_new, packed)

    monkeypatch.setattr(fast_decode.PackedWeights, "__init__", spy)
    monkeypatch.setattr(fast_decode.StaticDecoder, "from_prefill", classmethod(from_prefill))
    gen = CachedGenerator(model, tok, precision="fp32", batch_size=4)   # 1 prompt x 4 per chunk
    T = fast_decode.PACK_MIN_NEW_TOKENS
    gen.generate(PROMPTS, 4, SamplingParams(T - 1))     # too few tokens to repay the packing
    assert made == [] and used == [None] * len(PROMPTS)
    del used[:]
    torch.manual_seed(2)
    packed_out = gen.generate(PROMPTS, 4, SamplingParams(T))
    assert len(made) == 1 and len(used) == len(PROMPTS)
    assert all(p is not None and p is used[0] for p in used)
    del used[:]
    gc.collect()
    assert made[0]() is None
    monkeypatch.setattr(fast_decode, "PACKED_WEIGHTS", False)
    torch.manual_seed(2)
    plain_out = gen.generate(PROMPTS, 4, SamplingParams(T))
    assert used == [None] * len(PROMPTS)
    assert [g.completion_ids for g in packed_out] == [g.completion_ids for g in plain_out]
    for x, y in zip(packed_out, plain_out):
        for la, lb in zip(x.logprobs, y.logprobs):
            torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-4, rtol=0)


def test_supports_only_plain_llama_family(tiny_model_dir, tiny_gpt2_dir, tok):
    llama = load_model(tiny_model_dir)
    assert fast_decode.supports(llama)
    assert fast_decode.supports(tiny_qwen2(len(tok)))
    assert not fast_decode.supports(load_model(tiny_gpt2_dir))
    assert not fast_decode.supports(apply_lora(load_model(tiny_model_dir), r=4))
    windowed = tiny_qwen2(len(tok))
    windowed.config.use_sliding_window, windowed.config.sliding_window = True, 4
    assert not fast_decode.supports(windowed)


def test_more_steps_than_allocated_is_an_error(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    ids, am = left_pad(PROMPTS, 0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                    use_cache=True)
        dec = fast_decode.StaticDecoder.from_prefill(model, out.past_key_values, am, 1)
        pos = am.sum(-1)
        dec.step(torch.tensor([5, 6, 7]), pos)
        with pytest.raises(RuntimeError, match="max_new_tokens"):
            dec.step(torch.tensor([5, 6, 7]), pos + 1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cached_generator_samples_the_same_with_and_without_the_static_cache(precision, tiny_model_dir, tok):
    """Same seed, same model: in fp32 the static-cache loop draws the transformers-cache loop's
    tokens and records the same behaviour log-probs up to float rounding. In bf16 (the two
    attentions round differently, so draws may part) every recorded log-prob after the first
    token (which comes from the shared prefill) is within bf16 rounding of the fp32 model's
    score of the same sample (mean 0.00075 measured here, on the bf16 cache; the prompts'
    padding left unmasked gives 0.019; rotary errors are the fp32 tests' job: this tiny model attends almost uniformly)."""
    model = load_model(tiny_model_dir)
    stops = list(range(1000, 3000))           # rows finish at many lengths: rows leave the batch
    model.generation_config.eos_token_id = [tok.eos_token_id, *stops]
    outs = []
    for static in (False, True):
        gen = CachedGenerator(model, tok, precision=precision, batch_size=64)
        gen.static_cache = static
        assert not static or fast_decode.applies(gen.model, precision)
        torch.manual_seed(11)
        outs.append(gen.generate(PROMPTS, 4, SamplingParams(10)))
    a, b = outs
    lengths = [len(c) for g in b for c in g.completion_ids]
    assert len(set(lengths)) >= 3 and max(lengths) >= 5, lengths
    if precision == "fp32":
        assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
        for x, y in zip(a, b):
            for la, lb in zip(x.logprobs, y.logprobs):
                torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-4, rtol=0)
        return
    diffs = []
    with torch.no_grad():
        for g in b:
            for c, lp in zip(g.completion_ids, g.logprobs):
                ids = torch.tensor([g.prompt_ids + c])
                full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # fp32 model
                P = len(g.prompt_ids)
                exact = full[P - 1:P - 1 + len(c)].gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
                diffs += (torch.tensor(lp[1:]) - exact[1:]).abs().tolist()
    assert len(diffs) >= 20 and sum(diffs) / len(diffs) < 0.005, sum(diffs) / len(diffs)


def test_long_samples_past_the_slices_are_the_transformers_paths(tiny_model_dir, tok):
    """fp32, same seed, 150 new tokens after <= 7-column prompts (a 157-column cache: steps read
    64, then 128 columns, then all): the static-cache loop draws the transformers-cache loop's
    tokens, with rows finishing at many lengths (they leave the cache once a quarter are done),
    and records the same behaviour log-probs up to float rounding."""
    model = load_model(tiny_model_dir)
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(1000, 1400)]
    outs = []
    for static in (False, True):
        gen = CachedGenerator(model, tok, precision="fp32", batch_size=64)
        gen.static_cache = static
        assert not static or fast_decode.applies(gen.model, "fp32")
        torch.manual_seed(3)
        outs.append(gen.generate(PROMPTS, 4, SamplingParams(150)))
    a, b = outs
    lengths = sorted(len(c) for g in b for c in g.completion_ids)
    assert lengths[0] < 64 and lengths[-1] > 130 and len(set(lengths)) >= 6, lengths
    assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
    for x, y in zip(a, b):
        for la, lb in zip(x.logprobs, y.logprobs):
            torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-4, rtol=0)


def test_when_finished_rows_leave_the_static_cache_does_not_change_the_samples(tiny_model_dir, tok):
    """fp32, same seed: dropping finished rows at every finish (compact_at=1), once a quarter are
    done (the default) or never (compact_at=0) draws the same tokens and records the same
    behaviour log-probs up to float rounding (a decode matmul over more rows may round
    differently)."""
    model = load_model(tiny_model_dir)
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(1000, 3000)]
    outs = []
    for at in (1.0, CachedGenerator.compact_at, 0.0):
        gen = CachedGenerator(model, tok, precision="fp32", batch_size=64)
        gen.compact_at = at
        torch.manual_seed(5)
        outs.append(gen.generate(PROMPTS, 4, SamplingParams(10)))
    lengths = [len(c) for g in outs[0] for c in g.completion_ids]
    assert len(set(lengths)) >= 3, lengths        # rows finish at several steps
    for other in outs[1:]:
        assert [g.completion_ids for g in other] == [g.completion_ids for g in outs[0]]
        for x, y in zip(outs[0], other):
            for la, lb in zip(x.logprobs, y.logprobs):
                torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-5, rtol=0)


def test_scoring_passes_pick_the_attention_kernel_by_precision_on_cpu():
    """On a CPU every fp32 log-prob pass (learner and reference: the same kernel, so log pi -
    log pi_ref is exactly 0 where the weights are equal) runs SDPA's math backend; bf16 passes,
    and other devices, keep PyTorch's own choice (flash on a CPU: the faster bf16 learner step,
    docs/RESULTS.md)."""
    from agro.logprobs import attention_backend

    before = torch.backends.cuda.flash_sdp_enabled()
    assert before                                    # PyTorch's default: flash allowed
    for grad in (True, False):
        with torch.set_grad_enabled(grad), attention_backend("cpu", "fp32"):
            assert torch.backends.cuda.math_sdp_enabled()
            assert not torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() == before
        with torch.set_grad_enabled(grad), attention_backend("cpu", "bf16"):
            assert torch.backends.cuda.flash_sdp_enabled()
    for bad in ("auto", None, "fp16"):
        with pytest.raises(ValueError, match="precision"):
            attention_backend("cpu", bad)
    for p in ("fp32", "bf16"):
        with attention_backend("meta", p):
            assert torch.backends.cuda.flash_sdp_enabled() == before


def static_logits(model, n: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """The static decoder's logits for ``steps`` random tokens after PROMPTS x n (no full forward)."""
    g = torch.Generator().manual_seed(seed)
    ids, am = left_pad(PROMPTS, 0)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                      use_cache=True).past_key_values
        cache.batch_repeat_interleave(n)
        am_r = am.repeat_interleave(n, 0)
        dec = fast_decode.StaticDecoder.from_prefill(model, cache, am_r, steps)
        pos = am_r.sum(-1)
        out = []
        for t in range(steps):
            out.append(dec.step(torch.randint(100, 5000, (am_r.shape[0],), generator=g), pos + t).float())
    return out


def test_long_static_decode_equals_the_full_forward_fp32(model):
    """Past 2 x SLICE_COLUMNS columns a step reads a slice of the cache (its written columns
    rounded up): 200 steps after 7-column prompts read 64, then 128 of the 207 columns, then all,
    and one of the three rows leaves after step 100 (the Llama drops it from the cache, the
    Qwen2 leaves it in and skips it)."""
    lazy = model.config.model_type == "qwen2"
    P, S = max(map(len, PROMPTS)), fast_decode.SLICE_COLUMNS
    assert 3 * S < P + 200 < 4 * S
    got, ref = decode_both(model, n=1, steps=200, keep_after=100, lazy=lazy)
    for t, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=f"step {t}")


@pytest.mark.parametrize("bf16", [False, True])
def test_reading_a_slice_of_the_cache_changes_no_logit(model, bf16, monkeypatch):
    """The slice's extra columns are masked: its logits equal those of attention over every
    column of the cache up to the matmuls' blocking (fp32: measured at most 2.4e-7 on logits of
    size ~0.5; bf16: bit for bit on Zen 4, held to 1e-2, a few bf16 steps at that size, in case
    another CPU's bf16 kernels block by the column count). 200 steps: slices of 64 and 128."""
    m = bf16_copy(model) if bf16 else model
    sliced = static_logits(m, n=2, steps=200)
    monkeypatch.setattr(fast_decode, "SLICE_COLUMNS", 10 ** 6)
    every = static_logits(m, n=2, steps=200)
    for t, (a, b) in enumerate(zip(sliced, every)):
        torch.testing.assert_close(a, b, atol=1e-2 if bf16 else 1e-6, rtol=0, msg=f"step {t}")


def test_which_columns_a_step_reads(tiny_model_dir, monkeypatch):
    """The slice rule: the written columns rounded up to SLICE_COLUMNS while that leaves at least
    SLICE_COLUMNS unread, else the whole cache (the default job's ~70 columns: always whole)."""
    model = load_model(tiny_model_dir).eval()
    seen = []                       # the key operand's columns of each step's first matmul
    real = torch.matmul

    def spy(a, b):
        seen.append(b.shape[-1])
        return real(a, b)

    ids, am = left_pad([[1] * 7], 0)

    def reads(max_new: int) -> list[int]:
        with torch.no_grad():
            cache = model(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
            dec = fast_decode.StaticDecoder.from_prefill(model, cache, am, max_new)
            out = []
            with monkeypatch.context() as mp:
                mp.setattr(torch, "matmul", spy)
                for t in range(max_new):
                    seen.clear()
                    dec.step(torch.tensor([5]), torch.tensor([7 + t]))
                    out.append(seen[0])
        return out

    # columns 0..c (c = 7 + t) must be read: 64 while c < 64, then 128, then all 207
    assert reads(200) == [64] * 57 + [128] * 64 + [207] * 79
    assert reads(63) == [70] * 63         # a 70-column cache (the default job's size): whole


def test_the_cache_is_bf16_for_bf16_weights_else_fp32(model, monkeypatch):
    """fp32 weights: fp32 cache; bf16 weights: bf16 cache (their keys and values are bf16 values,
    so nothing is lost), and the mask stays fp32; BF16_CACHE=False gives the old fp32 cache."""
    ids, am = left_pad(PROMPTS, 0)

    def build(m):
        with torch.no_grad():
            cache = m(input_ids=ids, attention_mask=am, use_cache=True).past_key_values
        return fast_decode.StaticDecoder.from_prefill(m, cache, am, 3)

    assert build(model).k.dtype == build(model).v.dtype == torch.float32
    dec = build(bf16_copy(model))
    assert dec.k.dtype == dec.v.dtype == torch.bfloat16 and dec.mask.dtype == torch.float32
    monkeypatch.setattr(fast_decode, "BF16_CACHE", False)
    assert build(bf16_copy(model)).k.dtype == torch.float32
