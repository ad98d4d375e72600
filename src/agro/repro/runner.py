"""Runs a claim's arms x seeds through the real trainer, resumably, and writes its outputs.

Layout of the run store (``store``; the runs are big and never committed)::

    STORE/base-<hash>/seed<S>.json        held-out accuracy of the base model (step 0 of every arm)
    STORE/offline-<hash>/groups.jsonl      the one offline file, sampled once from pi_ref (c3)
    STORE/<arm>-<hash>/seed<S>/            an `agro train` run directory (metrics.jsonl, events.jsonl,
                                           config.yaml, checkpoints/ while it runs, done.json after)

``<hash>`` is a digest of the run's full resolved settings, so a changed base or arm never reuses
runs made with other settings, while the same arm needed by two claims runs once per code
revision (a store run whose done.json names other code is not reused: :meth:`Sweep.finished`). A run with
``done.json`` is finished and skipped; a run without one resumes from its last complete checkpoint
(bit-identical to an uninterrupted run, see tests/test_kill_resume.py) if the code that started
it (its ``started.json``) is the code running now, else starts again. Each finished
run's checkpoints are deleted (only its logs are kept).

The claim's outputs (``out``): ``runs.csv`` (one row per arm, seed and logged step, with the base
model's evaluation as step 0), ``arms.yaml`` (every arm's full settings and the command that re-runs
it), ``accuracy_vs_<x>.png``, ``accuracy_vs_kl.png``, ``verdict.md`` and ``runs/``: the ledger of
finished runs (:mod:`agro.repro.ledger`), small and committed, from which a fresh clone without the
store re-renders the outputs and a sweep adopts runs it or a sibling claim already made. They are
rewritten from whatever runs have finished, so a partial sweep already shows its partial verdict.
"""
from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from .. import __version__
from ..config import (RENAMED, EvalConfig, GenerateConfig, TrainConfig, config_from_dict,
                      renamed, to_dict)
from ..fileio import atomic_write_text
from ..perf import machine_key
from . import ledger as ledger_mod
from .claims import (ARMS, FULL_BASE, FULL_OFFLINE, QUICK_BASE, QUICK_OFFLINE, Arm, Claim,
                     claim as get_claim)

STARTED = "started.json"      # in a run directory: the code revision that started the run
CSV_COLUMNS = ["arm", "seed", "step", "epoch", "samples", "reward_mean", "kl_k1",
               "eval_accuracy", "eval_kl", "loss", "completion_len_mean", "fresh_fraction",
               "staleness_mean"]
# Wall times are not in runs.csv (they differ between re-runs); they are in arms.yaml.
# Settings that never change what a run computes (only where it writes or what it shows).
_NOT_HASHED = {"output_dir", "progress", "tensorboard", "wandb", "wandb_project", "plot",
               "save_every", "keep_checkpoints", "num_threads", "save_async",
               "linear_backend"}   # fp32 rounding only, as num_threads; chosen per machine
# ... and, comparing a finished run's config with an arm's, where it ran and on which file path
_NOT_COMPARED = _NOT_HASHED | {"output_dir", "offline_path"}


class SweepError(ValueError):
    """A sweep that cannot start as asked (unknown arm, an output directory holding another sweep)."""


def code_revision() -> str:
    """The code that runs: $AGRO_CODE_REV (set by scripts/paper_sweep.sh), else the last git
    commit that changed the src/ holding this package (commits of docs or sweep outputs do not
    change it), with "+dirty-<hash of the uncommitted diff>" if src/ has uncommitted changes
    (two different edits never share a revision); "unknown" without git."""
    import os
    import subprocess

    if os.environ.get("AGRO_CODE_REV"):
        return os.environ["AGRO_CODE_REV"]
    src = Path(__file__).resolve().parents[2]

    def git(*args: str) -> bytes:
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True,
                              timeout=60).stdout

    try:
        rev = git("log", "-1", "--format=%h", "--", ".").decode().strip()
        if git("status", "--porcelain", "--", ".").strip():
            h = hashlib.sha256(git("diff", "--binary", "--no-ext-diff", "--no-textconv",
                                   "--no-color", "HEAD", "--", "."))
            for name in sorted(git("ls-files", "-o", "--exclude-standard", "-z", "--",
                                   ".").split(b"\0")):
                if name:                         # untracked files: their names and contents
                    h.update(name + b"\0")
                    try:
                        h.update((src / name.decode()).read_bytes())
                    except OSError:
                        pass
            rev = (rev or "unknown") + "+dirty-" + h.hexdigest()[:8]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev or "unknown"


def same_code(a, b) -> bool:
    """Whether two recorded code revisions are known to be the same code ("unknown" never is)."""
    return a is not None and a == b and not str(a).startswith("unknown")


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class RunRecord:
    """One finished (or partial) run: its logged rows and its evaluation points."""

    arm: str
    seed: int
    rows: list[dict] = field(default_factory=list)     # CSV_COLUMNS, step 0 = base model
    done: bool = False
    wall_seconds: float = 0.0
    status: str = "finished"       # or "aborted" (TrainingAborted: its rows stop where it stopped)
    code: str = ""                 # the code revision that ran it
    adopted_from: str = ""         # the ledger file it was taken from, when another claim made it
                                   # (relative to the directory holding the claims' outputs)

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.rows if r.get("eval_accuracy") not in (None, "")]


class Sweep:
    """One claim's sweep. ``log`` receives progress lines. ``reuse``: adopt finished runs recorded
    in the ledger of ``out`` or of its sibling directories (other claims' outputs) rather than
    run them again."""

    def __init__(self, claim: Claim | str, out: str | Path, store: str | Path | None = None,
                 quick: bool = False, seeds: list[int] | None = None,
                 arms: list[str] | None = None, log: Callable[[str], None] = print,
                 reuse: bool = True, render_only: bool = False):
        self.claim = get_claim(claim) if isinstance(claim, str) else claim
        self.out = Path(out)
        self.quick = quick
        self.store = Path(store) if store else (self.out / ".store" if quick else Path("runs/repro"))
        self.seeds = list(seeds) if seeds else ([0, 1] if quick else [0, 1, 2])
        unknown = [a for a in (arms or []) if a not in self.claim.arms]
        if unknown:
            raise SweepError(f"claim {self.claim.name} has no arm {unknown[0]!r}; its arms: "
                             f"{', '.join(self.claim.arms)}")
        self.arms = [ARMS[a] for a in (arms or self.claim.arms)]
        self.log = log
        self.reuse = reuse
        self._grader = None
        self._ledger: ledger_mod.Ledger | None = None
        self._code: str | None = None
        self.render_only = render_only  # run() trains and base_eval() evaluates nothing

    @property
    def code(self) -> str:
        """The code revision that runs now (recorded in done.json; :func:`code_revision`)."""
        if self._code is None:
            self._code = code_revision()
        return self._code

    # ------------------------------------------------------------------ settings
    def base(self) -> dict:
        if not self.quick:
            return dict(FULL_BASE)
        return dict(QUICK_BASE, model=str(self._tiny_model()))

    def offline_settings(self) -> dict:
        return dict(QUICK_OFFLINE if self.quick else FULL_OFFLINE)

    def _tiny_model(self) -> Path:
        from ..models import save_tiny_llama

        d = self.store / "tiny-model"
        if not d.is_dir():
            tmp = self.store / "tiny-model.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            save_tiny_llama(tmp)
            tmp.replace(d)
        return d

    def arm_settings(self, arm: Arm, seed: int) -> dict:
        s = dict(self.base(), **arm.overrides, seed=seed)
        if arm.offline:
            off = self.offline_settings()
            s["source"] = "offline"
            s["offline_path"] = str(self.offline_file())
            s["steps"] = off["epochs"] * math.ceil(off["prompts"] / s["prompts_per_step"])
            s["eval_every"] = max(1, math.ceil(off["prompts"] / s["prompts_per_step"]))
        return s

    def run_dir(self, arm: Arm, seed: int) -> Path:
        """STORE/<arm>-<digest of every resolved TrainConfig field but seed and the unhashed>/seed<S>:
        a changed default (not only a changed override) gets new runs. A finished run made by an
        older agro, whose config lacked fields added since, is still found when those fields are
        at their defaults here and everything else matches (:meth:`_compatible_run`)."""
        full = self._resolved(arm, seed)
        # hashed under the names the fields had when first written, so a rename (config.RENAMED)
        # keeps every run's directory, unfinished ones included (they resume)
        old_name = {new: old for old, new in RENAMED.items()}
        key = {old_name.get(k, k): v for k, v in full.items()
               if k not in _NOT_HASHED and k != "seed"}
        if arm.offline:   # the file's path is in the store; what matters is how it was made
            key["offline_path"] = self._offline_key()
        d = self.store / f"{arm.name}-{_digest(key)}" / f"seed{seed}"
        if not d.is_dir():
            d = self._compatible_run(arm, seed, full) or d
        return d

    def _resolved(self, arm: Arm, seed: int) -> dict:
        return {**to_dict(TrainConfig()), **self.arm_settings(arm, seed)}

    def _compatible_run(self, arm: Arm, seed: int, full: dict) -> Path | None:
        """A finished run of this arm and seed whose config.yaml equals ``full`` on every field it
        has (but output_dir, offline_path and the unhashed), lacking only fields that are at
        their defaults in ``full`` (fields agro added after the run was made)."""
        defaults = to_dict(TrainConfig())
        for cand in sorted(self.store.glob(f"{arm.name}-*/seed{seed}")):
            if not ((cand / "done.json").is_file() and (cand / "config.yaml").is_file()):
                continue
            if cand.parent.name[len(arm.name) + 1:].count("-"):   # another arm's name prefix
                continue
            old = renamed(yaml.safe_load((cand / "config.yaml").read_text()) or {})
            if ledger_mod.config_matches(old, full, defaults, _NOT_COMPARED):
                return cand
        return None

    # ------------------------------------------------------------------ the ledger
    def ledger(self) -> ledger_mod.Ledger:
        """OUT's ledger, then those of its sibling claims' outputs (directories beside it whose
        arms.yaml names a claim, in the same quick mode), read once; empty when ``reuse`` is off."""
        if self._ledger is None:
            dirs = []
            if self.reuse:
                dirs = [self.out] + [d for d in self._siblings()]
            self._ledger = ledger_mod.Ledger(dirs)
        return self._ledger

    def _siblings(self) -> list[Path]:
        from .claims import CLAIMS

        parent = self.out.resolve().parent
        if not parent.is_dir():
            return []
        found = []
        for d in sorted(parent.iterdir()):
            if not (d.is_dir() and d.resolve() != self.out.resolve() and (d / "runs").is_dir()
                    and (d / "arms.yaml").is_file()):
                continue
            try:
                doc = yaml.safe_load((d / "arms.yaml").read_text())
            except (OSError, yaml.YAMLError):
                continue          # not a claim's outputs: not ours to read
            if isinstance(doc, dict) and doc.get("claim") in CLAIMS \
                    and bool(doc.get("quick")) == self.quick:
                found.append(d)
        return found

    def _own(self, p: Path) -> bool:
        return Path(p).resolve().parent.parent == self.out.resolve()

    def _ledger_run(self, arm: Arm, seed: int) -> tuple[Path, dict] | None:
        """A recorded finished run that is this arm and seed by the store's rule (offline arms:
        trained on the same offline file): this claim's own whatever code made it, another
        claim's only when made by the code that runs now."""
        full = self._resolved(arm, seed)
        defaults = to_dict(TrainConfig())
        key = self._offline_key() if arm.offline else None
        sha = self._offline_sha() if arm.offline else None
        return self.ledger().find(arm.name, seed, lambda p, doc: (
            doc["offline_key"] == key and doc.get("offline_sha256") == sha
            and (self._own(p) or same_code(doc["done"]["code"], self.code))
            and ledger_mod.config_matches(renamed(doc["config"]), full, defaults, _NOT_COMPARED)))

    def _base_matches(self, p: Path, doc: dict) -> bool:
        """A recorded base evaluation made with this sweep's evaluation settings by this code."""
        return doc.get("base_eval_key") == self._base_key() and same_code(doc["done"]["code"], self.code)

    def _offline_sha(self) -> str | None:
        """The content hash of the offline file this sweep trains on (None: none exists yet)."""
        p = self.offline_file()
        if not p.is_file():
            p = self.ledger().offline_file(self._offline_key())
        return ledger_mod.sha256(p) if p is not None and p.is_file() else None

    # ------------------------------------------------------------------ shared pieces
    def _eval_settings(self) -> dict:
        b = self.base()
        keep = ("model", "precision", "task", "arithmetic_range", "arithmetic_level",
                "prompt_template", "max_new_tokens", "generation_batch_size", "group_size")
        return {k: b[k] for k in keep if k in b}

    def _base_key(self) -> dict:
        b = self.base()
        return dict(self._eval_settings(), prompts=b["eval_prompts"], samples=b["eval_samples"])

    def base_eval_path(self, seed: int) -> Path:
        return self.store / f"base-{_digest(self._base_key())}" / f"seed{seed}.json"

    def base_eval(self, seed: int) -> dict:
        """Held-out accuracy of the base model (pi_ref), once per seed: step 0 of every arm. From
        the store, else from a ledger entry with the same evaluation made by this code, else
        evaluated now."""
        p = self.base_eval_path(seed)
        if p.is_file():
            return json.loads(p.read_text())
        found = self.ledger().base_eval(seed, self._base_matches)
        if found is not None:
            self.log(f"[repro] base model evaluation, seed {seed}: recorded in {found[0]}")
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(p, json.dumps(found[1], sort_keys=True))
            return found[1]
        if self.render_only:
            raise SweepError(f"--render: the base model's evaluation for seed {seed} (step 0 of "
                             f"every arm) is in neither {p.parent} nor a claim's ledger; run the "
                             "sweep without --render to make it")
        from ..workflows import run_eval

        b = self.base()
        self.log(f"[repro] base model evaluation, seed {seed}")
        cfg = config_from_dict(EvalConfig, dict(self._eval_settings(), seed=seed,
                                                num_prompts=b["eval_prompts"],
                                                samples=b["eval_samples"], greedy=False))
        res = run_eval(cfg)
        res["kl_pi_ref"] = 0.0          # the base model is pi_ref
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p, json.dumps(res, sort_keys=True))
        return res

    def _offline_key(self) -> str:
        return _digest(dict(self._eval_settings(), **self.offline_settings()))

    def offline_file(self) -> Path:
        return self.store / f"offline-{self._offline_key()}" / "groups.jsonl"

    def ensure_offline_file(self) -> Path:
        p = self.offline_file()
        if p.is_file():
            return p
        recorded = self.ledger().offline_file(self._offline_key())
        if recorded is not None:      # the file earlier runs trained on, kept in a ledger
            n = sum(1 for line in recorded.read_text().splitlines() if line.strip())
            if n != self.offline_settings()["prompts"]:
                raise ledger_mod.LedgerError(
                    f"{recorded}: holds {n} groups, not the {self.offline_settings()['prompts']} "
                    "the sweep's epochs are counted in")
            self.log(f"[repro] the offline file, recorded in {recorded}")
            p.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(recorded, p.with_name("partial-" + p.name))
            p.with_name("partial-" + p.name).replace(p)
            return p
        from ..workflows import generate_offline

        off = self.offline_settings()
        self.log(f"[repro] sampling the offline file once from pi_ref: {off['prompts']} prompts")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name("partial-" + p.name)
        cfg = config_from_dict(GenerateConfig, dict(self._eval_settings(), seed=off["seed"],
                                                    num_prompts=off["prompts"], output=str(tmp)))
        _, n_groups = generate_offline(cfg, grader=self._shared_grader())
        if n_groups != off["prompts"]:
            raise RuntimeError(f"the offline file {tmp} holds {n_groups} groups, not the "
                               f"{off['prompts']} the sweep's epochs are counted in")
        tmp.replace(p)
        ledger_mod.copy_offline(p, self.out, self._offline_key())
        return p

    def _shared_grader(self):
        if self._grader is None:
            from ..builders import build_grader

            self._grader = build_grader(config_from_dict(TrainConfig, {}))
        return self._grader

    def close(self) -> None:
        if self._grader is not None:
            self._grader.close()
            self._grader = None

    # ------------------------------------------------------------------ running
    def finished(self, arm: Arm, seed: int) -> tuple[str, object] | None:
        """Where this arm and seed's finished run is, in this order: ("ledger", (path, entry))
        for this claim's own record, whatever code made it (a claim is never rewritten by
        another claim's run); ("store", dir) for a run in the store made by the code running
        now; ("ledger", (path, entry)) for another claim's record made by this code; else None.
        A store run made by other code is not this claim's run (it runs again)."""
        found = self._ledger_run(arm, seed)
        if found is not None and self._own(found[0]):
            return "ledger", found
        d = self.run_dir(arm, seed)
        if (d / "done.json").is_file():
            shutil.rmtree(d / "checkpoints", ignore_errors=True)   # a kill after done.json
            code = json.loads((d / "done.json").read_text()).get("code")
            if same_code(code, self.code):
                return "store", d
        return ("ledger", found) if found is not None else None

    def pending(self) -> list[tuple[Arm, int]]:
        return [(a, s) for a in self.arms for s in self.seeds if self.finished(a, s) is None]

    def run(self, max_runs: int = 0) -> int:
        """Run up to ``max_runs`` pending runs (0 = all; a ``render_only`` sweep: none, and no base
        evaluation for them); returns how many are still pending."""
        todo = [] if self.render_only else self.pending()
        need_base = {s for _, s in todo}
        for a in self.arms:
            for s in self.seeds:
                where = self.finished(a, s)
                if where is not None and where[0] == "store":
                    need_base.add(s)        # its step-0 row (rendering never evaluates)
                elif where is not None:
                    p, entry = where[1]
                    self.log(f"[repro] {self.claim.name}: arm {a.name} seed {s}: finished, "
                             f"recorded in {p} (code {entry['done']['code']})")
        for s in sorted(need_base):
            self.base_eval(s)
        from ..async_actors import keep_actors

        with keep_actors():     # async arms: the next run resets the last one's actors
            for arm, seed in todo[:max_runs or None]:
                self.run_one(arm, seed)
        return len(self.pending())

    def resumable(self, d: Path) -> tuple[bool, str]:
        """Whether the unfinished run in ``d`` resumes from its last complete checkpoint, and if
        not, why: no checkpoint, or a run started by other code (its ``started.json``; a run
        from before that file existed, or code of unknown revision, counts as other code), which
        would otherwise finish on this code with the first steps' weights and samples from the
        other."""
        from ..checkpoint import latest_checkpoint

        if not d.is_dir() or (d / "done.json").is_file():
            return False, ""
        if latest_checkpoint(d) is None:
            return False, "no complete checkpoint"
        try:
            code = json.loads((d / STARTED).read_text()).get("code")
        except (OSError, ValueError, AttributeError):
            code = None
        if not same_code(code, self.code):
            return False, f"it was started by code {code or 'not recorded'}, not {self.code}"
        return True, ""

    def run_one(self, arm: Arm, seed: int) -> Path:
        from ..trainer import Trainer, TrainingAborted

        if arm.offline:
            self.ensure_offline_file()
        d = self.run_dir(arm, seed)
        settings = dict(self.arm_settings(arm, seed), output_dir=str(d))
        cfg = config_from_dict(TrainConfig, settings, where=f"repro arm {arm.name}")
        resume, why = self.resumable(d)
        if d.is_dir() and not resume:
            shutil.rmtree(d)            # not resumable by this code (why): start again
        self.log(f"[repro] {self.claim.name}: arm {arm.name} seed {seed} "
                 f"({'resuming' if resume else 'starting'}{'' if resume or not why else ': ' + why})"
                 f" -> {d}")
        d.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_text(d / STARTED, json.dumps({"code": self.code}))
        t0 = time.perf_counter()
        status, reason, steps = "finished", "", cfg.steps
        trainer = Trainer(cfg, resume=resume, grader=self._shared_grader())
        try:
            steps = trainer.train().steps_done
        except TrainingAborted as e:      # e.g. non-finite steps: a result, not a crash
            status, reason, steps = "aborted", str(e), trainer.step
            self.log(f"[repro] arm {arm.name} seed {seed} aborted at step {steps}: {e}")
        wall = time.perf_counter() - t0
        del trainer
        gc.collect()
        # done.json first: a kill between the two leaves a finished run, never a lost one
        atomic_write_text(d / "done.json", json.dumps({
            "arm": arm.name, "seed": seed, "status": status, "reason": reason, "steps": steps,
            "wall_seconds": wall, "resumed": resume,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_key(), "agro": __version__, "code": self.code}, indent=1))
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
        return d

    # ------------------------------------------------------------------ reading
    def records(self) -> dict[str, dict[int, RunRecord]]:
        """{arm: {seed: RunRecord}} for every run that has finished: in the store, else
        recorded in a ledger."""
        return {a: {s: rec for s, (rec, _) in by.items()} for a, by in self._entries().items()}

    def _entries(self) -> dict[str, dict[int, tuple[RunRecord, dict]]]:
        """{arm: {seed: (RunRecord, its ledger entry)}}."""
        out: dict[str, dict[int, tuple[RunRecord, dict]]] = {}
        for arm in self.arms:
            for seed in self.seeds:
                where = self.finished(arm, seed)
                if where is None:
                    continue
                if where[0] == "store":
                    d = where[1]
                    rec = self._record(arm, seed, d)
                    entry = {"arm": arm.name, "seed": seed,
                             "config": yaml.safe_load((d / "config.yaml").read_text()),
                             "done": json.loads((d / "done.json").read_text()),
                             "base_eval": self.base_eval(seed), "base_eval_key": self._base_key(),
                             "offline_key": self._offline_key() if arm.offline else None,
                             "offline_sha256": self._offline_sha() if arm.offline else None,
                             "rows": rec.rows}
                else:
                    p, entry = where[1]
                    entry = {k: v for k, v in entry.items() if k != "format"}
                    done = entry["done"]
                    if not self._own(p) and not entry.get("adopted_from"):   # keep the origin
                        entry["adopted_from"] = os.path.relpath(p.resolve(),
                                                                self.out.resolve().parent)
                    rec = RunRecord(arm.name, seed, [dict(r) for r in entry["rows"]], True,
                                    float(done.get("wall_seconds", 0.0)),
                                    done.get("status", "finished"), done.get("code", ""),
                                    entry.get("adopted_from", ""))
                out.setdefault(arm.name, {})[seed] = (rec, entry)
        return out

    def _pool(self, arm: Arm) -> int:
        """Prompts in one epoch: the offline file's groups, else the task's training prompts."""
        if arm.offline:
            return self.offline_settings()["prompts"]
        if getattr(self, "_train_pool", None) is None:
            self._train_pool = self._count_train_prompts()
        return self._train_pool

    def _count_train_prompts(self) -> int:
        from ..tasks import build_task

        task = build_task(config_from_dict(TrainConfig, self._eval_settings()))
        space = getattr(task, "space_size", None)
        if space is not None:
            return sum(1 for i in range(space) if task.problem(i).meta["split"] == "train")
        return len(getattr(task, "train", [])) or 1

    def _record(self, arm: Arm, seed: int, d: Path) -> RunRecord:
        base = self.base_eval(seed)
        done = json.loads((d / "done.json").read_text())
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        n, pool = cfg["group_size"], self._pool(arm)
        rows = [dict(arm=arm.name, seed=seed, step=0, epoch=0.0, samples=0, kl_k1=0.0,
                     eval_accuracy=base["sampled_accuracy"], eval_kl=0.0)]
        after = {}
        ev = d / "events.jsonl"
        if ev.is_file():
            for line in ev.read_text().splitlines():
                e = json.loads(line)
                if e.get("kind") == "eval" and e.get("when") == "after":
                    after = e
        groups = 0
        for line in (d / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            groups += int(m.get("groups", 0))
            row = dict(arm=arm.name, seed=seed, step=m["step"], epoch=groups / pool,
                       samples=groups * n, reward_mean=m.get("reward_mean"), kl_k1=m.get("kl_k1"),
                       eval_accuracy=m.get("eval_sampled_accuracy"), eval_kl=m.get("eval_kl_pi_ref"),
                       loss=m.get("loss"), completion_len_mean=m.get("completion_len_mean"),
                       fresh_fraction=m.get("fresh_fraction"),
                       staleness_mean=m.get("staleness_mean"))
            if after and m["step"] == after.get("step"):
                row["eval_accuracy"] = after.get("sampled_accuracy")
                row["eval_kl"] = after.get("kl_pi_ref")
            rows.append(row)
        return RunRecord(arm.name, seed, rows, True, float(done.get("wall_seconds", 0.0)),
                         done.get("status", "finished"), done.get("code", ""))

    # ------------------------------------------------------------------ writing
    def write_outputs(self) -> dict:
        """runs.csv, arms.yaml, the plots and verdict.md from the finished runs; returns the
        verdict dict (also written as verdict.json)."""
        from . import plots, verdicts

        self.out.mkdir(parents=True, exist_ok=True)
        self._check_out_dir()
        entries = self._entries()
        for by in entries.values():
            for _, entry in by.values():
                ledger_mod.write_run(self.out, entry)
        if any(a.offline for a in self.arms) and self.offline_file().is_file():
            ledger_mod.copy_offline(self.offline_file(), self.out, self._offline_key())
        recs = {a: {s: rec for s, (rec, _) in by.items()} for a, by in entries.items()}
        with open(self.out / "runs.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for arm in self.arms:
                for seed in self.seeds:
                    r = recs.get(arm.name, {}).get(seed)
                    for row in (r.rows if r else []):
                        w.writerow({k: _cell(row.get(k)) for k in CSV_COLUMNS})
        self._write_arms_yaml(recs)
        labels = {a.name: a.label for a in self.arms}
        plots.write_plots(self.claim, recs, labels, self.out)
        verdict = verdicts.decide(self.claim, recs, self.seeds)
        verdict["sweep"] = self._sweep_summary(recs)
        (self.out / "verdict.md").write_text(verdicts.render(self.claim, verdict, labels))
        atomic_write_text(self.out / "verdict.json", json.dumps(verdict, indent=1, default=str))
        return verdict

    def _check_out_dir(self) -> None:
        """Refuse to overwrite OUT's record of one sweep with another's (e.g. one arm re-run). A
        sweep of the same claim, mode and seeds with every recorded arm and more (a claim that
        gained arms) is the same sweep extended: its recorded runs stay and the new arms run."""
        p = self.out / "arms.yaml"
        if not p.is_file():
            return
        prev = yaml.safe_load(p.read_text()) or {}
        mine = (self.claim.name, bool(self.quick), list(self.seeds), [a.name for a in self.arms])
        theirs = (prev.get("claim"), bool(prev.get("quick")), list(prev.get("seeds", [])),
                  list(prev.get("arms", {})))
        if mine[:3] != theirs[:3] or not set(theirs[3]) <= set(mine[3]):
            raise SweepError(f"{self.out} holds the outputs of another sweep (claim, quick, seeds, "
                             f"arms = {theirs}); write this one ({mine}) to another --out")

    def _sweep_summary(self, recs) -> dict:
        walls = [r.wall_seconds for by in recs.values() for r in by.values()]
        codes: dict[str, int] = {}
        for by in recs.values():
            for r in by.values():
                codes[r.code or "unknown"] = codes.get(r.code or "unknown", 0) + 1
        return {"runs_finished": len(walls), "runs_total": len(self.arms) * len(self.seeds),
                "wall_seconds_sum": round(sum(walls), 1), "quick": self.quick,
                "code_revisions": dict(sorted(codes.items()))}

    def _write_arms_yaml(self, recs) -> None:
        doc = {"claim": self.claim.name, "quick": self.quick, "seeds": self.seeds,
               "rerun_one": (f"agro repro {self.claim.name} --out /tmp/check arms=ARM seeds=SEED "
                             "store=/tmp/check-store reuse=false" + (" --quick" if self.quick else "")
                             + "   (a fresh store and no ledger, so the run really runs; compare "
                             "runs.csv rows)"),
               "arms": {}}
        for arm in self.arms:
            s = {k: v for k, v in self.arm_settings(arm, 0).items() if k != "seed"}
            if arm.offline:
                s["offline_path"] = "(the run store's offline file: " + \
                    json.dumps(self.offline_settings()) + ")"
            if self.quick:
                s["model"] = "(tiny random 2-layer Llama, agro.models.save_tiny_llama)"
            by = recs.get(arm.name, {})
            doc["arms"][arm.name] = {
                "label": arm.label, "settings": s,
                "wall_seconds_by_seed": {sd: round(r.wall_seconds, 1) for sd, r in by.items()},
                "code_by_seed": {sd: r.code for sd, r in by.items()},
                "status_by_seed": {sd: r.status for sd, r in by.items()}}
            adopted = {sd: r.adopted_from for sd, r in by.items() if r.adopted_from}
            if adopted:
                doc["arms"][arm.name]["adopted_from_by_seed"] = adopted
        atomic_write_text(self.out / "arms.yaml", yaml.safe_dump(doc, sort_keys=False))


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def run_sweep(claim: str, out: str | Path, *, quick: bool = False, store: str | Path | None = None,
              seeds: list[int] | None = None, arms: list[str] | None = None, max_runs: int = 0,
              log: Callable[[str], None] = print, reuse: bool = True,
              render_only: bool = False) -> tuple[dict, int]:
    """Run (up to ``max_runs`` pending runs of; ``render_only``: none of) a claim and write its
    outputs. Returns (verdict, runs still pending)."""
    sweep = Sweep(claim, out, store=store, quick=quick, seeds=seeds, arms=arms, log=log,
                  reuse=reuse, render_only=render_only)
    sweep._check_out_dir()              # before any run: a wrong --out fails now, not in hours
    try:
        left = sweep.run(max_runs)
        verdict = sweep.write_outputs()
    finally:
        sweep.close()
    return verdict, left
