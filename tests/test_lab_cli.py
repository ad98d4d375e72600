"""`agro lab`: the typed LabConfig (YAML / key=value, --help, errors with exit code 2), its defaults
against the experiment functions' signatures, and subprocess smoke runs of Figure 1 (§9) and the
§4.6 pitfall with small step counts."""
import csv
import dataclasses
import inspect
import subprocess
import sys

import pytest

from agro.cli import main
from agro.config import ConfigError, LabConfig, format_help, load_config
from agro.lab import experiments
from agro.lab.cli import experiment_kwargs

EXPERIMENTS = {"figure1": experiments.figure1, "pitfall": experiments.pitfall}


def run(*args):
    return subprocess.run([sys.executable, "-m", "agro.cli", "lab", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_lab_config_defaults_equal_the_experiment_defaults(name):
    """Every parameter of figure1()/pitfall() (but out_dir, verbose) is a field, with the same
    default once 0 -> the experiment's own default in steps/instances/log_every."""
    sig = inspect.signature(EXPERIMENTS[name]).parameters
    expected = {k: p.default for k, p in sig.items() if k not in ("out_dir", "verbose")}
    got = experiment_kwargs(LabConfig(experiment=name, out="x"))
    assert got == expected
    for k, v in LabConfig.DEFAULTS[name].items():      # 0 = this default, as the help says
        assert LabConfig.__dataclass_fields__[k].default == 0
        assert f"{name} {v}" in LabConfig.__dataclass_fields__[k].metadata["help"], k


def test_key_value_overrides_reach_the_experiment():
    cfg = load_config(LabConfig, None, ["experiment=pitfall", "out=d", "steps=7", "betas=0.2,0.4",
                                        "lr_coefs=[0.5]", "lr_baseline=loo_var", "K=6"])
    kw = experiment_kwargs(cfg)
    assert (kw["steps"], kw["betas"], kw["lr_coefs"], kw["lr_baseline"], kw["K"]) == \
        (7, (0.2, 0.4), (0.5,), "loo_var", 6)
    assert kw["instances"] == 5 and kw["log_every"] == 25           # pitfall's own defaults
    with pytest.raises(ConfigError, match=r"field 'betas\[1\]' expects a number"):
        load_config(LabConfig, None, ["experiment=pitfall", "out=d", "betas=0.2,abc"])


def test_lab_yaml_file_with_lists(tmp_path):
    y = tmp_path / "lab.yaml"
    y.write_text("experiment: figure1\nout: somewhere\nmethods: [agro]\nsteps: 50\n")
    kw = experiment_kwargs(load_config(LabConfig, str(y)))
    assert kw["methods"] == ("agro",) and kw["steps"] == 50 and kw["instances"] == 10


def test_lab_errors_exit_2_naming_the_key(tmp_path, capsys):
    for argv, needle in (
            (["figure1", f"out={tmp_path}", "stepz=3"], "unknown key 'stepz'. Did you mean steps?"),
            (["figure1", f"out={tmp_path}", "steps=abc"], "field 'steps' expects an integer"),
            (["figure1"], "field 'out' is required"),
            (["nonsense", f"out={tmp_path}"], "field 'experiment' must be one of figure1, pitfall"),
            ([f"out={tmp_path}"], "name the experiment"),
            (["figure1", f"out={tmp_path}", "betas=0.2"], "'betas' does not apply to experiment figure1"),
            (["pitfall", f"out={tmp_path}", "methods=agro"], "'methods' does not apply to experiment pitfall"),
            (["figure1", f"out={tmp_path}", "methods=agro,nope"], "unknown loss 'nope'"),
            (["figure1", f"out={tmp_path}", "n=1"], "field 'n' must be >= 2"),
            (["pitfall", f"out={tmp_path}", "p_ref=1.5"], "field 'p_ref' must be in (0, 1)"),
            (["pitfall", f"out={tmp_path}", "lr_baseline=loo"], "field 'lr_baseline' must be one of"),
            (["figure1", "--out", str(tmp_path), "--steps", "3"], "unexpected arguments ['--steps', '3']")):
        assert main(["lab", *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    y = tmp_path / "bad.yaml"
    y.write_text(f"experiment: pitfall\nout: {tmp_path}\nbetas: [0.1, -1]\n")
    assert main(["lab", str(y)]) == 2
    assert f"{y}:3: field 'betas' must be one or more numbers > 0" in capsys.readouterr().err
    assert not (tmp_path / "figure1.csv").exists() and not (tmp_path / "pitfall.csv").exists()


def test_lab_help_lists_every_field(capsys):
    assert main(["lab", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: agro lab figure1|pitfall") and format_help(LabConfig) in out
    for name in (f.name for f in dataclasses.fields(LabConfig)):
        assert f"\n  {name} (" in out, name


def test_figure1_smoke(tmp_path):
    r = run("figure1", f"out={tmp_path}", "steps=3000", "instances=3", "log_every=1000")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "figure1.csv")))
    assert set(rows[0]) == {"method", "instance", "step", "normalized_kl"}
    assert {r["method"] for r in rows} == {"agro", "kl_pg"}
    assert {int(r["step"]) for r in rows} == {0, 1000, 2000, 3000}     # log_every reached it
    assert len({r["instance"] for r in rows}) == 3
    png = (tmp_path / "figure1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    last = {}
    for row in rows:
        if int(row["step"]) == 3000:
            last.setdefault(row["method"], []).append(float(row["normalized_kl"]))
    # already after 3,000 updates AGRO is far below KL-PG, whose plateau is ~1e-2 .. 0.5
    assert max(last["agro"]) < min(last["kl_pg"]) / 10
    assert min(last["kl_pg"]) > 1e-3


def test_pitfall_smoke_with_the_older_out_flag(tmp_path):
    r = run("pitfall", "--out", tmp_path, "steps=400", "instances=2", "betas=0.1",
            "lr_coefs=1,0", "plot=false")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "pitfall.png").exists()                  # plot=false
    rows = list(csv.DictReader(open(tmp_path / "pitfall.csv")))
    assert {"lr_coef", "beta", "p_success"} <= set(rows[0])
    assert {(r["beta"], r["lr_coef"]) for r in rows} == {("0.1", "1.0"), ("0.1", "0.0")}
    final = {}
    for r in rows:
        if r["step"] == "400":
            final.setdefault(r["lr_coef"], []).append(float(r["p_success"]))
    assert max(final["1.0"]) < 0.05 and min(final["0.0"]) > 0.9    # §4.6: Eq. 6 collapses
