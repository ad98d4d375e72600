"""kill -9 at several points of `agro train`, then `--resume`: final weights bit-identical.

Runs the real CLI in subprocesses on a tiny model. Groups are mixed per step from fresh
generation (graded by the real sandboxed grader) and an offline file that carries reward signal,
so every step changes the weights. AGRO_FAULT (agro/faults.py) SIGKILLs the process at an exact
point: after generation, after a backward pass, and in the middle of writing a checkpoint.
"""
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from fakes import make_offline_file


def run(args, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    env.pop("AGRO_FAULT", None) if not env_extra else None
    return subprocess.run([sys.executable, "-m", "agro.cli", "train", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    off = make_offline_file(tiny_model_dir, d / "offline.jsonl")
    base = [f"model={tiny_model_dir}", "steps=4", "prompts_per_step=4", "group_size=3",
            "max_new_tokens=6", "eval_prompts=0", "precision=fp32", "tensorboard=false",
            "progress=false", "plot=false", "lr=1e-3", "warmup_steps=0", "save_every=1",
            "keep_checkpoints=2", "source=fresh:1,offline:1", f"offline_path={off}",
            "micro_batch_groups=1", "save_async=false"]
    ref = run(base + [f"output_dir={d / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    return d, base, load_file(str(d / "ref" / "final" / "model.safetensors"))


@pytest.mark.parametrize("fault,saving", [
    ("collect:3", "blocking"), ("backward:5", "blocking"), ("checkpoint:2", "blocking"),
    # save_async: step N's checkpoint is complete once step N+1's optimizer step has run; a kill
    # before that may find it unwritten (then the run resumes from the one before, or has none:
    # backward:5 is in step 2, so background saving is killed in step 3 instead)
    ("collect:3", "background"), ("backward:9", "background"), ("checkpoint:2", "background")])
def test_kill9_then_resume_is_bit_identical(setup, fault, saving):
    """kill -9 with blocking saves and with background saves (save_async), then resume."""
    d, base, ref = setup
    out = d / f"run-{fault.replace(':', '-')}-{saving}"
    extra = ["save_async=true"] if saving == "background" else []
    killed = run(base + [f"output_dir={out}", *extra], {"AGRO_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert not (out / "final").exists()
    if fault.startswith("checkpoint"):   # a half-written checkpoint was left behind
        assert any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())
    if fault.startswith("collect") and saving == "blocking":   # steps 1 and 2 were saved
        assert (out / "checkpoints" / "step-00000002" / "COMPLETE.json").is_file()
    resumed = subprocess.run([sys.executable, "-m", "agro.cli", "train", "--resume", str(out)],
                             capture_output=True, text=True, timeout=300,
                             env={k: v for k, v in os.environ.items() if k != "AGRO_FAULT"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    got = load_file(str(out / "final" / "model.safetensors"))
    assert got.keys() == ref.keys()
    diff = [k for k in ref if not (got[k] == ref[k]).all()]
    assert not diff, f"weights differ after kill at {fault}: {diff[:3]}"
