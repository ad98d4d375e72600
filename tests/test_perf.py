"""agro.perf: FLOP counts checked by hand, phase rates, the measured peak cache, and
precision=auto's calibration (choice recorded atop config.yaml, cached per machine)."""
from __future__ import annotations

import pytest
import torch
import yaml

from agro import logprobs, perf
from agro.rollouts import Group, collate


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path / "cache"))


def test_flop_model_counts_linear_weights_by_hand(tiny_model_dir):
    from agro.models import load_model

    m = load_model(tiny_model_dir)
    fm = perf.FlopModel.of(m)
    c = m.config
    H, I, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = H // c.num_attention_heads * c.num_key_value_heads
    per_layer = H * H + 2 * H * kv + H * H + 3 * H * I      # q, k, v, o, gate, up, down
    assert fm.decoder_params == L * per_layer
    assert fm.head_params == V * H and fm.layers == L and fm.hidden == H
    assert fm.weight_bytes == 4 * sum(p.numel() for p in m.parameters())


def test_batch_flops_by_hand():
    """The padding-free packed pass: per group p_g + sum_i (l_i - 1) positions (groups padded to
    the longest, rounded up to 16 but never past the padded layout), the head on the real
    completion tokens (rounded the same way); one-sample groups: the padded layout."""
    fm = perf.FlopModel(decoder_params=1000, head_params=50, layers=2, hidden=8, weight_bytes=0)
    g1 = Group(prompt_id="a", prompt_ids=[1, 2, 3], completion_ids=[[4, 5], [6]], rewards=[0, 1])
    g2 = Group(prompt_id="b", prompt_ids=[7, 8], completion_ids=[[9, 10, 11, 13], [12]],
               rewards=[0, 1])
    b = collate([g1, g2], 0, current_version=0, require_ref=False)  # G=2, n=2, P=3, T=4
    # the longest packed group (5) rounded up to SHAPE_BUCKET (16) is more than the padded
    # layout's P + n(T-1) = 9: that then; 8 real head rows rounded up: 16 = B x T
    L = 9
    fwd = 2 * 1000 * (2 * L) + 2 * 50 * 16 + 4 * 2 * 8 * (2 * L * L)
    assert perf.batch_flops(fm, b, backward=False) == fwd
    assert perf.batch_flops(fm, b, backward=True) == 3 * fwd
    # the head on every completion position when a loss needs the full logits
    assert perf.batch_flops(fm, b, backward=False, head_all=True) == fwd + 2 * 50 * (4 * 4 - 16)
    with pytest.MonkeyPatch.context() as mp:    # exact lengths: group 2 is 2 + 3 + 0 = 5 long
        mp.setattr(logprobs, "SHAPE_BUCKET", 1)
        L = 5
        assert perf.batch_flops(fm, b, backward=False) == (2 * 1000 * (2 * L) + 2 * 50 * 8
                                                           + 4 * 2 * 8 * (2 * L * L))
    # a model whose head is not a plain linear map takes the padded pass
    padded = perf.FlopModel(decoder_params=1000, head_params=50, layers=2, hidden=8,
                            weight_bytes=0, packable=False)
    L = 3 + 2 * 3
    assert perf.batch_flops(padded, b, backward=False) == (2 * 1000 * (2 * L) + 2 * 50 * 16
                                                           + 4 * 2 * 8 * (2 * L * L))
    one = Group(prompt_id="c", prompt_ids=[1, 2, 3], completion_ids=[[4, 5]], rewards=[0])
    b1 = collate([one, g1.__class__(prompt_id="d", prompt_ids=[7], completion_ids=[[9]],
                                    rewards=[1])], 0, current_version=0, require_ref=False)
    L1 = 3 + 2 - 1                                          # P + T - 1 per row, padded
    assert perf.batch_flops(fm, b1, backward=False) == (2 * 1000 * (2 * L1) + 2 * 50 * (2 * 2)
                                                        + 4 * 2 * 8 * (2 * L1 * L1))



def test_batch_flops_count_the_pairs_attention_by_blocks_scores():
    """From PACKED_BLOCK_MIN_LEN on, a packed pass scores each prompt over itself (Pp^2 per
    group) and each completion over its prompt and itself (Tm (Pp + Tm) per row), Pp and Tm the
    longest prompt and completion inputs rounded up to SHAPE_BUCKET; below it, and for a model
    that does not take blocks, the dense G L^2. Each group by its own length: a micro-batch
    with both kinds is two passes, each padded to its own longest group."""
    fm = perf.FlopModel(decoder_params=1000, head_params=50, layers=2, hidden=8, weight_bytes=0)
    g1 = Group(prompt_id="a", prompt_ids=[1, 2, 3], completion_ids=[[4, 5], [6]], rewards=[0, 1])
    g2 = Group(prompt_id="b", prompt_ids=[7, 8], completion_ids=[[9, 10, 11, 13], [12]],
               rewards=[0, 1])
    b = collate([g1, g2], 0, current_version=0, require_ref=False)  # G=2, n=2, P=3, T=4
    base = 2 * 1000 * (2 * 5) + 2 * 50 * 8                      # L = 5, 8 head rows (bucket 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logprobs, "SHAPE_BUCKET", 1)
        mp.setattr(logprobs, "PACKED_BLOCK_MIN_LEN", 6)
        assert perf.batch_flops(fm, b, backward=False) == base + 4 * 2 * 8 * (2 * 5 * 5)
        mp.setattr(logprobs, "PACKED_BLOCK_MIN_LEN", 4)          # both groups (4 and 5 long)
        Pp, Tm, B, G = 3, 3, 4, 2                               # prompts 3, 2; inputs 1, 0, 3, 0
        blocks = base + 4 * 2 * 8 * (G * Pp * Pp + B * Tm * (Pp + Tm))
        assert perf.batch_flops(fm, b, backward=False) == blocks
        dense_only = perf.FlopModel(decoder_params=1000, head_params=50, layers=2, hidden=8,
                                    weight_bytes=0, block_attention=False)
        assert perf.batch_flops(dense_only, b, backward=False) == base + 4 * 2 * 8 * (2 * 5 * 5)
        # group 1 (4 long) over the dense mask, group 2 (5 long) by blocks: two passes
        mp.setattr(logprobs, "PACKED_BLOCK_MIN_LEN", 5)
        g1_alone = collate([g1], 0, current_version=0, require_ref=False)
        mixed = (2 * 1000 * (4 + 5) + 2 * 50 * 8
                 + 4 * 2 * 8 * (4 * 4 + (2 * 2 + 2 * 3 * (2 + 3))))  # Pp 2, Tm 3 for group 2
        assert perf.batch_flops(fm, b, backward=False) == mixed
        assert perf.batch_flops(fm, g1_alone, backward=False) == (2 * 1000 * 4 + 2 * 50 * 3
                                                                  + 4 * 2 * 8 * 4 * 4)
        # the threshold is the device's: off a CPU (SDPA) the groups keep the dense mask
        mp.setattr(logprobs, "PACKED_BLOCK_MIN_LEN", 4)
        mp.setattr(logprobs, "SDPA_BLOCK_MIN_LEN", 10 ** 9)
        assert perf.batch_flops(fm, b, backward=False) == blocks
        on_cuda = perf.FlopModel(decoder_params=1000, head_params=50, layers=2, hidden=8,
                                 weight_bytes=0, device_type="cuda")
        assert perf.batch_flops(on_cuda, b, backward=False) == base + 4 * 2 * 8 * (2 * 5 * 5)


def test_phase_rates():
    r = perf.phase_rates(learn_flops=4e12, learn_seconds=2.0, ref_flops=1e12, ref_seconds=0.5,
                         gen_tokens=300, decode_steps=30, gen_seconds=3.0, weight_bytes=10**9,
                         peak=4e12)
    assert r["learn_tflops"] == pytest.approx(2.0) and r["ref_tflops"] == pytest.approx(2.0)
    assert r["learn_peak_frac"] == pytest.approx(0.5)
    assert r["gen_tokens_per_second"] == pytest.approx(100.0)
    assert r["gen_weight_gbps"] == pytest.approx(10.0)


@pytest.mark.parametrize("onednn", [True, False])
def test_matmul_peak_is_the_best_of_its_trials_on_the_library_in_use(monkeypatch, onednn):
    """The best of its trials, on oneDNN's GEMM where the fp32 linear layers run on it (on a
    CPU), else PyTorch's; bf16 always PyTorch's."""
    fm = perf.FlopModel(1, 1, 1, 64, 0)
    seen = []

    def rate(m, k, n, *a, onednn=False, _r=iter([3.0, 7.0, 5.0, 2.0, 4.0, 1.0]), **kw):
        seen.append(onednn)
        return (m, k, n) == (512, 64, 256) and next(_r)

    monkeypatch.setattr(perf, "_gemm_rate", rate)
    assert perf.matmul_peak(fm, torch.float32, trials=3, onednn=onednn) == 7.0
    assert seen == [onednn] * 3
    assert perf.matmul_peak(fm, torch.bfloat16, trials=3, onednn=onednn) == 4.0
    assert seen[3:] == [False] * 3


def test_gemm_rate_on_either_library_is_a_rate():
    from agro import onednn_linear

    for o in ([False, True] if onednn_linear.available() else [False]):
        assert perf._gemm_rate(64, 32, 48, torch.float32, "cpu", 0.01, onednn=o) > 1e6



def test_calibrate_precision_times_both_and_caches(tiny_model_dir):
    from agro.models import load_model

    m = load_model(tiny_model_dir)
    cal = perf.calibrate_precision(m, prompts_per_step=2, group_size=2, max_new_tokens=4,
                                   prompt_len=8, reps=1)
    assert cal["choice"] in ("fp32", "bf16") and not cal["cached"]
    for p in ("fp32", "bf16"):
        assert all(cal[p][k] > 0 for k in ("learner", "reference", "sample", "step"))
    faster = min(("fp32", "bf16"), key=lambda p: cal[p]["step"])
    assert cal["choice"] == faster
    assert all(p.grad is None for p in m.parameters())     # timing leaves no gradients behind
    again = perf.calibrate_precision(m, prompts_per_step=2, group_size=2, max_new_tokens=4,
                                     prompt_len=8, reps=1)
    assert again["cached"] and again["choice"] == cal["choice"]


@pytest.mark.parametrize("bf16_learner, timings", [(1.0, 2), (3.5, 4)], ids=["clear", "close"])
def test_calibration_times_again_only_a_close_call(bf16_learner, timings, monkeypatch, tmp_path):
    """One timed call per phase and precision; a second round (best of both kept) only when the
    estimated steps are within 25 % of each other."""
    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path))
    calls = []

    def fake(model, prec, *, reps, **kw):
        calls.append((prec, reps))
        base = {"learner": 4.0, "reference": 1.0, "sample": 1.0, "update": 0.0}
        if prec == "bf16":
            # the second round of a close call is faster: the best must be kept
            base = dict(base, learner=bf16_learner - (0.5 if len(calls) > 2 else 0.0))
        return base

    monkeypatch.setattr(perf, "_time_precision", fake)
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(perf, "_model_key", lambda m: "fake")
    cal = perf.calibrate_precision(model, prompts_per_step=2, group_size=2, max_new_tokens=8,
                                   reps=2)
    assert len(calls) == timings
    assert [r for _, r in calls] == [1, 1] + [2, 2] * (timings > 2)
    assert cal["choice"] == "bf16"
    if timings > 2:
        assert cal["bf16"]["learner"] == 3.0


def test_the_estimate_counts_the_decode_weights_packing_once_per_step(monkeypatch, tmp_path):
    """The sampling steps' time scales with max_new_tokens / decode_steps timed; the packing of
    the decode weights is paid once per sampling call, so it enters the step once."""
    monkeypatch.setenv(perf.CACHE_ENV, str(tmp_path))
    t = {"learner": 1.0, "reference": 0.5, "sample": 0.25, "pack": 0.75, "update": 0.0}
    monkeypatch.setattr(perf, "_time_precision", lambda model, prec, **kw: dict(t))
    monkeypatch.setattr(perf, "_model_key", lambda m: "fake")
    cal = perf.calibrate_precision(torch.nn.Linear(2, 2), prompts_per_step=8, group_size=2,
                                   max_new_tokens=32, reps=1)
    # (1.0 + 0.5) x 8 prompts / 2 groups timed + 0.25 x 32 / 8 steps timed + 0.75 once
    assert cal["fp32"]["step"] == pytest.approx(1.5 * 4 + 0.25 * 4 + 0.75)


def test_a_real_timing_samples_on_packed_weights_and_times_the_packing(tiny_model_dir, monkeypatch):
    """The tiny Llama on a CPU, fp32: every timed sampling call decodes on packed weights built
    before it (not inside it), and the ``pack`` phase packs once per call."""
    from agro import fast_decode
    from agro.models import load_model

    m = load_model(tiny_model_dir)
    assert fast_decode.packing_applies(m)
    packs, decoders = [], []
    real_init = fast_decode.PackedWeights.__init__
    real_from = fast_decode.StaticDecoder.from_prefill.__func__
    monkeypatch.setattr(fast_decode.PackedWeights, "__init__",
                        lambda self, model: packs.append(self) or real_init(self, model))
    monkeypatch.setattr(fast_decode.StaticDecoder, "from_prefill", classmethod(
        lambda cls, *a: decoders.append(a[4] if len(a) > 4 else "auto") or real_from(cls, *a)))
    from agro.fast_decode import PACK_MIN_NEW_TOKENS as T

    t = perf._time_precision(m, "fp32", group_size=2, prompt_len=8, completion_len=T, groups=2,
                             decode_batch=4, decode_steps=3, reps=2)
    assert set(t) >= {"sample", "pack"}
    assert len(decoders) == 3 and all(d is packs[0] for d in decoders)   # warm-up + 2 reps
    assert len(packs) == 1 + 3                                           # before; pack phase x 3
    # too few new tokens for the sampler to pack: neither does the timing
    packs.clear(), decoders.clear()
    perf._time_precision(m, "fp32", group_size=2, prompt_len=8, completion_len=T - 1, groups=2,
                         decode_batch=4, decode_steps=3, reps=1)
    assert packs == [] and decoders == [None, None]


def test_auto_precision_choice_is_written_atop_config_yaml(tiny_model_dir, tmp_path, monkeypatch):
    """Where bf16 is native, precision=auto calibrates and records why; the YAML still loads
    (comments), so --resume keeps the concrete choice."""
    from agro import trainer as trainer_mod
    from agro.config import MICRO_BATCH_TOKENS, TrainConfig, load_config
    from fakes import HashGrader

    import agro.models as models
    monkeypatch.setattr(models, "bf16_is_native", lambda device="cpu": True)
    monkeypatch.setattr(perf, "calibrate_precision",
                        lambda *a, **k: {"choice": "fp32", "cached": False,
                                         "fp32": {"learner": 1.0, "reference": 0.5, "sample": 0.2, "step": 3.0},
                                         "bf16": {"learner": 2.0, "reference": 1.0, "sample": 0.3, "step": 6.0}})
    monkeypatch.setattr(trainer_mod, "calibrate_precision", perf.calibrate_precision)
    cfg = load_config(TrainConfig, None, [f"model={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
                                          "precision=auto", "steps=1", "prompts_per_step=2",
                                          "group_size=2", "max_new_tokens=4", "eval_prompts=0",
                                          "tensorboard=false", "progress=false", "plot=false"])
    tr = trainer_mod.Trainer(cfg, grader=HashGrader())
    assert tr.cfg.precision == "fp32" and tr.reference.precision == "fp32"
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text.startswith("# linear_backend: auto -> ")          # first: precision times with it
    assert "\n# precision: auto -> fp32 (measured on this machine: estimated step " \
           "fp32 3.00 s vs bf16 6.00 s)" in text
    assert yaml.safe_load(text)["precision"] == "fp32"
    # the default token budget (-1) follows the precision chosen, and config.yaml says so
    assert tr.cfg.micro_batch_tokens == MICRO_BATCH_TOKENS["fp32"] == 512
    assert "# micro_batch_tokens: -1 -> 512 (the default for fp32)" in text
    assert yaml.safe_load(text)["micro_batch_tokens"] == 512
    tr.train()                                              # 1 step, checkpointed at the end
    resumed = load_config(TrainConfig, str(tmp_path / "run" / "config.yaml"),
                          [f"output_dir={tmp_path / 'run'}", "steps=2"])
    trainer_mod.Trainer(resumed, resume=True, grader=HashGrader())
    again = (tmp_path / "run" / "config.yaml").read_text()
    head = [x for x in again.splitlines() if x.startswith("# ")]
    assert head == [x for x in text.splitlines() if x.startswith("# ")]    # the same record
    assert head[1].startswith("# precision: auto -> fp32")


def test_lora_backward_counts_no_weight_gradients_for_the_frozen_base():
    fm = perf.FlopModel(decoder_params=1000, head_params=50, layers=2, hidden=8, weight_bytes=0)
    lora = perf.FlopModel(decoder_params=1000, head_params=50, layers=2, hidden=8, weight_bytes=0,
                          frozen_base=True)
    g = Group(prompt_id="a", prompt_ids=[1, 2, 3], completion_ids=[[4, 5], [6]], rewards=[0, 1])
    b = collate([g], 0, current_version=0, require_ref=False)
    fwd = perf.batch_flops(fm, b, backward=False)
    assert perf.batch_flops(fm, b, backward=True) == 3 * fwd
    assert perf.batch_flops(lora, b, backward=True) == 2 * fwd


def test_generate_and_eval_follow_the_precision_train_measured(tiny_model_dir, monkeypatch, tmp_path):
    """precision=auto in `agro generate`/`eval`: where `agro train` timed this model on this
    machine, they take its choice (else a file written in bf16 would fail the fp32 run's
    provenance check); explicit precisions and untimed models keep the flag rule."""
    import dataclasses

    from agro import perf
    from agro.builders import follow_train_precision
    from agro.config import GenerateConfig
    from agro.models import load_model

    monkeypatch.setenv("AGRO_CACHE_DIR", str(tmp_path))
    model = load_model(str(tiny_model_dir))
    assert perf.cached_precision_choice(model) is None
    key = perf.machine_key("cpu")
    head = f"{perf.CACHE_PREFIX}{perf._model_key(model)} "
    perf._store_cache(key, head + "G=8 n=4 T=32 P=32", {"choice": "fp32"})
    assert perf.cached_precision_choice(model) == "fp32"

    class Ref:
        precision = "bf16"

    cfg = dataclasses.replace(GenerateConfig(), precision="bf16")   # what the flag rule resolved
    ref = Ref()
    out, note = follow_train_precision(cfg, "auto", model, ref)
    assert out.precision == "fp32" and ref.precision == "fp32" and "measured" in note
    out, note = follow_train_precision(cfg, "bf16", model, Ref())   # asked for explicitly
    assert out.precision == "bf16" and note is None
    perf._store_cache(key, head + "G=2 n=2 T=8 P=32", {"choice": "bf16"})
    assert perf.cached_precision_choice(model) is None               # timings disagree: no rule


def test_micro_batch_tokens_default_is_per_precision_and_explicit_values_stay():
    from agro.config import ConfigError, MICRO_BATCH_TOKENS, TrainConfig, load_config, micro_batch_tokens_for

    cfg = load_config(TrainConfig, None, [])
    assert cfg.micro_batch_tokens == -1
    assert micro_batch_tokens_for(cfg, "bf16") == MICRO_BATCH_TOKENS["bf16"] == 4096
    assert micro_batch_tokens_for(cfg, "fp32") == MICRO_BATCH_TOKENS["fp32"] == 512
    for v in (0, 1000):
        c = load_config(TrainConfig, None, [f"micro_batch_tokens={v}"])
        assert micro_batch_tokens_for(c, "fp32") == micro_batch_tokens_for(c, "bf16") == v
    with pytest.raises(ConfigError, match="micro_batch_tokens"):
        load_config(TrainConfig, None, ["micro_batch_tokens=-2"])
