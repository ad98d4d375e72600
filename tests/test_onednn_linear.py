"""agro.onednn_linear: fp32 linear layers on oneDNN's GEMM (unit: the autograd function against
fp64; component: the module swap, the choice and its cache; integration: the trainer's choice,
config.yaml, resume, and the log-probs of a tiny Llama on either library)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from agro import onednn_linear as ol
from agro.models import plain_linear

needs_onednn = pytest.mark.skipif(not ol.available(), reason="this torch has no oneDNN")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@needs_onednn
@pytest.mark.parametrize("cls", [ol.OneDnnLinear, ol.OneDnnFwdLinear])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 48), (3, 5, 48), "transposed"])
def test_forward_and_gradients_match_fp64(bias, shape, cls):
    """y = x W^T + b, dx = dy W, dW = dy^T x, db = sum dy, against the fp64 products: fp32
    rounding only (~1e-6 of the largest entry; a wrong operand or transpose is O(1))."""
    g = torch.Generator().manual_seed(0)
    if shape == "transposed":      # an N-D input that is not contiguous
        shape = (3, 5, 48)
        x = torch.randn(48, 5, 3, dtype=torch.float64, generator=g).permute(2, 1, 0)
    else:
        x = torch.randn(*shape, dtype=torch.float64, generator=g)
    w = torch.randn(80, 48, dtype=torch.float64, generator=g) / 7
    b = torch.randn(80, dtype=torch.float64, generator=g) if bias else None
    dy = torch.randn(*shape[:-1], 80, dtype=torch.float64, generator=g)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    assert xf.is_contiguous() == (x.is_contiguous())
    bf = b.float().requires_grad_() if bias else None
    lin = torch.nn.Linear(48, 80, bias=bias)
    lin.__class__ = cls
    lin.weight, lin.bias = torch.nn.Parameter(wf), (torch.nn.Parameter(bf) if bias else None)
    y = lin(xf)
    y.backward(dy.float())
    assert y.shape == (*shape[:-1], 80) and y.dtype == torch.float32
    assert _rel(y, F.linear(x, w, b)) < 1e-5
    assert _rel(xf.grad, dy @ w) < 1e-5
    assert _rel(lin.weight.grad, dy.reshape(-1, 80).t() @ x.reshape(-1, 48)) < 1e-5
    if bias:
        assert _rel(lin.bias.grad, dy.reshape(-1, 80).sum(0)) < 1e-5


@needs_onednn
def test_odd_inputs_and_only_the_gradients_asked_for():
    """Transposed (non-contiguous) and 1-D inputs, zero rows, a bias alone needing a gradient;
    a frozen weight keeps no input for the backward, a frozen input no weight."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True)
    xt = torch.randn(8, 5, generator=g).t()                     # [5, 8], not contiguous
    assert _rel(ol._OneDnnLinearFn.apply(xt, w, b, True), F.linear(xt, w, b)) < 1e-5
    lin = torch.nn.Linear(8, 6)
    lin.__class__ = ol.OneDnnLinear
    x1 = torch.randn(8, generator=g)
    assert lin(x1).shape == (6,) and _rel(lin(x1), F.linear(x1, lin.weight, lin.bias)) < 1e-5
    assert lin(torch.randn(0, 8)).shape == (0, 6)
    lin.weight.requires_grad_(False)
    lin(torch.randn(3, 8)).sum().backward()                     # only the bias trains
    assert lin.weight.grad is None and torch.equal(lin.bias.grad, torch.full((6,), 3.0))
    x = torch.randn(4, 8, generator=g)
    y = ol._OneDnnLinearFn.apply(x, w, None, True)
    assert y.grad_fn.saved_tensors[1] is None                  # x needs no gradient: no W kept
    y.sum().backward()
    assert x.grad is None and w.grad is not None
    x2 = torch.randn(4, 8, generator=g, requires_grad=True)
    y2 = ol._OneDnnLinearFn.apply(x2, w.detach(), None, True)
    assert y2.grad_fn.saved_tensors[0] is None                 # frozen W: no input kept
    y2.sum().backward()
    assert _rel(x2.grad, w.detach().sum(0).expand(4, 8)) < 1e-5


@needs_onednn
def test_no_grad_calls_skip_the_autograd_function(monkeypatch):
    lin = torch.nn.Linear(16, 8)
    lin.__class__ = ol.OneDnnLinear
    fn, lp = [], []
    real_fn, real_lp = ol._OneDnnLinearFn.apply, ol._lp
    monkeypatch.setattr(ol._OneDnnLinearFn, "apply", lambda *a: fn.append(1) or real_fn(*a))
    monkeypatch.setattr(ol, "_lp", lambda *a: lp.append(1) or real_lp(*a))
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = lin(x)
    assert fn == [] and lp == [1] and y.grad_fn is None
    lin.requires_grad_(False)
    assert lin(x).grad_fn is None and fn == []          # nothing needs a gradient
    lin(x.requires_grad_())
    assert fn == [1]


@needs_onednn
def test_head_logits_are_fresh_so_the_inplace_gradient_applies(monkeypatch):
    """The LM head's logits on oneDNN are a fresh tensor (no view of an intermediate): the
    log-prob kernel then writes their gradient in place, as for F.linear's."""
    from agro import logprobs

    head = torch.nn.Linear(16, 40, bias=False)
    head.__class__ = ol.OneDnnLinear
    h = torch.randn(7, 16, requires_grad=True)
    assert head(h)._base is None and head(h.view(7, 1, 16))._base is None
    seen = []
    real = logprobs._ChosenLogProb.apply
    monkeypatch.setattr(logprobs._ChosenLogProb, "apply", lambda *a: seen.append(a[3]) or real(*a))
    lp = logprobs.head_chosen_logprobs(head, h, torch.randint(0, 40, (7,)), "fp32")
    lp.sum().backward()
    assert seen == [True] and h.grad is not None


@needs_onednn
def test_module_runs_onednn_for_fp32_cpu_only(monkeypatch):
    """fp32 on a CPU takes oneDNN; bf16 weights, fp64, autocast and a GPU-less fallback are plain
    F.linear, bit for bit."""
    lin = torch.nn.Linear(16, 8)
    lin.__class__ = ol.OneDnnLinear
    calls = []
    real = ol._OneDnnLinearFn.apply
    monkeypatch.setattr(ol._OneDnnLinearFn, "apply", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 16)
    assert _rel(lin(x), F.linear(x, lin.weight, lin.bias)) < 1e-6 and calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        assert y.dtype == torch.bfloat16
    assert calls == [1]
    xm = torch.empty(3, 16, device="meta")                     # any other device: F.linear
    assert copy.deepcopy(lin).to("meta")(xm).device.type == "meta" and calls == [1]
    x64, lin64 = x.double(), copy.deepcopy(lin).double()
    assert torch.equal(lin64(x64), F.linear(x64, lin64.weight, lin64.bias)) and calls == [1]
    linb = copy.deepcopy(lin).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    assert torch.equal(linb(xb), F.linear(xb, linb.weight, linb.bias)) and calls == [1]


def test_install_swaps_classes_keeps_state_and_reverts(tiny_model_dir):
    from agro.models import load_model

    m = load_model(str(tiny_model_dir))
    shapes = ol.linear_shapes(m)
    head = m.get_output_embeddings()
    assert shapes[tuple(head.weight.shape)] == 1            # the LM head is counted (tied)
    n_layers = sum(shapes.values())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    assert ol.use("onednn", m) == n_layers
    assert type(head) is ol.OneDnnLinear and plain_linear(head)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert type(copy.deepcopy(m).get_output_embeddings()) is ol.OneDnnLinear
    one = next(iter(shapes))
    assert ol.install(m, [one]) == shapes[one]              # only that shape stays on oneDNN
    assert ol.use("aten", m) == 0
    assert all(type(x) is not ol.OneDnnLinear for x in m.modules())
    with pytest.raises(ValueError, match="concrete"):
        ol.use("auto", m)


@needs_onednn
def test_tiny_llama_logprobs_and_gradients_agree_across_libraries(tiny_model_dir, monkeypatch):
    """The learner's pass (packed log-probs, the LM head, the backward) on oneDNN against aten:
    the same numbers up to fp32 rounding."""
    from agro.logprobs import completion_logprobs
    from agro.models import load_model

    torch.manual_seed(0)
    m = load_model(str(tiny_model_dir))
    V = m.config.vocab_size
    prompt = torch.randint(0, V, (2, 6)).repeat_interleave(3, 0)
    comp = torch.randint(0, V, (6, 9))
    ids, am = torch.cat([prompt, comp], 1), torch.ones(6, 15, dtype=torch.long)
    out, calls = {}, {}
    real = ol._lp
    for backend in ("aten", "onednn", "onednn_fwd"):
        calls[backend] = []
        monkeypatch.setattr(ol, "_lp", lambda *a, c=calls[backend]: c.append(1) or real(*a))
        ol.use(backend, m)
        m.zero_grad()
        lp = completion_logprobs(m, ids, am, comp, 6, "fp32", group_size=3)
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        out[backend] = (lp.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    # every linear layer ran forward, input gradient (and, for onednn, weight gradient) on
    # oneDNN; the LM head (N = the 49,152-token vocabulary) its backward slice by slice
    per = {(n, k): -(-n // ol.BACKWARD_SLICE_COLUMNS) if n >= ol.BACKWARD_SLICE_MIN_N else 1
           for n, k in ol.linear_shapes(m)}
    assert max(per.values()) == 48                               # the head: 48 slices of 1024
    fwd_dx = sum(c * (1 + per[s]) for s, c in ol.linear_shapes(m).items())
    dw = sum(c * per[s] for s, c in ol.linear_shapes(m).items())
    assert [len(calls[b]) for b in calls] == [0, fwd_dx + dw, fwd_dx]
    for b in ("onednn", "onednn_fwd"):
        assert _rel(out[b][0], out["aten"][0]) < 1e-5
        for n, g in out["aten"][1].items():
            assert _rel(out[b][1][n], g) < 1e-3, (b, n)     # sums of many rounded products


def test_resolve_rules(tiny_model_dir, monkeypatch):
    from agro.models import load_model

    m = load_model(str(tiny_model_dir))
    monkeypatch.setattr(ol, "time_shape", lambda *a, **k: pytest.fail("timed"))
    assert ol.resolve(m, "aten", "fp32")[0] == "aten"
    assert ol.resolve(m, "auto", "bf16")[0] == "aten"          # bf16: nothing timed
    with pytest.raises(ValueError, match="linear_backend must be"):
        ol.resolve(m, "mkl", "fp32")
    monkeypatch.setattr(ol, "available", lambda: False)
    assert ol.resolve(m, "auto", "fp32") == ("aten", "linear_backend: auto -> aten "
                                                   "(this torch has no oneDNN (mkldnn))")
    with pytest.raises(ValueError, match="linear_backend=onednn: this torch has no oneDNN"):
        ol.resolve(m, "onednn", "fp32")


@pytest.mark.parametrize("aten,onednn,aten_dw,onednn_dw,want", [
    (2.0, 1.0, 1.0, 0.5, "onednn"), (2.0, 1.0, 1.0, 1.5, "onednn_fwd"),
    (1.0, 0.97, 1.0, 1.0, "aten"), (1.0, 2.0, 1.0, 1.0, "aten")])
def test_auto_chooses_by_weighted_timing_and_caches(tiny_model_dir, monkeypatch, tmp_path,
                                                   aten, onednn, aten_dw, onednn_dw, want):
    """auto: the fastest of a learner pass's linear GEMMs (each shape's products x its number
    of layers), a oneDNN backend only when at least MIN_SPEEDUP faster than aten; the timing is
    cached per machine and shape set."""
    from agro.models import load_model

    monkeypatch.setenv("AGRO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ol, "available", lambda: True)
    m = load_model(str(tiny_model_dir))
    timed = []

    def fake(n, k, rows=ol.CALIBRATION_ROWS, reps=3):
        timed.append((n, k))
        return {"aten": aten * n * k, "onednn": onednn * n * k, "aten_dw": aten_dw * n * k,
                "onednn_dw": onednn_dw * n * k}

    monkeypatch.setattr(ol, "time_shape", fake)
    backend, line = ol.resolve(m, "auto", "fp32")
    assert backend == want and f"auto -> {want}" in line and "cached" not in line
    tot = (aten + aten_dw, onednn + onednn_dw, onednn + aten_dw)
    rounds = 2 if tot[0] < ol.CLOSE * min(tot) else 1                     # close: again
    assert sorted(timed) == sorted(list(ol.linear_shapes(m)) * rounds)
    cal = ol.calibrate(m)
    assert cal["cached"] and cal["choice"] == want and len(timed) == rounds * len(ol.linear_shapes(m))
    w = sum(c * n * k for (n, k), c in ol.linear_shapes(m).items())
    assert cal["totals"]["aten"] == pytest.approx((aten + aten_dw) * w, rel=1e-4)
    assert cal["totals"]["onednn_fwd"] == pytest.approx((onednn + aten_dw) * w, rel=1e-4)


@needs_onednn
def test_trainer_records_the_choice_and_resume_keeps_it(tiny_model_dir, tmp_path, monkeypatch):
    import yaml

    from fakes import HashGrader
    from test_train import make_cfg

    from agro.config import TrainConfig, load_config
    from agro.trainer import Trainer

    monkeypatch.setenv("AGRO_CACHE_DIR", str(tmp_path / "cache"))    # not the session's timings
    monkeypatch.setattr(ol, "time_shape", lambda n, k, rows=0, reps=0: dict(
        aten=2.0, onednn=1.0, aten_dw=1.0, onednn_dw=0.5))
    cfg = make_cfg(tiny_model_dir, tmp_path, "steps=1", "save_every=1", "precision=fp32",
                   "linear_backend=auto")
    tr = Trainer(cfg, grader=HashGrader())
    assert tr.cfg.linear_backend == "onednn"
    assert tr.precision_notes[0].startswith("linear_backend: auto -> onednn (measured")
    for model in (tr.policy, tr.reference.model):
        assert type(model.get_output_embeddings()) is ol.OneDnnLinear
    tr.train()
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert yaml.safe_load(text)["linear_backend"] == "onednn"
    assert "# linear_backend: auto -> onednn" in text
    # resumed with linear_backend=auto: keeps onednn without timing anything (an empty cache)
    monkeypatch.setenv("AGRO_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setattr(ol, "calibrate", lambda *a, **k: pytest.fail("timed on resume"))
    resumed = load_config(TrainConfig, str(tmp_path / "run" / "config.yaml"),
                          ["steps=2", "linear_backend=auto"])
    tr2 = Trainer(resumed, resume=True, grader=HashGrader())
    assert tr2.cfg.linear_backend == "onednn" and tr2.precision_notes == \
        [x[2:] for x in text.splitlines() if x.startswith("# ")]   # the same header
    assert type(tr2.policy.get_output_embeddings()) is ol.OneDnnLinear
    # resumed with another library set: it replaces the header's line, not added beside it
    over = load_config(TrainConfig, str(tmp_path / "run" / "config.yaml"),
                       ["steps=2", "linear_backend=aten"])
    tr4 = Trainer(over, resume=True, grader=HashGrader())
    lines = [x for x in tr4.precision_notes if x.startswith("linear_backend:")]
    assert lines == ["linear_backend: aten (set explicitly)"]
    assert all(type(x) is not ol.OneDnnLinear for x in tr4.policy.modules())
    # a run from before the setting existed (no key in its config.yaml) ran on aten: kept
    import re
    path = tmp_path / "run" / "config.yaml"
    path.write_text(re.sub(r"(?m)^linear_backend: .*\n", "", path.read_text()))
    head = [x[2:] for x in path.read_text().splitlines() if x.startswith("# ")]
    old = load_config(TrainConfig, str(path), ["steps=2"])
    assert old.linear_backend == "auto"
    tr5 = Trainer(old, resume=True, grader=HashGrader())
    assert tr5.cfg.linear_backend == "aten" and tr5.precision_notes == head   # no line added
    assert all(type(x) is not ol.OneDnnLinear for x in tr5.policy.modules())
    # an explicit aten on a fresh run: nothing on oneDNN
    tr3 = Trainer(make_cfg(tiny_model_dir, tmp_path / "b", "linear_backend=aten"), grader=HashGrader())
    assert all(type(x) is not ol.OneDnnLinear for x in tr3.policy.modules())


def test_follow_falls_back_and_reduced_fp32_keeps_aten(tiny_model_dir, monkeypatch):
    """A choice made elsewhere (actor, rank, resume) falls back to aten where oneDNN cannot run;
    auto keeps aten when oneDNN's fp32 products would be tf32/bf16."""
    from agro.models import load_model

    m = load_model(str(tiny_model_dir))
    monkeypatch.setattr(ol, "available", lambda: False)
    assert ol.resolve(m, "onednn", "fp32", follow=True)[0] == "aten"
    monkeypatch.setattr(ol, "available", lambda: True)
    monkeypatch.setattr(ol, "time_shape", lambda *a, **k: pytest.fail("timed"))
    monkeypatch.setattr(ol, "full_fp32", lambda: False)
    backend, line = ol.resolve(m, "auto", "fp32")
    assert backend == "aten" and "would not be fp32" in line


def test_close_calls_are_timed_again(tiny_model_dir, monkeypatch, tmp_path):
    from agro.models import load_model

    monkeypatch.setenv("AGRO_CACHE_DIR", str(tmp_path / "cache"))
    m = load_model(str(tiny_model_dir))
    n_shapes = len(ol.linear_shapes(m))
    for aten, onednn, rounds in ((1.0, 0.95, 2), (1.0, 0.5, 1)):
        timed = []
        monkeypatch.setattr(ol, "time_shape", lambda n, k, rows=0, reps=0: timed.append(1)
                            or dict(aten=aten, onednn=onednn, aten_dw=aten, onednn_dw=onednn))
        ol.calibrate(m, use_cache=False)
        assert len(timed) == rounds * n_shapes


@needs_onednn
def test_lora_masters_and_export_on_onednn(tiny_model_dir, tmp_path):
    """LoRA wraps the swapped layers (its base frozen: no input kept for weight gradients);
    merge_and_unload and save_pretrained give a model transformers loads with plain Linear
    layers; the bf16 working copy keeps the class and computes as F.linear."""
    from transformers import AutoModelForCausalLM

    from agro.models import MasterWeights, apply_lora, load_model

    m = load_model(str(tiny_model_dir))
    ol.use("onednn", m)
    peft = apply_lora(m, r=2, alpha=4)
    x = torch.randint(0, m.config.vocab_size, (2, 5))
    peft(input_ids=x).logits.float().sum().backward()
    assert any(p.grad is not None for n, p in peft.named_parameters() if "lora" in n)
    merged = peft.merge_and_unload()
    merged.save_pretrained(str(tmp_path / "m"))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    assert all(type(x) is not ol.OneDnnLinear for x in back.modules())
    with torch.no_grad():
        assert _rel(back(input_ids=x).logits, merged(input_ids=x).logits) < 1e-4

    m2 = load_model(str(tiny_model_dir))
    ol.use("onednn", m2)
    work = MasterWeights(m2).work
    assert type(work.get_output_embeddings()) is ol.OneDnnLinear
    with torch.no_grad():
        h = torch.randn(3, m2.config.hidden_size, dtype=torch.bfloat16)
        head = work.get_output_embeddings()
        assert torch.equal(head(h), F.linear(h, head.weight))


def test_generate_and_eval_resolve_it(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from fakes import HashGrader

    from agro.config import EvalConfig, GenerateConfig, load_config
    from agro.workflows import generate_offline, run_eval

    monkeypatch.setenv("AGRO_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(GenerateConfig, None, [f"model={tiny_model_dir}", "precision=fp32",
                                             "linear_backend=aten", "num_prompts=2",
                                             "max_new_tokens=4", f"output={tmp_path / 'o.jsonl'}"])
    generate_offline(cfg, grader=HashGrader())
    assert "agro generate: linear_backend: aten (set explicitly)" in capsys.readouterr().out
    if ol.available():   # a separate reference model follows the policy's library
        cfg2 = load_config(GenerateConfig, None, [
            f"model={tiny_model_dir}", f"ref_model={tiny_model_dir}", "precision=fp32",
            "linear_backend=onednn", "num_prompts=2", "max_new_tokens=4",
            f"output={tmp_path / 'o2.jsonl'}"])
        generate_offline(cfg2, grader=HashGrader())
        out = capsys.readouterr().out
        assert "agro generate: reference model's linear_backend: onednn (set explicitly)" in out
    ecfg = load_config(EvalConfig, None, [f"model={tiny_model_dir}", "precision=fp32",
                                          "linear_backend=aten", "num_prompts=2", "max_new_tokens=4"])
    run_eval(ecfg)
    assert "agro eval: linear_backend: aten (set explicitly)" in capsys.readouterr().out


def test_cached_precision_choice_prefers_timings_on_the_installed_library(tiny_model_dir,
                                                                           monkeypatch, tmp_path):
    """generate/eval follow train's precision timed with the library now installed; with none
    for it, any library's."""
    from agro import perf
    from agro.models import load_model

    monkeypatch.setenv("AGRO_CACHE_DIR", str(tmp_path / "cache"))
    m = load_model(str(tiny_model_dir))
    key = perf.machine_key("cpu")
    ol.use("onednn", m)
    on = f"{perf.CACHE_PREFIX}{perf._model_key(m)} G=8"
    ol.use("aten", m)
    off = f"{perf.CACHE_PREFIX}{perf._model_key(m)} G=8"
    assert on != off and "linear=onednn" in on and "linear=aten" in off
    perf._store_cache(key, on, {"choice": "fp32"})
    perf._store_cache(key, off, {"choice": "bf16"})
    assert perf.cached_precision_choice(m) == "bf16"             # aten installed
    ol.use("onednn_fwd", m)                                      # none timed with it: either
    assert perf.cached_precision_choice(m) is None               # ... and they disagree
    ol.use("onednn", m)
    assert perf.cached_precision_choice(m) == "fp32"


@needs_onednn
@pytest.mark.parametrize("cls", [ol.OneDnnLinear, ol.OneDnnFwdLinear])
@pytest.mark.parametrize("need", ["both", "dx", "dw"])
def test_wide_layers_backward_in_slices_matches_fp64(monkeypatch, cls, need):
    """A layer with N >= BACKWARD_SLICE_MIN_N output features (an LM head) takes its oneDNN input and
    weight gradients over slices of BACKWARD_SLICE_COLUMNS features (here 80 = 3 x 24 + 8: a short last
    slice), from a non-contiguous output gradient: the same products as fp64 up to fp32
    rounding, one oneDNN call per slice and product."""
    monkeypatch.setattr(ol, "BACKWARD_SLICE_MIN_N", 64)
    monkeypatch.setattr(ol, "BACKWARD_SLICE_COLUMNS", 24)
    calls: list[tuple] = []
    real_lp = ol._lp
    monkeypatch.setattr(ol, "_lp", lambda a, b, c: calls.append((tuple(a.shape), tuple(b.shape)))
                        or real_lp(a, b, c))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(37, 48, dtype=torch.float64, generator=g)
    w = torch.randn(80, 48, dtype=torch.float64, generator=g) / 7
    dy = torch.randn(80, 37, dtype=torch.float64, generator=g).t()          # [37, 80] transposed
    xf = x.float().requires_grad_(need != "dw")
    lin = torch.nn.Linear(48, 80, bias=False)
    lin.__class__ = cls
    lin.weight = torch.nn.Parameter(w.float(), requires_grad=need != "dx")
    lin(xf).backward(dy.float())
    backward_calls = calls[1:]                                               # after the forward
    if need != "dw":
        assert _rel(xf.grad, dy @ w) < 1e-5
        assert [c for c in backward_calls if c[0][0] == 37] == \
            [((37, 24), (48, 24))] * 3 + [((37, 8), (48, 8))]                # dx slice by slice
    else:
        assert xf.grad is None
    if need != "dx":
        assert _rel(lin.weight.grad, dy.t() @ x) < 1e-5
        onednn_dw = [c for c in backward_calls if c[1] == (48, 37)]
        assert onednn_dw == ([((24, 37), (48, 37))] * 3 + [((8, 37), (48, 37))]
                             if cls is ol.OneDnnLinear else [])               # onednn_fwd: torch.mm
    else:
        assert lin.weight.grad is None
    # the two helpers against the unsliced oneDNN products (fp32 rounding apart)
    d32, x32, w32 = dy.float().contiguous(), x.float(), w.float()
    assert _rel(ol._dw(d32, x32), real_lp(d32.t(), x32.t(), None)) < 1e-6
    assert _rel(ol._dx(d32, w32), real_lp(d32, w32.t(), None)) < 1e-6


@needs_onednn
def test_calibration_times_the_products_the_layer_runs(monkeypatch):
    """time_shape's oneDNN arms are the layer's own backward (_dx, _dw: sliced for wide layers),
    not bare products."""
    used = []
    for name in ("_dx", "_dw"):
        real = getattr(ol, name)
        monkeypatch.setattr(ol, name, lambda *a, r=real, n=name: used.append(n) or r(*a))
    t = ol.time_shape(40, 16, rows=8, reps=1, seconds=0.0)
    assert set(t) == set(ol.PRODUCTS) and all(v > 0 for v in t.values())
    assert {"_dx", "_dw"} <= set(used)
