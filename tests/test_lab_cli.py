"""`agro lab` as a subprocess: Figure 1 and the §4.6 pitfall with small step counts."""
import csv
import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "agro.cli", "lab", *args],
                          capture_output=True, text=True, timeout=300)


def test_figure1_smoke(tmp_path):
    r = run("figure1", "--out", str(tmp_path), "--steps", "3000", "--instances", "3")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "figure1.csv")))
    assert set(rows[0]) == {"method", "instance", "step", "normalized_kl"}
    assert {r["method"] for r in rows} == {"agro", "kl_pg"}
    png = (tmp_path / "figure1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    last = {}
    for row in rows:
        if int(row["step"]) == 3000:
            last.setdefault(row["method"], []).append(float(row["normalized_kl"]))
    # already after 3,000 updates AGRO is far below KL-PG, whose plateau is ~1e-2 .. 0.5
    assert max(last["agro"]) < min(last["kl_pg"]) / 10
    assert min(last["kl_pg"]) > 1e-3


def test_pitfall_smoke(tmp_path):
    r = run("pitfall", "--out", str(tmp_path), "--steps", "400", "--instances", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "pitfall.png").exists()
    rows = list(csv.DictReader(open(tmp_path / "pitfall.csv")))
    assert {"lr_coef", "beta", "p_success"} <= set(rows[0])


def test_lab_bad_args_exit_nonzero(tmp_path):
    r = run("figure1")
    assert r.returncode != 0 and "--out" in r.stderr
