"""Atomic, complete, verifiable checkpoints: everything needed to resume a run bit-identically.

A checkpoint is the directory ``output_dir/checkpoints/step-{step:08d}`` holding

==================  ==========================================================================
model.safetensors   the *trainable* parameters (``requires_grad=True``; for LoRA: the adapters),
                    by name, with their names listed in the file's metadata (``agro_trainable``)
optimizer.pt        ``optimizer.state_dict()``            (absent when no optimizer was given)
scheduler.pt        ``scheduler.state_dict()``            (absent when no scheduler was given)
state.pt            the trainer's state: step, RNG states (:func:`rng_state`), replay buffer,
                    source states -- nested dict/list/str/int/float/bool/None/bytes/tensors only
config.json         the run's config
COMPLETE.json       written last: every other file with its size and sha256, the step, the
                    trainable parameter names/shapes/dtypes
==================  ==========================================================================

Crash safety (a machine can be ``kill -9``-ed at any instruction):

* Everything is written into a hidden sibling ``.tmp-step-{step:08d}-{pid}``; each file and the
  directory are fsync-ed, ``COMPLETE.json`` is written (and fsync-ed) last, then one ``os.rename``
  publishes the directory under its final name and the parent directory is fsync-ed. A reader thus
  sees either no ``step-*`` directory or a complete one.
* Directories are deleted by first renaming them to a hidden ``.del-*`` name, so a half-deleted
  checkpoint is never visible under a ``step-*`` name either. An existing ``step-N`` (left by an
  earlier run that was interrupted and resumed from before step N) is renamed aside the same way
  before the new one takes its name.
* :func:`latest_checkpoint` still checks every ``step-*`` candidate against its ``COMPLETE.json``
  (sizes; sha256 with ``verify=True``) so truncation or corruption after the fact is caught;
  skipped candidates are named in a ``logging`` warning.
* Every ``torch.load`` uses ``weights_only=True``: loading a checkpoint never executes pickled
  code. That is why :func:`save_checkpoint` converts the trainer state to plain types first
  (:func:`to_plain`) and why :func:`rng_state` returns lists and tensors rather than tuples/arrays.

Pruning after each save keeps the newest ``keep`` complete checkpoints, deletes hidden leftovers of
crashed writes/deletes, and deletes checkpoints with a step *greater* than the one just saved:
those belong to an abandoned timeline (the run was resumed from an earlier checkpoint) and would
otherwise be picked up by :func:`latest_checkpoint` on the next resume. One writer per
``output_dir`` is assumed.

Departure from the paper: none (the paper does not discuss checkpointing).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from .faults import maybe_crash
from .fileio import fsync_path
from safetensors.torch import load_file, save_file

__all__ = [
    "BackgroundSaver",
    "CheckpointError",
    "save_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "rng_state",
    "set_rng_state",
    "to_plain",
]

log = logging.getLogger(__name__)

FORMAT = "agro-checkpoint-v1"
COMPLETE = "COMPLETE.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
REQUIRED_FILES = (MODEL_FILE, STATE_FILE, CONFIG_FILE)

_STEP_RE = re.compile(r"^step-(\d+)$")
_HIDDEN_PREFIXES = (".tmp-", ".del-")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupted, unsafe to unpickle, or does not match the model."""


# --------------------------------------------------------------------------- plain state
def to_plain(obj: Any, where: str = "state") -> Any:
    """Return ``obj`` converted to types that ``torch.load(weights_only=True)`` accepts.

    Kept as is: ``dict`` (keys: str/int/float/bool/None), ``list``, ``str``, ``int``, ``float``,
    ``bool``, ``None``, ``bytes`` and tensors (detached, moved to CPU; views are copied so that a
    slice does not drag its whole storage into the file). Converted: tuples and sets -> lists,
    numpy arrays -> nested lists, numpy scalars -> Python scalars, paths -> str, dataclasses ->
    dicts of their fields. Anything else raises ``TypeError`` naming where it sits (``where``),
    e.g. ``state['buffer'][3]['extra']``.
    """
    if obj is None or type(obj) in (bool, int, float, str, bytes):
        return obj
    if isinstance(obj, (bool, int, float, str, bytes)):   # IntEnum, numpy.float64, str enums...
        return _scalar(obj)
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        elif not _owns_storage(t):
            t = t.clone()
        return t
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            key = to_plain(k, f"{where} key {k!r}")
            if not (key is None or isinstance(key, (str, int, float, bool))):
                raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} is not "
                                "str/int/float/bool/None")
            out[key] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        items = [to_plain(v, f"{where}{{...}}") for v in obj]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(obj)}
    raise TypeError(
        f"{where}: cannot store an object of type {type(obj).__module__}.{type(obj).__qualname__} "
        "in a checkpoint; convert it to dict/list/str/int/float/bool/None/tensors first "
        "(checkpoints are loaded with torch.load(weights_only=True), which runs no pickled code)")


def _scalar(x: Any) -> Any:
    if isinstance(x, bool):
        return bool(x)
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, str):
        return str(x)
    return bytes(x)


def _owns_storage(t: torch.Tensor) -> bool:
    """True if ``t`` is exactly its whole storage (so torch.save writes no extra bytes)."""
    return (t.storage_offset() == 0 and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


# --------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """All global RNG states, in plain types (lists, ints, floats, uint8 tensors).

    Covers python ``random``, numpy's global ``np.random`` (legacy MT19937) and torch's CPU
    generator, plus every CUDA device's generator when CUDA is available. Restore with
    :func:`set_rng_state`. Generators the trainer owns (``torch.Generator``,
    ``np.random.Generator``) are not global: store ``g.get_state()`` /
    ``g.bit_generator.state`` in the trainer state yourself.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    out: dict[str, Any] = {
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),      # [624] uint32 as ints
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),                     # uint8 tensor
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNG states saved by :func:`rng_state` (python, numpy, torch, CUDA)."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state({
        "bit_generator": nps["bit_generator"],
        "state": {"key": np.asarray(nps["key"], dtype=np.uint32), "pos": int(nps["pos"])},
        "has_gauss": int(nps["has_gauss"]),
        "gauss": float(nps["gauss"]),
    })
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            log.warning("checkpoint holds CUDA RNG states but CUDA is not available; ignored")
        elif len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint holds %d CUDA RNG states but %d devices are visible; "
                        "restoring the first %d", len(cuda), torch.cuda.device_count(),
                        min(len(cuda), torch.cuda.device_count()))
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
        else:
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- file helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_model(path: Path, model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Write the trainable parameters to ``path``; return {name: {shape, dtype}}.

    ``named_parameters()`` yields a tied parameter once (under its first name). A CPU tensor that
    is exactly its own storage is written as it is; any other (a view, a GPU tensor) is copied
    into its own contiguous CPU storage, because safetensors refuses shared storage.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            # a CPU tensor that is its whole storage is written as it is (no 0.5 GB copy)
            tensors[name] = t if t.device.type == "cpu" and _owns_storage(t) else \
                t.to("cpu", copy=True).contiguous()
    info = {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t in tensors.items()}
    n_frozen = sum(1 for _, p in model.named_parameters() if not p.requires_grad)
    metadata = {"format": "pt", "agro_format": FORMAT,
                "agro_trainable": json.dumps(sorted(tensors)),
                "agro_frozen_count": str(n_frozen)}
    save_file(tensors, str(path), metadata=metadata)
    fsync_path(path)
    return info


def _remove_dir(path: Path) -> None:
    """Delete a directory, first renaming it to a hidden ``.del-*`` name (atomic disappearance)."""
    if path.name.startswith(_HIDDEN_PREFIXES):
        shutil.rmtree(path, ignore_errors=True)
        return
    trash = path.with_name(f".del-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _step_of(path: Path) -> int | None:
    m = _STEP_RE.match(path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def list_checkpoints(output_dir: Path | str) -> list[tuple[int, Path]]:
    """All ``step-*`` directories under ``output_dir/checkpoints`` as (step, path), oldest first.

    No validity check; see :func:`verify_checkpoint`.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None]
    return sorted(found)


def verify_checkpoint(path: Path | str, verify: bool = False) -> str | None:
    """Return None if the checkpoint at ``path`` is complete, else the reason it is not.

    Checks that ``COMPLETE.json`` exists and parses, names the required files and this directory's
    step, and that every listed file exists with its recorded size (and sha256 when ``verify``).
    """
    path = Path(path)
    marker = path / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} (write did not finish)"
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
        step = int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE}: {e}"
    if manifest.get("format") != FORMAT:
        return f"unknown format {manifest.get('format')!r} (expected {FORMAT!r})"
    dir_step = _step_of(path)
    if dir_step is not None and dir_step != step:
        return f"{COMPLETE} is for step {step}, directory name says {dir_step}"
    missing = [f for f in REQUIRED_FILES if f not in files]
    if missing:
        return f"{COMPLETE} does not list {missing}"
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != rec["size"]:
            return f"{name} has {size} bytes, {COMPLETE} records {rec['size']}"
        if verify and _sha256(f) != rec["sha256"]:
            return f"{name} does not match its recorded sha256"
    return None


# --------------------------------------------------------------------------- save
def _state_dict(obj: Any, what: str) -> dict | None:
    """``obj.state_dict()``, or ``obj`` itself if it is already a captured state dict."""
    if obj is None or isinstance(obj, dict):
        return obj
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(f"{what}: expected an object with state_dict() or a dict, got "
                    f"{type(obj).__name__}")


def save_checkpoint(
    output_dir: Path | str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Atomically write ``output_dir/checkpoints/step-{step:08d}`` and prune old checkpoints.

    Args:
        output_dir: the run directory.
        step: the optimizer step just completed (names the directory).
        model: its trainable parameters (``requires_grad=True``) are saved by name.
        optimizer, scheduler: their ``state_dict()`` is saved (skipped if None); a dict is taken
            as an already captured state dict (:class:`BackgroundSaver`).
        state: the trainer's state (step, :func:`rng_state`, replay buffer, source states); it is
            converted with :func:`to_plain`, which raises ``TypeError`` naming any value that
            cannot be stored safely. The key ``"config"`` is reserved (see :func:`load_checkpoint`).
        config: the run's config, stored as JSON.
        keep: how many complete checkpoints to keep (>= 1); the one just written is always kept.

    Returns the final checkpoint directory. On an exception the temporary directory is removed and
    earlier checkpoints are untouched.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    step = int(step)
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    opt_state, sched_state = _state_dict(optimizer, "optimizer"), _state_dict(scheduler, "scheduler")
    plain_state = to_plain(state)          # fail on unstorable values before touching the disk
    plain_config = json.loads(json.dumps(to_plain(config, "config")))
    tmp.mkdir()
    # each file is hashed by a helper thread while the next one is written (hashlib releases
    # the GIL): ~1 s of a 1.6 GB checkpoint's save off the critical path
    hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agro-ckpt-sha256")
    digests: dict[str, Any] = {}

    def written(path: Path) -> None:
        digests[path.name] = hashing.submit(_sha256, path)

    try:
        trainable = _write_model(tmp / MODEL_FILE, model)
        written(tmp / MODEL_FILE)
        maybe_crash("checkpoint")
        if opt_state is not None:
            _write_torch(tmp / OPTIMIZER_FILE, opt_state)
            written(tmp / OPTIMIZER_FILE)
        if sched_state is not None:
            _write_torch(tmp / SCHEDULER_FILE, sched_state)
            written(tmp / SCHEDULER_FILE)
        _write_torch(tmp / STATE_FILE, plain_state)
        written(tmp / STATE_FILE)
        _write_json(tmp / CONFIG_FILE, plain_config)
        written(tmp / CONFIG_FILE)
        on_disk = sorted(f.name for f in tmp.iterdir())
        if on_disk != sorted(digests):
            raise CheckpointError(f"{tmp}: files {on_disk}, hashed {sorted(digests)}")
        files = {n: {"size": (tmp / n).stat().st_size, "sha256": digests[n].result()}
                 for n in on_disk}
        _write_json(tmp / COMPLETE, {
            "format": FORMAT, "step": step, "time": time.time(),
            "files": files, "trainable_parameters": trainable,
            "torch_version": torch.__version__,
        })
        fsync_path(tmp)
        if final.exists():
            # left by an earlier run that was resumed from before this step: move it aside first
            log.warning("replacing existing checkpoint %s", final)
            _remove_dir(final)
        os.rename(tmp, final)
        fsync_path(root)
    except BaseException:
        hashing.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    hashing.shutdown(wait=True)
    _prune(root, step, keep)
    return final


class BackgroundSaver:
    """Writes checkpoints on one background thread, so a save overlaps the next step's sampling
    and scoring instead of stopping them (~5 s per save of SmolLM2-135M with its AdamW state,
    six times in the default job).

    :meth:`submit` captures everything that changes before the next optimizer step *now* (the
    optimizer's and scheduler's state dicts, the trainer state converted by :func:`to_plain`, the
    config); the parameters and the optimizer's state tensors are written from the live tensors,
    without a copy, so the caller must call :meth:`wait` before anything modifies them (the
    trainer does it right before ``optimizer.step()``, before the next save, and before it
    returns). :meth:`wait` re-raises an error of the write. A process killed mid-write leaves
    what a synchronous save would: a hidden ``.tmp-*`` directory and the earlier checkpoints.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agro-ckpt")
        self._pending = None

    def submit(self, output_dir, step, model, optimizer, scheduler, state, config, keep=2) -> Path:
        self.wait()
        opt = optimizer.state_dict() if optimizer is not None else None
        sched = scheduler.state_dict() if scheduler is not None else None
        plain, conf = to_plain(state), json.loads(json.dumps(to_plain(config, "config")))
        self._pending = self._pool.submit(save_checkpoint, output_dir, step, model, opt, sched,
                                          plain, conf, keep=keep)
        return Path(output_dir) / "checkpoints" / f"step-{int(step):08d}"

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def wait(self) -> Path | None:
        """Block until the pending write is finished; its path, or None if none was pending."""
        fut = self._pending
        if fut is None:
            return None
        try:
            return fut.result()
        finally:
            if fut.done():          # an interrupt while waiting keeps the write pending
                self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _prune(root: Path, current_step: int, keep: int) -> None:
    """Keep the newest ``keep`` valid checkpoints with step <= ``current_step``; delete the rest.

    Also deletes hidden leftovers (``.tmp-*`` from crashed writes, ``.del-*`` from crashed deletes)
    and checkpoints newer than ``current_step`` (an abandoned timeline; see the module docstring).
    """
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_HIDDEN_PREFIXES):
            log.info("removing leftover %s", p)
            shutil.rmtree(p, ignore_errors=True)
    kept = 0
    for step, p in reversed(list_checkpoints(root.parent)):
        if step > current_step:
            log.warning("removing checkpoint %s: newer than the step just saved (%d), it belongs "
                        "to an abandoned run that was resumed from an earlier checkpoint",
                        p, current_step)
            _remove_dir(p)
        elif kept < keep and verify_checkpoint(p) is None:
            kept += 1
        else:
            _remove_dir(p)


# --------------------------------------------------------------------------- find / load
def latest_checkpoint(output_dir: Path | str, verify: bool = False) -> Path | None:
    """The newest complete checkpoint under ``output_dir/checkpoints``, or None.

    Candidates are tried from the highest step down; one whose ``COMPLETE.json`` is missing or
    whose files do not match their recorded sizes (and sha256 if ``verify``) is skipped with a
    ``logging`` warning naming it and the reason.
    """
    for _, p in reversed(list_checkpoints(output_dir)):
        reason = verify_checkpoint(p, verify=verify)
        if reason is None:
            return p
        log.warning("skipping incomplete or corrupted checkpoint %s: %s", p, reason)
    return None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, or RuntimeError wrapping it
        raise CheckpointError(
            f"cannot load {path} with torch.load(weights_only=True): it holds something other "
            "than tensors and plain Python types (or is corrupted). agro never unpickles code "
            "from a checkpoint; convert such values to plain types before saving. "
            f"Original error: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


def _load_model(path: Path, model: torch.nn.Module) -> None:
    """Copy the saved trainable parameters into ``model``; the trainable sets must match exactly."""
    saved = load_file(str(path), device="cpu")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        def _fmt(names: list[str]) -> str:
            return ", ".join(names[:8]) + (f" ... ({len(names)} in all)" if len(names) > 8 else "")
        raise CheckpointError(
            f"{path}: the checkpoint's trainable parameters do not match the model's "
            f"({len(saved)} saved, {len(params)} trainable in the model). "
            + (f"Missing from the checkpoint: {_fmt(missing)}. " if missing else "")
            + (f"In the checkpoint but not trainable in the model: {_fmt(unexpected)}. "
               if unexpected else "")
            + "Was the model built with the same architecture and LoRA settings?")
    bad = [f"{n}: saved {tuple(saved[n].shape)}, model {tuple(p.shape)}"
           for n, p in params.items() if saved[n].shape != p.shape]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch: " + "; ".join(bad[:8]))
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].dtype != p.dtype:
                log.warning("%s: %s saved as %s, cast to %s", path, n, saved[n].dtype, p.dtype)
            p.copy_(saved[n])


def load_checkpoint(
    path: Path | str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``/``scheduler`` if given).

    Verifies the files against ``COMPLETE.json`` first (sizes; sha256 when ``verify``). Every
    ``torch.load`` uses ``weights_only=True``. Model parameters are matched by name against the
    model's trainable set, strictly (a clear :class:`CheckpointError` on any mismatch).

    Returns the saved trainer state with the run's config added under ``"config"``. The RNG
    states are *not* restored here: call ``set_rng_state(state["rng"])`` (or wherever the
    trainer stored them) once everything else is rebuilt.
    """
    path = Path(path)
    reason = verify_checkpoint(path, verify=verify)
    if reason is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {reason}")
    _load_model(path / MODEL_FILE, model)
    if optimizer is not None:
        if not (path / OPTIMIZER_FILE).is_file():
            raise CheckpointError(f"{path} has no {OPTIMIZER_FILE} but an optimizer was given")
        optimizer.load_state_dict(_torch_load(path / OPTIMIZER_FILE))
    if scheduler is not None:
        if not (path / SCHEDULER_FILE).is_file():
            raise CheckpointError(f"{path} has no {SCHEDULER_FILE} but a scheduler was given")
        scheduler.load_state_dict(_torch_load(path / SCHEDULER_FILE))
    state = _torch_load(path / STATE_FILE)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: expected a dict, found {type(state).__name__}")
    if "config" in state:
        log.warning("%s: the state's own 'config' key is replaced by config.json", path)
    state["config"] = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    return state

