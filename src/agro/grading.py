r"""Time-bounded, sandboxed grading of untrusted model answers (agro_math.md §8, "prompt/reward").

The paper parses the answer after "The final answer is" and matches it to the ground truth with
Sympy (reward 1/0). This module holds the public reward API (``math_reward``, ``is_equivalent``,
``Grader``, ``default_grader``); ``agro.rewards`` holds the answer extraction and matching rules,
and lists where they depart from the paper (more extraction fallbacks, math-verify instead of a
bare Sympy match, ordered lists, stated precision).

Model text is untrusted. Sympy can run for minutes or fill the memory on ``9^{9^{9^{9}}}`` or
``1000000!``, and math-verify's own timeout uses ``signal.alarm``, which only works in the main
thread. ``Grader`` bounds each item's wall time with processes instead, which works from any
thread, a DataLoader worker or a subprocess:

    trainer process                     zygote (fresh interpreter,     grader (fork of the zygote)
                                        started by Grader.start() or
                                        on the first hard item)
    Grader.grade: extract, fast path
      --- JSON jobs ----------------->  relays one job at a time  --->  math-verify on one item
      <-- JSON results --------------   poll(deadline); past it,  <---  result
                                        SIGKILL the grader and fork
                                        a fresh one (~5 ms)

* Most items never leave the trainer process: extraction, length caps, exact comparison of plain
  numbers and string normalisation run there in linear time (``agro.rewards.triage``).
* The zygote is started with ``subprocess`` rather than ``multiprocessing``, so it also starts from
  daemonic processes (DataLoader workers), never re-imports the trainer's ``__main__`` and never
  inherits its threads. It loads ``rewards.py`` and this file by path (not via ``agro``, so
  never torch), imports math-verify and warms its caches once (about 3 s; ``Grader.start()``
  begins this in the background so that it overlaps model loading). Each grader is a ``fork`` of
  it, so restarting after a timeout costs milliseconds, not an interpreter start. The zygote is
  single-threaded, so forking it is safe.
* Only JSON crosses the process boundary (no pickle). Grader processes run under an address-space
  limit and die with the zygote, and the zygote exits when the trainer closes the connection.
  Nothing is ever evaluated as Python code (see ``agro.rewards``).

A timed-out or crashed item scores 0.0 and is counted in ``GradeResult``; the run goes on.
The time that a fresh zygote takes to start is not counted against any item.

>>> math_reward(["... so the answer is \\boxed{0.75}.", "The final answer is 3/4."], ["\\frac{3}{4}", "0.75"])
[1.0, 1.0]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["GradeResult", "Grader", "default_grader", "is_equivalent", "math_reward"]

_STARTUP_TIMEOUT = 180.0  # seconds for a new zygote to import math-verify (machine may be busy)
_SAFETY_SLACK = 10.0  # extra seconds the trainer waits before declaring the zygote itself hung
_CHUNK = 256  # jobs per message to the zygote


@dataclass
class GradeResult:
    """Outcome of one ``Grader.grade`` call.

    Attributes:
        rewards: [N] 1.0 / 0.0 per completion, or None where the gold answer cannot be parsed.
        timeouts: items whose comparison passed the deadline (scored 0.0).
        errors: items whose grading raised or whose grader process died (scored 0.0).
        gold_unparsable: items with reward None.
        seconds: wall time of the whole call.
        sandboxed: items that needed Sympy, i.e. went to the grader process.
        max_item_seconds: longest time spent on one item (trainer-side work plus sandbox time,
            excluding a zygote start-up).
    """

    rewards: list[float | None]
    timeouts: int = 0
    errors: int = 0
    gold_unparsable: int = 0
    seconds: float = 0.0
    sandboxed: int = 0
    max_item_seconds: float = 0.0


class _SandboxFailure(Exception):
    """The zygote died or broke the protocol."""


class _SandboxHung(_SandboxFailure):
    """The zygote did not answer within the item deadline plus ``_SAFETY_SLACK``."""


class Grader:
    """Grades completions against gold answers with a per-item wall-time bound.

    Args:
        timeout: seconds one item may spend in Sympy before it scores 0.0 (a timeout).
        max_chars: only the last ``max_chars`` characters of a completion are searched.
        max_answer_chars: longer extracted answers score 0.0 without reaching Sympy.
        memory_mb: address-space limit of each grader process (None: no limit).
        child_max_jobs: a grader process is replaced after this many items (bounds cache growth).
        ordered_lists: a gold answer written as a bare list "a, b, c" is ordered (a permutation
            scores 0), as in MATH's reference grader; False compares such lists as sets, as
            math-verify does. Set braces ``\\{...\\}`` always make a set, parentheses a tuple.

    Thread-safe (calls are serialised). Call ``start()`` right after construction so that the
    sandbox starts while the model loads; otherwise the first item that needs Sympy waits for it
    (about 3 s, not counted against the item). A ``Grader`` copied into a forked process (e.g. a
    DataLoader worker) starts its own zygote there. Use ``close()`` or ``with Grader() as g:``.
    """

    def __init__(
        self,
        timeout: float = 1.0,
        max_chars: int = 65_536,
        max_answer_chars: int = 512,
        memory_mb: int | None = 2048,
        child_max_jobs: int = 5000,
        ordered_lists: bool = True,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if max_chars < 1 or max_answer_chars < 1 or child_max_jobs < 1:
            raise ValueError("max_chars, max_answer_chars and child_max_jobs must be >= 1")
        from agro import rewards

        self.timeout = float(timeout)
        self.max_chars = int(max_chars)
        self.max_answer_chars = int(max_answer_chars)
        self.memory_mb = memory_mb
        self.child_max_jobs = int(child_max_jobs)
        self.ordered_lists = bool(ordered_lists)
        self.starts = 0  # zygotes started by this Grader in this process
        self._rewards = rewards
        self._lock = threading.Lock()
        self._owner = os.getpid()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._finalizer: weakref.finalize | None = None
        self._ready = False  # the zygote said "ready"

    # ---------------------------------------------------------------- public API
    def grade(self, completions: list[str], answers: list[str]) -> GradeResult:
        """Reward each completion ([N]) against its gold answer ([N]); see ``GradeResult``."""
        return self._grade(list(completions), list(answers))

    def equivalent(self, golds: list[str], preds: list[str]) -> GradeResult:
        """1.0 where answer ``preds[i]`` equals ``golds[i]`` ([N] each). A prediction may be a bare
        answer ("x >= 5") or a short text around one ("so $x = 5$"); it is read exactly like a
        completion. Used by ``is_equivalent``."""
        return self._grade(list(preds), list(golds))

    def start(self) -> Grader:
        """Start the sandbox in the background and return at once (idempotent).

        The zygote then imports math-verify and warms its caches (about 3 s) while the caller
        goes on, e.g. loading the model; ``grade()`` waits for whatever is left of that when it
        first needs the sandbox. Returns ``self``.
        """
        self._fork_check()
        if self._lock.acquire(blocking=False):  # else a grade() in flight starts it anyway
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._spawn()
            finally:
                self._lock.release()
        return self

    def ready(self) -> bool:
        """Whether the sandbox has started and is warm (never blocks; see ``start``)."""
        self._fork_check()
        if not self._lock.acquire(blocking=False):
            return self._ready
        try:
            if self._proc is None or self._proc.poll() is not None or self._conn is None:
                return False
            if not self._ready and self._conn.poll(0):
                self._await_ready()
            return self._ready
        finally:
            self._lock.release()

    def close(self) -> None:
        """Stop the zygote and its grader process. The Grader restarts them if used again."""
        self._fork_check()
        with self._lock:
            self._stop()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- trainer side
    def _grade(self, texts: list[Any], answers: list[Any]) -> GradeResult:
        if len(texts) != len(answers):
            raise ValueError(f"{len(texts)} completions but {len(answers)} answers")
        rw = self._rewards
        t0 = time.perf_counter()
        res = GradeResult(rewards=[0.0] * len(texts))
        item_seconds = [0.0] * len(texts)
        jobs: list[tuple[int, list[Any]]] = []
        golds: dict[Any, str | None] = {}
        for i, (text, answer) in enumerate(zip(texts, answers)):
            ti = time.perf_counter()
            try:
                if isinstance(answer, str):  # a group of n completions shares one gold answer
                    if answer not in golds:
                        golds[answer] = rw.gold_answer(answer, self.max_answer_chars)
                    gold = golds[answer]
                else:
                    gold = rw.gold_answer(answer, self.max_answer_chars)
                if gold is None:
                    res.rewards[i] = None
                    res.gold_unparsable += 1
                else:
                    verdict, pred, tail = rw.triage(gold, text, self.max_chars, self.max_answer_chars)
                    if verdict is None:
                        jobs.append((i, [gold, pred, tail, self.ordered_lists]))
                    else:
                        res.rewards[i] = verdict
            except Exception:  # a bug on odd input must not stop a training run
                res.rewards[i] = 0.0
                res.errors += 1
            item_seconds[i] = time.perf_counter() - ti
        res.sandboxed = len(jobs)
        if jobs:
            self._fork_check()
            with self._lock:
                self._run_jobs(jobs, res, item_seconds)
        res.max_item_seconds = max(item_seconds, default=0.0)
        res.seconds = time.perf_counter() - t0
        return res

    def _run_jobs(self, jobs: list[tuple[int, list[Any]]], res: GradeResult, item_seconds: list[float]) -> None:
        pending = jobs
        while pending:
            self._ensure_started()
            chunk, pending = pending[:_CHUNK], pending[_CHUNK:]
            done = 0
            try:
                self._send({"op": "run", "timeout": self.timeout, "jobs": [args for _, args in chunk]})
                for i, _ in chunk:
                    status, value, seconds = self._recv(self.timeout + _SAFETY_SLACK)
                    self._record(res, item_seconds, i, status, value, float(seconds))
                    done += 1
            except (_SandboxFailure, OSError, EOFError, ValueError, TypeError) as e:
                # The zygote is gone or hung: score the item in flight, restart, resend the rest.
                self._stop()
                i = chunk[done][0]
                hung = isinstance(e, _SandboxHung)
                waited = self.timeout + _SAFETY_SLACK if hung else 0.0
                self._record(res, item_seconds, i, "timeout" if hung else "error", None, waited)
                pending = chunk[done + 1:] + pending
            except BaseException:  # KeyboardInterrupt etc.: do not leave the protocol half-read
                self._stop()
                raise

    @staticmethod
    def _record(res: GradeResult, item_seconds: list[float], i: int, status: str, value: Any, seconds: float) -> None:
        item_seconds[i] += seconds
        if status == "ok" and value is None:
            res.rewards[i] = None
            res.gold_unparsable += 1
        elif status == "ok":
            res.rewards[i] = 1.0 if value is True else 0.0
        else:
            res.rewards[i] = 0.0
            if status == "timeout":
                res.timeouts += 1
            else:
                res.errors += 1

    # ---------------------------------------------------------------- zygote management
    def _fork_check(self) -> None:
        """In a forked copy (e.g. a DataLoader worker), forget the parent's zygote: it belongs to
        the parent process. Close only this process's copy of the socket."""
        if os.getpid() != self._owner:
            if self._finalizer is not None:
                self._finalizer.detach()
            if self._conn is not None:
                try:
                    self._conn.close()
                except OSError:
                    pass
            self._proc = self._conn = self._finalizer = None
            self._ready = False
            self._lock = threading.Lock()
            self._owner = os.getpid()
            self.starts = 0

    def _ensure_started(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._stop()
            self._spawn()
        if not self._ready:
            self._await_ready()

    def _spawn(self) -> None:
        """Start a zygote without waiting for it (a few ms: fork and exec)."""
        here = Path(__file__).resolve().parent
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        boot = (
            "import sys, importlib.util as u\n"
            "s = u.spec_from_file_location('_agro_sandbox_grading', sys.argv[1])\n"
            "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)\n"
            "m._zygote_main(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))\n"
        )
        cmd = [
            sys.executable, "-I", "-c", boot, str(here / "grading.py"), str(fd),
            str(here / "rewards.py"), str(int(self.memory_mb or 0)), str(self.child_max_jobs),
        ]
        try:
            proc = subprocess.Popen(
                cmd, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal goes to the trainer only
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        self._proc, self._conn = proc, conn
        self._finalizer = weakref.finalize(self, _shutdown, proc, conn, os.getpid())
        self.starts += 1

    def _await_ready(self) -> None:
        """Wait for the zygote's greeting (it has imported math-verify and warmed up)."""
        try:
            msg = self._recv(_STARTUP_TIMEOUT)
        except (_SandboxFailure, OSError, EOFError, ValueError) as e:
            self._stop()
            raise RuntimeError(
                f"agro.grading: the grading sandbox did not start ({e}); is math-verify installed "
                f"for {sys.executable}?"
            ) from e
        if msg != ["ready"]:
            self._stop()
            raise RuntimeError(f"agro.grading: unexpected sandbox greeting {msg!r}")
        self._ready = True

    def _stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._proc = self._conn = self._finalizer = None
        self._ready = False

    def _send(self, obj: Any) -> None:
        assert self._conn is not None
        self._conn.send_bytes(json.dumps(obj).encode())

    def _recv(self, timeout: float) -> Any:
        assert self._conn is not None
        if not self._conn.poll(timeout):
            raise _SandboxHung(f"no answer from the sandbox within {timeout:.1f} s")
        return json.loads(self._conn.recv_bytes())


def _shutdown(proc: subprocess.Popen, conn: Connection, owner: int) -> None:
    """Stop a zygote (its grader dies with it). Runs at close(), garbage collection or exit."""
    if os.getpid() != owner:
        return
    try:
        conn.send_bytes(b'{"op": "close"}')
    except OSError:
        pass
    try:
        conn.close()
    except OSError:
        pass
    try:
        proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


_default: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The process-wide ``Grader()`` (1 s timeout) behind ``math_reward`` and ``is_equivalent``."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
        return _default


def is_equivalent(gold: str, pred: str) -> bool:
    r"""Whether answer ``pred`` equals answer ``gold``, by the rules of ``agro.rewards``.

    ``pred`` may be a bare answer ("0.75", "x >= 5", "10, 4, -2") or a short text around one
    ("so $x = \frac{3}{4}$"). Plain numbers compare as exact rationals in this process
    ("15" == "15.0", "15,000" == "15000", "\frac{3}{4}" == "0.75"); everything else goes through
    math-verify in the default grader's time-bounded sandbox (a timeout counts as not equivalent).
    False when ``gold`` cannot be parsed.
    """
    return default_grader().equivalent([gold], [pred]).rewards[0] == 1.0


def math_reward(completions: list[str], answers: list[str]) -> list[float | None]:
    r"""Binary reward per completion: 1.0 if its final answer equals the gold answer, else 0.0.

    ``None`` where the gold answer cannot be parsed (skip the example and count it). Gold answers
    may be raw ("\frac{1}{2}", "10") or a GSM8K answer field ("... #### 72"). Each completion is
    graded in at most about 1 s of wall time by ``default_grader()``.

    Shapes: ``completions`` and ``answers`` are [N]; returns [N].
    """
    return default_grader().grade(completions, answers).rewards


# ==================================================================================================
# Sandbox side. Everything below runs in the zygote or in a grader process, never in the trainer.
# ==================================================================================================


def _zygote_main(fd: int, rewards_path: str, memory_mb: int, child_max_jobs: int) -> None:
    """Serve jobs from the trainer on ``fd``: each job runs in a forked grader under a deadline.

    Protocol (JSON messages): trainer -> ``{"op": "run", "timeout": t, "jobs": [args, ...]}`` with
    ``args`` = ``[gold, answer, text, ordered_lists]`` for ``rewards.sandbox_grade``,
    zygote -> one ``[status, value, seconds]`` per job in order, status in {"ok", "timeout",
    "error"}; trainer -> ``{"op": "close"}`` or EOF ends the zygote.
    """
    import ctypes  # noqa: F401  (imported before forking: graders use it for prctl)
    import gc
    import importlib.util

    conn = Connection(fd)
    spec = importlib.util.spec_from_file_location("_agro_sandbox_rewards", rewards_path)
    assert spec is not None and spec.loader is not None
    rewards = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = rewards
    spec.loader.exec_module(rewards)
    rewards.sandbox_warmup()
    gc.collect()
    gc.freeze()  # forked graders then share the warm heap copy-on-write without touching it
    fn = rewards.sandbox_grade

    child: _Child | None = None
    zombies: list[int] = []
    try:
        conn.send_bytes(json.dumps(["ready"]).encode())
        while True:
            try:
                msg = json.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return
            if msg.get("op") != "run":
                return
            timeout = float(msg["timeout"])
            for args in msg["jobs"]:
                if child is None or child.jobs >= child_max_jobs:
                    if child is not None:
                        zombies.append(child.kill())
                    child = _Child.fork(fn, memory_mb, conn)
                t = time.monotonic()
                status, value, alive = child.run(args, timeout)
                seconds = time.monotonic() - t
                if not alive:
                    zombies.append(child.kill())
                    child = _Child.fork(fn, memory_mb, conn)  # ready for the next job
                conn.send_bytes(json.dumps([status, value, seconds]).encode())
                zombies = [pid for pid in zombies if not _reaped(pid)]
    finally:
        if child is not None:
            zombies.append(child.kill())
        for pid in zombies:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return True


class _Child:
    """A grader process forked from the zygote, fed one job at a time over a socket."""

    def __init__(self, pid: int, conn: Connection) -> None:
        self.pid, self.conn, self.jobs = pid, conn, 0

    @classmethod
    def fork(cls, fn: Any, memory_mb: int, upstream: Connection) -> _Child:
        mine, theirs = socket.socketpair()
        zygote = os.getpid()
        pid = os.fork()
        if pid == 0:  # grader process: never return into the zygote's code
            code = 0
            try:
                mine.close()
                upstream.close()  # the trainer must see EOF when the zygote dies
                _child_main(Connection(theirs.detach()), fn, memory_mb, zygote)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        return cls(pid, Connection(mine.detach()))

    def run(self, args: list[Any], timeout: float) -> tuple[str, Any, bool]:
        """(status, value, still_alive) of one job, waiting at most ``timeout`` seconds."""
        self.jobs += 1
        try:
            self.conn.send_bytes(json.dumps(args).encode())
            if not self.conn.poll(timeout):
                return "timeout", None, False
            status, value = json.loads(self.conn.recv_bytes())
            return status, value, True
        except (EOFError, OSError, ValueError):
            return "error", "grader process died", False

    def kill(self) -> int:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.conn.close()
        return self.pid


def _child_main(conn: Connection, fn: Any, memory_mb: int, zygote: int) -> None:
    try:  # die with the zygote (Linux), even in the middle of a long Sympy call
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    if os.getppid() != zygote:  # the zygote died before prctl took effect
        return
    if memory_mb > 0:
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    import warnings

    warnings.simplefilter("ignore")  # Sympy/ANTLR warnings on odd input would flood the trainer's stderr
    while True:
        try:
            args = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            out = ["ok", fn(*args)]
        except BaseException as e:  # MemoryError, RecursionError, ...: report, keep serving
            out = ["error", type(e).__name__]
        conn.send_bytes(json.dumps(out).encode())
