"""A claim's committed record of its finished runs, so a fresh clone needs no run store.

The run store (runs/repro: run directories with checkpoints, never committed) is gone on a fresh
clone or a new machine. Every finished run is therefore also written, small, next to the claim's
outputs::

    OUT/runs/<arm>-seed<S>.json     {"format": 1, "arm", "seed",
                                     "config":    the run's config.yaml (its full resolved TrainConfig),
                                     "done":      its done.json (status, wall time, code, machine),
                                     "base_eval": the base model's evaluation for this seed (step 0),
                                     "base_eval_key": the settings that evaluation was made with,
                                     "offline_key", "offline_sha256": the offline file's key and
                                                  content hash (offline arms), else null,
                                     "adopted_from": where it was taken from (when adopted),
                                     "rows":      its runs.csv rows at full precision}
    OUT/runs/offline-<key>.jsonl    the offline file (c3): later runs train on the same file even
                                    when the store that sampled it is gone

A sweep re-renders its own recorded runs (OUT/runs), whatever code made them (arms.yaml's
``code_by_seed`` says which). It takes a run recorded by a sibling claim (c4 and c5 share c1's
``agro`` arm), or a recorded base-model evaluation, only when it was made by the code that runs
now: equal settings do not make equal runs across revisions (a new sampler draws other samples
from the same seed). A recorded config must match the arm's resolved settings by the store's
rule (:func:`config_matches`). ``reuse=false`` turns all of this off (a check that really
re-runs). Pure file handling: no torch.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..fileio import atomic_write_text

FORMAT = 1
_KEYS = ("arm", "seed", "config", "done", "base_eval", "offline_key", "rows")
_DONE_KEYS = ("status", "wall_seconds", "code")


class LedgerError(ValueError):
    """A ledger file that cannot be read or used: names the file and the field."""


def sha256(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def config_matches(old: dict, full: dict, defaults: dict, skip: set) -> bool:
    """``old`` (a finished run's config) is the run ``full`` asks for: equal on every field it has
    (but ``skip``), lacking only fields that are at their defaults in ``full`` (fields agro added
    after the run was made), and holding no field ``full`` lacks."""
    same = all(old[k] == v for k, v in full.items() if k in old and k not in skip)
    added_at_default = all(full[k] == defaults.get(k) for k in full
                           if k not in old and k not in skip)
    return same and added_at_default and not (set(old) - set(full) - skip)


def run_path(out: Path, arm: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{arm}-seed{seed}.json"


def offline_path(out: Path, key: str) -> Path:
    return Path(out) / "runs" / f"offline-{key}.jsonl"


def write_run(out: Path, entry: dict) -> Path:
    p = run_path(out, entry["arm"], entry["seed"])
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, _dumps({"format": FORMAT, **entry}))
    return p


def _dumps(doc: dict) -> str:
    """``json.dumps(doc, indent=1, sort_keys=True)`` but with ``rows`` last, one row per line, so
    the diff of a re-rendered ledger shows the rows that changed."""
    fields = [f" {json.dumps(k)}: "
              + json.dumps(doc[k], indent=1, sort_keys=True).replace("\n", "\n ")
              for k in sorted(doc) if k != "rows"]
    rows = ",\n".join("  " + json.dumps(r, sort_keys=True) for r in doc.get("rows", []))
    fields.append(' "rows": [\n' + rows + "\n ]")
    return "{\n" + ",\n".join(fields) + "\n}\n"


def read_run(p: Path) -> dict:
    """A ledger entry, checked: a clear error naming the file and field, never a silent skip."""
    try:
        doc = json.loads(Path(p).read_text())
    except (OSError, ValueError) as e:
        raise LedgerError(f"{p}: not a readable ledger file ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise LedgerError(f"{p}: field 'format' must be {FORMAT} (got "
                          f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})")
    for k in _KEYS:
        if k not in doc:
            raise LedgerError(f"{p}: missing field {k!r}")
    if not isinstance(doc["arm"], str) or type(doc["seed"]) is not int:
        raise LedgerError(f"{p}: fields 'arm' and 'seed' must be a string and an integer")
    if Path(p).name != f"{doc['arm']}-seed{doc['seed']}.json":
        raise LedgerError(f"{p}: fields 'arm' and 'seed' ({doc['arm']!r}, {doc['seed']}) do not "
                          "match the file name")
    for k in ("config", "done", "base_eval"):
        if not isinstance(doc[k], dict):
            raise LedgerError(f"{p}: field {k!r} must be an object")
    for k in _DONE_KEYS:
        if k not in doc["done"]:
            raise LedgerError(f"{p}: field 'done' lacks {k!r}")
    if not isinstance(doc["rows"], list) or not all(isinstance(r, dict) for r in doc["rows"]):
        raise LedgerError(f"{p}: field 'rows' must be a list of objects")
    for i, r in enumerate(doc["rows"]):
        if not isinstance(r.get("step"), int):
            raise LedgerError(f"{p}: rows[{i}] field 'step' must be an integer")
    if "sampled_accuracy" not in doc["base_eval"]:
        raise LedgerError(f"{p}: field 'base_eval' lacks 'sampled_accuracy'")
    return doc


class Ledger:
    """The ledger files of some output directories, read once, looked up by (arm, seed)."""

    def __init__(self, dirs: list[Path]):
        self.dirs = [Path(d) for d in dirs]
        self._runs: dict[tuple[str, int], list[tuple[Path, dict]]] = {}
        for d in self.dirs:
            for p in sorted((d / "runs").glob("*-seed*.json")):
                doc = read_run(p)
                self._runs.setdefault((doc["arm"], doc["seed"]), []).append((p, doc))

    def find(self, arm: str, seed: int, match) -> tuple[Path, dict] | None:
        """The first entry for (arm, seed), in ``dirs`` order, that ``match(path, doc)`` accepts."""
        for p, doc in self._runs.get((arm, seed), []):
            if match(p, doc):
                return p, doc
        return None

    def base_eval(self, seed: int, match) -> tuple[Path, dict] | None:
        """A recorded base-model evaluation for ``seed`` from an entry ``match(path, doc)``
        accepts."""
        for (_, s), entries in sorted(self._runs.items()):
            if s != seed:
                continue
            for p, doc in entries:
                if match(p, doc):
                    return p, doc["base_eval"]
        return None

    def offline_file(self, key: str) -> Path | None:
        for d in self.dirs:
            p = offline_path(d, key)
            if p.is_file():
                return p
        return None


def copy_offline(src: Path, out: Path, key: str) -> None:
    """Keep the offline file ``src`` in OUT's ledger; a different file already there is an
    error (two sweeps' runs would have trained on different files under one name)."""
    dst = offline_path(out, key)
    if dst.is_file():
        if sha256(dst) != sha256(src):
            raise LedgerError(f"{dst}: holds another offline file than {src} (sha256 differs); "
                              "runs trained on both cannot share a claim")
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(".partial-" + dst.name)      # hidden and .gitignored until complete
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
