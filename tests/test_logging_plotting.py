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
from agro.plotting import PANELS, eval_points, make_figure, moving_average, plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")   # any control character except \t and \n


def _row(step: int, rng: np.random.Generator, binary: bool = False) -> dict:
    acc = min(1.0, 0.2 + 0.02 * step + 0.05 * rng.standard_normal())
    return {"reward_mean": acc if binary else acc + 0.1, "accuracy": acc, "kl_k1": 0.002 * step,
            "kl_k3": 0.002 * step, "completion_len_mean": 20.0 - 0.5 * step, "loss": -0.03,
            "step_seconds": 1.5, "tokens_per_second": 1900.0, "fresh_fraction": 1.0}


# held-out evaluations of _fake_run: step -> (sampled_accuracy, kl_pi_ref, sampled_len_mean)
BEFORE, AFTER = (0.05, 0.0, 20.0), (0.6, 0.2, 9.0)


def _during(step: int) -> tuple[float, float, float]:
    return 0.1 + 0.03 * step, 0.01 * step, 15.0


def _fake_run(run_dir: Path, steps: int = 12, seed: int = 0, evals=(6,), before_after: bool = True,
              binary: bool = False) -> Path:
    """A run directory as the trainer writes it: rows for steps 1..steps, eval_every columns at
    `evals`, and "before"/"after" eval events in events.jsonl (without a step, as today)."""
    rng = np.random.default_rng(seed)
    keys = ("sampled_accuracy", "kl_pi_ref", "sampled_len_mean")
    with MetricsLogger(run_dir, tensorboard=False) as ml:
        if before_after:
            ml.log_event("eval", when="before", **dict(zip(keys, BEFORE)))
        for s in range(1, steps + 1):
            m = _row(s, rng, binary)
            if s in evals:
                m.update({f"eval_{k}": v for k, v in zip(keys, _during(s))})
            ml.log(s, m)
        if before_after:
            ml.log_event("eval", when="after", **dict(zip(keys, AFTER)))
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
         "fresh_fraction": 1.0, "eval_sampled_accuracy": 0.4567}
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
    b = _fake_run(tmp_path / "b", steps=8, seed=1, evals=(), before_after=False)
    _assert_png(plot_runs([a], tmp_path / "one.png"))
    _assert_png(plot_runs([a, b], tmp_path / "out" / "two.png", labels=["A", "B"], smooth=3))
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_runs([a, tmp_path / "missing"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot_runs([a, b], tmp_path / "x.png", labels=["A"])


def test_eval_points_merge_events_and_eval_every_rows(tmp_path):
    a = _fake_run(tmp_path / "a", evals=(4, 8))
    pts = eval_points(a)
    assert [p["step"] for p in pts] == [0, 4, 8, 12]           # before at 0, after at the last step
    assert [p["when"] for p in pts] == ["before", "during", "during", "after"]
    expect = [BEFORE, _during(4), _during(8), AFTER]
    for p, e in zip(pts, expect):
        np.testing.assert_allclose([p["sampled_accuracy"], p["kl_pi_ref"], p["sampled_len_mean"]], e)
    # an event with an explicit step is placed there and wins over a metrics row at that step;
    # a partial last line (killed writer) is ignored
    with open(a / "events.jsonl", "a") as f:
        f.write(json.dumps({"kind": "eval", "when": "during", "step": 8, "sampled_accuracy": 0.9})
                + "\n" + '{"kind": "eval", "when": "aft')
    pts = eval_points(a)
    assert [p["step"] for p in pts] == [0, 4, 8, 12] and pts[2]["sampled_accuracy"] == 0.9
    assert eval_points(_fake_run(tmp_path / "b", evals=(), before_after=False)) == []


def _axes(fig) -> dict:
    return {ax.get_label(): ax for ax in fig.axes}


def _marker_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if ln.get_marker() == "o"]


def test_plot_panels_show_held_out_evals_reward_length_kl_loss(tmp_path):
    a = _fake_run(tmp_path / "a", evals=(6,), binary=True)
    fig = make_figure([a], smooth=3)
    axes = _axes(fig)
    assert list(axes) == [p.key for p in PANELS] == [
        "heldout_accuracy", "reward", "completion_len", "kl", "loss", "reward_vs_kl"]
    assert [ax.get_title() for ax in fig.axes] == [p.title for p in PANELS]
    # held-out accuracy: before (events), eval_every (metrics) and after (events), in step order
    (line,) = _marker_lines(axes["heldout_accuracy"])
    np.testing.assert_array_equal(line.get_xdata(), [0, 6, 12])
    np.testing.assert_allclose(line.get_ydata(), [BEFORE[0], _during(6)[0], AFTER[0]])
    assert "0.050 → 0.600" in line.get_label()
    # held-out length and KL as markers on the training curves' panels
    for key, j in (("completion_len", 2), ("kl", 1)):
        (mk,) = _marker_lines(axes[key])
        np.testing.assert_allclose(mk.get_ydata(), [BEFORE[j], _during(6)[j], AFTER[j]])
    # the per-step series: the smoothed line (label = run name) holds the moving average
    rows = sorted(read_metrics(a), key=lambda r: r["step"])
    for key, mkey in (("reward", "reward_mean"), ("completion_len", "completion_len_mean"),
                      ("kl", "kl_k1"), ("loss", "loss")):
        (smoothed,) = [ln for ln in axes[key].get_lines() if ln.get_label() == "a"]
        y = np.array([r[mkey] for r in rows])
        np.testing.assert_allclose(smoothed.get_ydata(), moving_average(y, 3))
    # binary rewards: accuracy == reward, so the reward panel draws one curve, not two
    assert len(axes["reward"].get_lines()) == 2                # raw (faint) + moving average


def test_plot_reward_panel_adds_train_accuracy_only_when_it_differs(tmp_path):
    a = _fake_run(tmp_path / "a", binary=False)                # reward_mean = accuracy + 0.1
    labels = [ln.get_label() for ln in _axes(make_figure([a], smooth=1))["reward"].get_lines()]
    assert labels == ["a", "a (train accuracy)"]


def test_plot_without_evals_says_so(tmp_path):
    a = _fake_run(tmp_path / "a", evals=(), before_after=False)
    ax = _axes(make_figure([a]))["heldout_accuracy"]
    assert not _marker_lines(ax)
    assert any("no held-out evaluations" in t.get_text() for t in ax.texts)


def _agro(*args, cwd):
    return subprocess.run([sys.executable, "-m", "agro.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_agro_plot_command_line(tmp_path):
    a = _fake_run(tmp_path / "run_a")
    b = _fake_run(tmp_path / "run_b", seed=3)
    r = _agro("plot", a, cwd=tmp_path)                          # one run: RUN_DIR/curves.png
    assert r.returncode == 0, r.stderr
    _assert_png(a / "curves.png")
    r = _agro("plot", a, b, "smooth=1", "labels=A,B", cwd=tmp_path)   # several: ./agro_runs.png
    assert r.returncode == 0, r.stderr
    _assert_png(tmp_path / "agro_runs.png")
    r = _agro("plot", a, "--out", tmp_path / "c.png", cwd=tmp_path)   # the older --out form
    assert r.returncode == 0, r.stderr
    _assert_png(tmp_path / "c.png")


def test_agro_plot_yaml_and_errors(tmp_path, capsys):
    from agro.cli import main
    from agro.config import PlotConfig, format_help

    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", seed=2)
    (tmp_path / "p.yaml").write_text(f"runs: [{a}, {b}]\nout: {tmp_path / 'y.png'}\nsmooth: 2\n")
    assert main(["plot", str(tmp_path / "p.yaml")]) == 0
    _assert_png(tmp_path / "y.png")
    capsys.readouterr()
    for argv, needle in (([str(a), "smoth=2"], "unknown key 'smoth'. Did you mean smooth?"),
                         ([str(a), "smooth=0"], "field 'smooth' must be >= 1"),
                         ([str(a), "smooth=x"], "field 'smooth' expects an integer"),
                         ([str(a), "labels=A,B"], "field 'labels' has 2 labels for 1 runs"),
                         ([str(tmp_path / "empty")], "field 'runs' names"),
                         ([], "field 'runs' needs at least one run directory"),
                         ([str(a), "--smooth", "2"], "unexpected arguments ['--smooth']")):
        assert main(["plot", *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    (tmp_path / "bad.yaml").write_text(f"runs: [{a}]\nsmooth: 1\nlabel: x\n")
    assert main(["plot", str(tmp_path / "bad.yaml")]) == 2
    assert f"{tmp_path / 'bad.yaml'}:3: unknown key 'label'" in capsys.readouterr().err
    assert main(["plot", "--help"]) == 0
    out = capsys.readouterr().out
    assert format_help(PlotConfig) in out
    for name in ("runs", "out", "labels", "smooth"):
        assert f"\n  {name} (" in out


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
