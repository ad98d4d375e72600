"""metrics.jsonl, events, TensorBoard, the progress line/bar, and the curve plots."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from agro.logging_utils import (
    MetricsLogger,
    TrainProgress,
    format_step_line,
    read_metrics,
)
from agro.plotting import moving_average, plot_main, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")   # any control character except \t and \n


def _row(step: int, rng: np.random.Generator) -> dict:
    acc = min(1.0, 0.2 + 0.02 * step + 0.05 * rng.standard_normal())
    return {"reward_mean": acc + 0.1, "accuracy": acc, "kl_k1": 0.002 * step, "kl_k3": 0.002 * step,
            "loss": -0.03, "step_seconds": 1.5, "tokens_per_second": 1900.0, "fresh_fraction": 1.0}


def _fake_run(run_dir: Path, steps: int = 12, seed: int = 0, evals=(0, 6, 12)) -> Path:
    rng = np.random.default_rng(seed)
    with MetricsLogger(run_dir, tensorboard=False) as ml:
        for s in range(steps + 1):
            m = _row(s, rng) if s else {}
            if s in evals:
                m["eval_accuracy"] = 0.1 + 0.03 * s
            if m:
                ml.log(s, m)
    return run_dir


# --------------------------------------------------------------------------- metrics.jsonl
def test_metrics_lines_are_sorted_json_with_nan_as_null(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as ml:
        ml.log(1, {"loss": float("nan"), "accuracy": np.float32(0.5), "kl_k1": torch.tensor(0.25),
                   "reward_mean": 1, "grad_norm": float("inf"), "source": "fresh", "none": None})
        ml.log(2, {"loss": -0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])          # strict JSON: NaN/Infinity would not be valid
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    assert list(first) == sorted(first)
    assert first["loss"] is None and first["grad_norm"] is None and first["none"] is None
    assert first["accuracy"] == 0.5 and first["kl_k1"] == 0.25 and first["step"] == 1
    assert first["reward_mean"] == 1.0 and isinstance(first["reward_mean"], float)
    assert first["source"] == "fresh"
    with MetricsLogger(tmp_path, tensorboard=False) as ml, \
            pytest.raises(TypeError, match="metric 'bad'"):
        ml.log(3, {"bad": [1, 2]})


def test_resume_truncates_to_checkpoint_step(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as ml:
        for s in range(1, 8):
            ml.log(s, {"loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"loss": 8.0, "st')                     # killed mid-line
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=4) as ml:
        ml.log(5, {"loss": 50.0})
        ml.log_event("skip", step=5, reason="non-finite loss", value=float("nan"))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["loss"] == 50.0
    assert rows.skipped_lines == 0
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events] == ["resume", "skip"]
    assert events[0]["step"] == 4 and events[1]["value"] is None


def test_appending_after_a_kill_drops_the_partial_line(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as ml:
        ml.log(1, {"loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"loss": 2.0, "st')
    with MetricsLogger(tmp_path, tensorboard=False) as ml:
        ml.log(2, {"loss": 2.5})
    rows = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.5)]
    assert rows.skipped_lines == 0


def test_read_metrics_skips_and_counts_partial_trailing_line(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as ml:
        for s in range(1, 4):
            ml.log(s, {"accuracy": 0.1 * s})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"accuracy": 0.4, "ste')
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows.skipped_lines == 1
    assert read_metrics(tmp_path / "metrics.jsonl") == rows
    with pytest.raises(FileNotFoundError, match="no such metrics file"):
        read_metrics(tmp_path / "nope")


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, tensorboard=True) as ml:
        for s in (1, 2, 3):
            ml.log(s, {"reward_mean": 0.5 * s, "loss": float("nan")})
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Scalars("reward_mean")
    assert [(e.step, e.value) for e in scalars] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert "loss" not in acc.Tags()["scalars"]           # all-NaN metric: nothing written


def test_tensorboard_off_writes_no_events(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as ml:
        ml.log(1, {"loss": 1.0})
    assert not (tmp_path / "tb").exists()


def test_wandb_missing_warns_and_continues(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)       # makes `import wandb` fail
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True) as ml:
        ml.log(1, {"loss": 1.0})
    assert "not installed" in caplog.text and "wandb" in caplog.text
    assert len(read_metrics(tmp_path)) == 1


# --------------------------------------------------------------------------- progress
def test_format_step_line():
    m = {"reward_mean": 0.4149, "accuracy": 0.375, "kl_k1": 0.01234, "kl_k3": 0.5,
         "loss": -0.0314, "step_seconds": 14.24, "tokens_per_second": 1930.0,
         "fresh_fraction": 1.0, "eval_accuracy": 0.4567}
    assert format_step_line(12, 40, m) == (
        "step 12/40 | reward 0.41 acc 0.38 | kl 0.012 | loss -0.031 | 14.2 s (1.9k tok/s) | "
        "fresh 1.00 | eval acc 0.457")
    assert format_step_line(3, 100, {"loss": float("nan"), "kl_k3": 2e-5, "tokens_per_second":
                                     2.5e6}) == "step   3/100 | kl 2.00e-05 | loss nan | 2.5M tok/s"
    assert format_step_line(1, 1, {}) == "step 1/1"


def test_plain_progress_has_no_control_characters(capsys):
    with TrainProgress(3, enabled=True) as p:          # pytest's stdout is not a terminal
        assert not p.rich
        for s in (1, 2, 3):
            p.update(s, {"reward_mean": 0.5, "loss": 0.1})
    out = capsys.readouterr().out
    assert out.splitlines() == [f"step {s}/3 | reward 0.50 | loss 0.100" for s in (1, 2, 3)]
    assert not ANSI.search(out)


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_rich_progress_on_a_terminal_prints_each_line(monkeypatch):
    monkeypatch.delenv("TERM", raising=False)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    buf = _FakeTTY()
    with TrainProgress(4, start_step=1, file=buf) as p:
        assert p.rich
        p.update(2, {"accuracy": 0.5})
        p.update(3, {"accuracy": 0.75})
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "step 2/4 | acc 0.50" in text and "step 3/4 | acc 0.75" in text
    assert "3/4 elapsed" in text and "━" in text          # the bar itself, at 3 of 4
    buf2 = _FakeTTY()
    with TrainProgress(4, enabled=False, file=buf2) as p:
        p.update(1, {"accuracy": 0.5})
    assert buf2.getvalue() == "step 1/4 | acc 0.50\n"


# --------------------------------------------------------------------------- plots
def test_moving_average():
    y = np.array([0.0, 3.0, np.nan, 6.0, 9.0])
    np.testing.assert_allclose(moving_average(y, 3), [1.5, 1.5, 4.5, 7.5, 7.5])
    np.testing.assert_array_equal(moving_average(y, 1), y)


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_plot_one_and_two_runs(tmp_path):
    a = _fake_run(tmp_path / "a", seed=0)
    b = _fake_run(tmp_path / "b", steps=8, seed=1, evals=())
    _assert_png(plot_runs([a], tmp_path / "one.png"))
    _assert_png(plot_runs([a, b], tmp_path / "out" / "two.png", labels=["A", "B"], smooth=3))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_runs([a, tmp_path / "missing"], tmp_path / "x.png")


def test_plot_main_subprocess(tmp_path):
    a = _fake_run(tmp_path / "run_a")
    b = _fake_run(tmp_path / "run_b", seed=3)
    code = "import sys; from agro.plotting import plot_main; sys.exit(plot_main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, str(a)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    _assert_png(a / "curves.png")
    r = subprocess.run([sys.executable, "-c", code, str(a), str(b), "--smooth", "1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    _assert_png(tmp_path / "agro_runs.png")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "empty")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "no metrics.jsonl" in r.stderr


def test_plot_main_in_process_options(tmp_path, capsys):
    a = _fake_run(tmp_path / "r")
    assert plot_main([str(a), "--out", str(tmp_path / "c.png"), "--smooth", "4",
                      "--label", "mine"]) == 0
    _assert_png(tmp_path / "c.png")
    with pytest.raises(SystemExit):
        plot_main([str(a), "--smooth", "0"])


def test_wandb_receives_config_scalars_and_keeps_its_run_id_on_resume(tmp_path, monkeypatch):
    """Against a stand-in ``wandb`` module (the real one is not installed here): the run is
    created once with the config, every numeric metric is logged at its step, the run is
    finished on close, and a resumed run reuses the stored run id with resume='allow'."""
    import types

    calls: list[tuple] = []

    class Run:
        def log(self, scalars, step):
            calls.append(("log", dict(scalars), step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.util = types.SimpleNamespace(generate_id=lambda: "run123")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)

    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, wandb_project="p",
                       config={"beta": 0.02, "path": tmp_path}) as ml:
        ml.log(1, {"loss": 0.5, "accuracy": 1, "note": "text"})
    init = calls[0][1]
    assert init["project"] == "p" and init["id"] == "run123" and init["resume"] == "allow"
    assert init["config"]["beta"] == 0.02 and isinstance(init["config"]["path"], str)
    assert calls[1] == ("log", {"loss": 0.5, "accuracy": 1.0}, 1)
    assert calls[-1] == ("finish",)
    fake.util.generate_id = lambda: "other"
    calls.clear()
    with MetricsLogger(tmp_path, tensorboard=False, wandb=True, resume_step=1) as ml:
        ml.log(2, {"loss": 0.25})
    assert calls[0][1]["id"] == "run123"          # the same W&B run continues
    assert ("log", {"loss": 0.25}, 2) in calls
