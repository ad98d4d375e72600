"""Checkpoints: bit-identical resume, trainable-only weights, weights_only loading, crash safety.

The last test SIGKILLs real processes in the middle of saving and checks that
``latest_checkpoint`` always returns a complete, loadable checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import agro.checkpoint as ckpt
from agro.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


# --------------------------------------------------------------------------- a tiny training run
def _build(seed: int):
    """A 2-layer MLP with dropout, AdamW and a warm-up LambdaLR, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return model, opt, sched


def _train_step(model, opt, sched) -> None:
    """One step whose data depends on all three global RNGs (torch, numpy, python)."""
    x = torch.randn(8, 4)                                              # torch RNG  [8, 4]
    y = torch.from_numpy(np.random.standard_normal((8, 1))).float()    # numpy RNG  [8, 1]
    scale = random.choice([0.5, 1.0, 2.0])                             # python RNG
    loss = (model(x) - y).square().mean() * scale                      # dropout: torch RNG
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _assert_same_training_state(a, b) -> None:
    (ma, oa, sa), (mb, ob, sb) = a, b
    for (na, pa), (nb, pb) in zip(ma.named_parameters(), mb.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        st_a, st_b = oa.state[pa], ob.state[pb]
        assert st_a.keys() == st_b.keys() and st_a
        for k in st_a:
            assert torch.equal(st_a[k], st_b[k]), k
    assert oa.param_groups[0]["lr"] == ob.param_groups[0]["lr"]
    assert sa.state_dict() == sb.state_dict()


def _run_resumed(tmp_path: Path, skip_rng: str | None = None):
    """Train 3 steps, save, rebuild fresh (other seed), load, train 3 more."""
    _seed_all(0)
    run = _build(0)
    for _ in range(3):
        _train_step(*run)
    replay = [{"prompt": "1+1=", "rewards": np.array([1.0, 0.0]), "ids": (1, 2, 3),
               "ref_logprobs": torch.tensor([-0.5, -1.25])}]
    state = {"step": 3, "rng": rng_state(), "replay": replay}
    path = save_checkpoint(tmp_path, 3, *run, state, {"lr": 1e-2})
    for _ in range(3):     # the "crashed" process goes on a bit; none of this may leak into resume
        _train_step(*run)
    _seed_all(999)
    fresh = _build(123)
    assert not torch.equal(fresh[0][0].weight, run[0][0].weight)
    loaded = load_checkpoint(latest_checkpoint(tmp_path), *fresh)
    assert latest_checkpoint(tmp_path) == path
    rng = loaded["rng"]
    if skip_rng is not None:
        rng = dict(rng)
        rng[skip_rng] = rng_state()[skip_rng]   # leave this one RNG as it is now
    set_rng_state(rng)
    for _ in range(3):
        _train_step(*fresh)
    return fresh, loaded


def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path):
    _seed_all(0)
    straight = _build(0)
    for _ in range(6):
        _train_step(*straight)
    resumed, loaded = _run_resumed(tmp_path)
    _assert_same_training_state(straight, resumed)
    assert loaded["step"] == 3 and loaded["config"] == {"lr": 1e-2}
    # numpy arrays and tuples were stored as plain lists; tensors stay tensors
    assert loaded["replay"][0]["rewards"] == [1.0, 0.0]
    assert loaded["replay"][0]["ids"] == [1, 2, 3]
    assert torch.equal(loaded["replay"][0]["ref_logprobs"], torch.tensor([-0.5, -1.25]))


@pytest.mark.parametrize("skip", ["python", "numpy", "torch"])
def test_resume_without_one_rng_diverges(tmp_path, skip):
    """Control for the test above: every one of the three RNG states matters to the result."""
    _seed_all(0)
    straight = _build(0)
    for _ in range(6):
        _train_step(*straight)
    resumed, _ = _run_resumed(tmp_path, skip_rng=skip)
    assert not torch.equal(straight[0][0].weight, resumed[0][0].weight)


def test_rng_state_roundtrip_and_weights_only_safe(tmp_path):
    _seed_all(5)
    random.gauss(0, 1)
    np.random.standard_normal()          # leaves a cached gaussian in numpy's state
    s = rng_state()
    torch.save(s, tmp_path / "rng.pt")
    expect = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    _seed_all(77)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3))
    assert expect[:3] == got[:3] and torch.equal(expect[3], got[3])


# --------------------------------------------------------------------------- weights file
class _LoRAish(torch.nn.Module):
    """A frozen base linear plus trainable low-rank adapters (names like peft's)."""

    def __init__(self, extra: bool = False, rank: int = 2):
        super().__init__()
        self.base = torch.nn.Linear(6, 6)
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(torch.randn(rank, 6))
        self.lora_B = torch.nn.Parameter(torch.randn(6, rank))
        if extra:
            self.extra = torch.nn.Parameter(torch.zeros(3))


def test_only_trainable_parameters_are_saved(tmp_path):
    torch.manual_seed(0)
    m = _LoRAish()
    path = save_checkpoint(tmp_path, 1, m, None, None, {"step": 1}, {})
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["lora_A", "lora_B"]
        assert json.loads(f.metadata()["agro_trainable"]) == ["lora_A", "lora_B"]
    manifest = json.loads((path / "COMPLETE.json").read_text())
    assert manifest["trainable_parameters"]["lora_A"] == {"shape": [2, 6], "dtype": "float32"}
    assert set(manifest["files"]) == {"model.safetensors", "state.pt", "config.json"}

    torch.manual_seed(1)
    m2 = _LoRAish()
    base_before = m2.base.weight.clone()
    load_checkpoint(path, m2)
    assert torch.equal(m2.lora_A, m.lora_A) and torch.equal(m2.lora_B, m.lora_B)
    assert torch.equal(m2.base.weight, base_before)        # frozen weights untouched


def test_trainable_set_mismatch_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, _LoRAish(), None, None, {"step": 1}, {})
    with pytest.raises(CheckpointError, match=r"Missing from the checkpoint: extra"):
        load_checkpoint(path, _LoRAish(extra=True))
    unfrozen = _LoRAish()
    unfrozen.base.requires_grad_(True)
    with pytest.raises(CheckpointError, match=r"Missing from the checkpoint: base.bias, base.weight"):
        load_checkpoint(path, unfrozen)
    frozen_adapter = _LoRAish()
    frozen_adapter.lora_B.requires_grad_(False)
    with pytest.raises(CheckpointError, match=r"not trainable in the model: lora_B"):
        load_checkpoint(path, frozen_adapter)
    with pytest.raises(CheckpointError, match=r"shape mismatch: lora_A: saved \(2, 6\), model \(3, 6\)"):
        load_checkpoint(path, _LoRAish(rank=3))
    with pytest.raises(CheckpointError, match="no optimizer.pt"):
        load_checkpoint(path, _LoRAish(), torch.optim.SGD(_LoRAish().parameters(), lr=0.1))


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_tied_weights_save_and_load(tmp_path):
    torch.manual_seed(0)
    m = _Tied()
    path = save_checkpoint(tmp_path, 1, m, None, None, {"step": 1}, {})
    torch.manual_seed(1)
    m2 = _Tied()
    load_checkpoint(path, m2)
    assert torch.equal(m2.emb.weight, m.emb.weight)
    assert m2.head.weight is m2.emb.weight                  # still tied after loading


# --------------------------------------------------------------------------- state contents
@dataclass
class _Rec:
    prompt_id: str
    rewards: tuple


class _Opaque:
    pass


def test_state_is_converted_to_plain_types(tmp_path):
    big = torch.arange(1000.0)
    state = {"step": 2, "path": Path("/a/b"), "np_scalar": np.float32(0.5), "flag": np.bool_(True),
             "arr": np.arange(3, dtype=np.int64), "tup": (1, (2, 3)), "set": {3, 1},
             "rec": _Rec("p0", (1.0, 0.0)), "view": big[10:12], "none": None, 7: b"raw"}
    path = save_checkpoint(tmp_path, 2, _LoRAish(), None, None, state, {"name": "x"})
    got = load_checkpoint(path, _LoRAish())
    assert got["path"] == "/a/b" and got["np_scalar"] == 0.5 and type(got["np_scalar"]) is float
    assert got["flag"] is True and got["arr"] == [0, 1, 2] and got["tup"] == [1, [2, 3]]
    assert got["set"] == [1, 3] and got["rec"] == {"prompt_id": "p0", "rewards": [1.0, 0.0]}
    assert torch.equal(got["view"], torch.tensor([10.0, 11.0])) and got[7] == b"raw"
    # the slice was copied: the file does not hold the 1000-element storage
    assert (path / "state.pt").stat().st_size < 1000 * 4


def test_unstorable_state_value_is_named(tmp_path):
    with pytest.raises(TypeError, match=r"state\['buffer'\]\[1\]\.prompt_id: cannot store"):
        save_checkpoint(tmp_path, 1, _LoRAish(), None, None,
                        {"buffer": [None, _Rec(_Opaque(), ())]}, {})
    assert latest_checkpoint(tmp_path) is None
    assert list((tmp_path / "checkpoints").iterdir()) == []


class _Payload:
    """Unpickling this runs code: it creates the directory named by ``target``."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_load_never_unpickles_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setattr(ckpt, "to_plain", lambda obj, where="state": obj)   # let it through
    path = save_checkpoint(tmp_path / "run", 1, _LoRAish(), None, None,
                           {"step": 1, "evil": _Payload(str(marker))}, {})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run", verify=True) == path    # a well-formed checkpoint
    with pytest.raises(CheckpointError, match=r"weights_only=True.*never unpickles code"):
        load_checkpoint(path, _LoRAish())
    assert not marker.exists()
    torch.load(path / "state.pt", weights_only=False)   # control: the payload is live
    assert marker.is_dir()


# --------------------------------------------------------------------------- crash safety
def _save(tmp_path, step, model=None, keep=2):
    model = model if model is not None else _LoRAish()
    return save_checkpoint(tmp_path, step, model, None, None, {"step": step}, {"s": step}, keep=keep)


def _names(tmp_path):
    return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())


def test_exception_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    real = ckpt._write_torch

    def crash_on_state(path, obj):
        if path.name == "state.pt":
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(ckpt, "_write_torch", crash_on_state)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 3)
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert _names(tmp_path) == ["step-00000001", "step-00000002"]


def test_leftover_temp_dir_and_incomplete_final_are_skipped(tmp_path, caplog):
    _save(tmp_path, 1)
    good = _save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000003-4242").mkdir()                      # a write killed early
    (root / ".tmp-step-00000003-4242" / "model.safetensors").write_bytes(b"\0" * 10)
    incomplete = root / "step-00000003"                             # no COMPLETE.json
    shutil.copytree(good, incomplete)
    (incomplete / "COMPLETE.json").unlink()
    with caplog.at_level(logging.WARNING, logger="agro.checkpoint"):
        assert latest_checkpoint(tmp_path) == good
    assert "step-00000003" in caplog.text and "COMPLETE.json" in caplog.text

    # the resumed run saves step 3 again: replaces the broken one, cleans the leftovers
    m = _LoRAish()
    _save(tmp_path, 3, m)
    assert _names(tmp_path) == ["step-00000002", "step-00000003"]
    m2 = _LoRAish()
    assert load_checkpoint(latest_checkpoint(tmp_path, verify=True), m2)["step"] == 3
    assert torch.equal(m2.lora_A, m.lora_A)


def test_truncated_file_is_skipped(tmp_path, caplog):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    f = newest / "state.pt"
    f.write_bytes(f.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="agro.checkpoint"):
        assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert "step-00000002" in caplog.text and "state.pt has" in caplog.text


def test_corrupted_bytes_caught_by_sha256(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    f = newest / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF                                  # same size, different content
    f.write_bytes(bytes(data))
    assert latest_checkpoint(tmp_path) == newest     # sizes only: not detected
    assert latest_checkpoint(tmp_path, verify=True).name == "step-00000001"
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(newest, _LoRAish())


def test_prune_keeps_newest_and_drops_abandoned_future(tmp_path, caplog):
    for s in range(1, 5):
        _save(tmp_path, s, keep=2)
    assert _names(tmp_path) == ["step-00000003", "step-00000004"]
    (tmp_path / "checkpoints" / ".del-step-00000001-1-1").mkdir()   # a delete killed midway
    # resumed from step 3 and saving step 3 again: step 4 belongs to the abandoned run
    with caplog.at_level(logging.WARNING, logger="agro.checkpoint"):
        _save(tmp_path, 3, keep=2)
    assert _names(tmp_path) == ["step-00000003"]
    assert "step-00000004" in caplog.text and "abandoned" in caplog.text
    _save(tmp_path, 5, keep=1)
    assert _names(tmp_path) == ["step-00000005"]


# --------------------------------------------------------------------------- real SIGKILLs
_KILL_SCRIPT = textwrap.dedent("""
    # Imports torch once, then forks one child per "go" line; each child resumes from the latest
    # checkpoint and saves ~13 MB checkpoints in a loop until the test SIGKILLs it.
    import os, sys, traceback
    from pathlib import Path
    import torch
    from agro.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    OUT = Path(sys.argv[1])

    def build():
        model = torch.nn.Linear(1024, 1024)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        model(torch.ones(1, 1024)).sum().backward()
        opt.step()                                  # creates exp_avg / exp_avg_sq
        sched.step()
        return model, opt, sched

    def child():
        model, opt, sched = build()
        step = 0
        ck = latest_checkpoint(OUT)
        if ck is not None:
            step = load_checkpoint(ck, model, opt, sched, verify=False)["step"]
        while True:
            step += 1
            with torch.no_grad():                   # every saved value encodes the step
                for p in model.parameters():
                    p.fill_(step)
                    opt.state[p]["exp_avg"].fill_(step)
                    opt.state[p]["exp_avg_sq"].fill_(step)
            state = {"step": step, "payload": torch.full((1 << 18,), float(step))}
            save_checkpoint(OUT, step, model, opt, sched, state, {"test": "sigkill"}, keep=2)
            print(f"saved {step}", flush=True)

    torch.set_num_threads(1)   # before any op, so no thread pool exists when we fork
    build()                    # warm up: the first optimizer step imports torch._dynamo (~2 s)
    print("ready", flush=True)
    while sys.stdin.readline().strip() == "go":
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            try:
                child()
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        print(f"child {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {os.waitstatus_to_exitcode(status)}", flush=True)
""")


def _check_loadable(path: Path) -> int:
    """Load a checkpoint written by _KILL_SCRIPT; every value must equal its step."""
    model = torch.nn.Linear(1024, 1024)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = load_checkpoint(path, model, opt, sched, verify=True)
    step = state["step"]
    assert path.name == f"step-{step:08d}"
    assert torch.all(state["payload"] == step)
    for p in model.parameters():
        assert torch.all(p == step)
        assert torch.all(opt.state[p]["exp_avg"] == step)
        assert torch.all(opt.state[p]["exp_avg_sq"] == step)
    assert state["config"] == {"test": "sigkill"} and sched.last_epoch == 1
    return step


@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(_KILL_SCRIPT)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True).start()

    def next_line(timeout: float = 60.0) -> str:
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"saver stalled; stderr:\n{proc.stderr.read()}")

    max_saved = 0
    rng = random.Random(20240601)
    delays = [rng.uniform(0.0, 0.03)] + [rng.uniform(0.05, 0.8) for _ in range(4)]
    try:
        assert next_line() == "ready"
        for delay in delays:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            while not (line := next_line()).startswith("child "):
                max_saved = max(max_saved, int(line.split()[1]))
            pid = int(line.split()[1])
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            while not (line := next_line()).startswith("reaped "):
                assert line.startswith("saved "), line
                max_saved = max(max_saved, int(line.split()[1]))
            assert line == f"reaped {-signal.SIGKILL}", f"child died on its own: {proc.stderr.read()}"
            latest = latest_checkpoint(out, verify=True)
            if max_saved == 0:      # nothing reported finished: none, or one finished unreported
                assert latest is None or _check_loadable(latest) == 1
            else:
                assert latest is not None, f"killed after {delay:.3f} s: no checkpoint"
                step = _check_loadable(latest)
                assert max_saved <= step <= max_saved + 1
        assert max_saved >= 2, "the kills all came too early to test anything"
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
