r"""Agreement of agro's reward (agro_math.md §8) with a public, held-out set of answer-equivalence
cases: the regression tests in math-verify 0.9.0's sdist (issue 8).

Command (from the repo root; about 30 s on the 2-core CI machine, one process plus agro's sandbox):

    .venv/bin/python bench/grading_agreement.py --sdist /path/to/math_verify-0.9.0.tar.gz

Without ``--sdist`` (or ``$AGRO_MATH_VERIFY_SDIST``, a .tar.gz or an extracted directory) the
sdist is looked for in ``--cache`` (default ``bench/.cache/math-verify-sdist``, git-ignored) and
otherwise fetched there with ``pip download --no-deps --no-binary :all: math-verify==0.9.0``
(hash-pinned). ``--json PATH`` also writes every verdict; ``--show N`` lists N disagreements
(default 30). Measured figures and the kinds of disagreement: docs/RESULTS.md, "Reward agreement
on a public held-out set"; the same measurement runs in tests/test_public_equivalence.py.

The cases. agro's rules were tuned on its own 289 cases (tests/equivalence_cases.py), so its 1.000
there is a ceiling. math-verify ships its regression tests in its sdist on PyPI (MIT licence):
pytest functions parametrized with (gold, prediction, expected 0/1) that call a helper
``compare_strings(gold, pred, match_types=[...], precision=..., ...)`` or ``verify(parse(gold),
parse(pred))`` directly. They are read at run time from the downloaded sdist; nothing of them is
copied into this repository. ``load_cases`` imports each test module from the extracted sdist and
calls every parametrized test function once per parameter set, with ``parse``, ``verify`` and
``sympy_expr_eq`` in the modules' namespaces replaced by recorders (``parse`` still runs, so the
recorder knows what math-verify extracted under the test's own configuration). A parameter set is
kept when it makes exactly one ``verify`` call on two parsed strings with a 0/1 expected verdict,
and its configuration is math-verify's default or equivalent to it:

* ``verify`` keyword arguments equal to their defaults (``float_rounding=6``, ``strict=True``,
  ``allow_set_relation_comp=False``, ...); other values are skipped (they test a switch);
* the extraction config: most cases use ``LatexExtractionConfig(boxed_match_priority=0)`` and/or
  ``ExprExtractionConfig``, not ``parse``'s defaults. Such a case is kept when ``parse`` with its
  defaults extracts the same thing (same Sympy object and string) from both gold and prediction as
  the test's own config; then its verdict is a statement about the default configuration. This
  check never looks at the expected verdict;
* not parametrized (timeouts, raising, configs, Sympy-object tests), no 0/1 verdict (string
  extraction) or calls to ``sympy_expr_eq`` on Sympy objects: skipped;
* a repeat of an earlier (gold, prediction, verdict) triple: skipped, so each pair counts once.

The set is held out for agro, not for math-verify: these are math-verify's own regression tests,
so (a) is close to 1 by construction. What the figures show is where agro's own rules (extraction,
exact numbers, ordered lists, stated precision; see ``agro.rewards``) turn a verdict that
math-verify gets right into a wrong one, and the reverse.

Graders, each on every kept case:
(a) ``math-verify``: ``verify(parse(gold), parse(pred))`` with all defaults (trusted input only:
    its expression parser ``eval``s);
(b) ``is_equivalent``: ``agro.grading.is_equivalent(gold, pred)``;
(c) ``math_reward``: ``agro.grading.math_reward([pred], [gold])``, the prediction as a completion
    (one batched call; it runs the same code path as (b), so (b) and (c) differ only on timeouts);
(d) ``unordered``: ``Grader(ordered_lists=False).equivalent`` (agro with math-verify's set
    semantics for bare lists), to separate that deliberate policy from other differences.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import itertools
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

SDIST_VERSION = "0.9.0"
SDIST_NAME = f"math_verify-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "45ac6c61344ba056b9e99a660a4bc8d044ed408f730aed68c60435aa5eec4645"  # PyPI, 2026-11
ENV_VAR = "AGRO_MATH_VERIFY_SDIST"
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache" / "math-verify-sdist"  # git-ignored
GRADERS = ("math-verify", "is_equivalent", "math_reward", "unordered")
_PKG = "_agro_mv_public_tests"  # private module namespace for the imported test modules
_PATCHED = ("parse", "verify", "sympy_expr_eq")


class Case(NamedTuple):
    """One kept case: ``id`` is ``file::test[index]`` (index in the parameter product)."""

    file: str
    test: str
    index: int
    gold: str
    pred: str
    expected: int

    @property
    def id(self) -> str:
        return f"{self.file}::{self.test}[{self.index}]"


class Skip(NamedTuple):
    """A skipped parameter set (or a whole non-parametrized test function: ``index`` -1)."""

    file: str
    test: str
    index: int
    reason: str


# ------------------------------------------------------------------------------------------------
# Getting the sdist
# ------------------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def find_sdist(cache_dirs: list[Path | str] | Path | str | None = None, download: bool = True,
               timeout: float = 60.0) -> tuple[Path | None, str]:
    """``(path, how)`` of math-verify's sdist (a ``.tar.gz`` or an extracted directory), or
    ``(None, why not)``. Order: ``$AGRO_MATH_VERIFY_SDIST``; ``SDIST_NAME`` with the pinned hash
    in one of ``cache_dirs`` (default ``[DEFAULT_CACHE]``); else, if ``download``, ``pip download``
    into the first of them (hash-checked by pip, at most ``timeout`` seconds)."""
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        return (p, f"${ENV_VAR}") if p.exists() else (None, f"${ENV_VAR}={env} does not exist")
    if cache_dirs is None:
        cache_dirs = [DEFAULT_CACHE]
    elif isinstance(cache_dirs, (str, Path)):
        cache_dirs = [cache_dirs]
    caches = [Path(c) for c in cache_dirs]
    for cache in caches:
        cached = cache / SDIST_NAME
        if cached.is_file() and sha256(cached) == SDIST_SHA256:
            return cached, f"cached in {cache}"
    if not download:
        return None, f"not in {', '.join(map(str, caches))} and downloading is off"
    cache = caches[0]
    cache.mkdir(parents=True, exist_ok=True)
    req = cache / "requirements.txt"  # --require-hashes: pip checks the file against the pin
    req.write_text(f"math-verify=={SDIST_VERSION} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--require-hashes", "--disable-pip-version-check", "--timeout", "10", "--retries", "1",
           "-q", "-d", str(cache), "-r", str(req)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError) as e:
        return None, f"pip download failed: {e}"
    cached = cache / SDIST_NAME
    if r.returncode != 0 or not cached.is_file():
        return None, "pip download failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return cached, f"pip download into {cache}"


def extract_tests(sdist: Path | str, dest: Path | str) -> Path:
    """The ``tests`` directory of the sdist: ``sdist`` itself if it is an extracted directory (or
    its ``tests``), else the tarball's ``tests/*.py`` and ``PKG-INFO`` extracted under ``dest``.
    A tarball must have the pinned SHA-256 (so that the figures are reproducible)."""
    sdist = Path(sdist)
    if sdist.is_dir():
        tests = sdist if sdist.name == "tests" else sdist / "tests"
        if not (tests / "test_all.py").is_file():
            raise FileNotFoundError(f"no tests/test_all.py under {sdist}")
        return tests
    digest = sha256(sdist)
    if digest != SDIST_SHA256:
        raise ValueError(f"{sdist}: sha256 {digest}, expected {SDIST_SHA256} (math-verify {SDIST_VERSION})")
    dest = Path(dest)
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if not m.isfile() or m.name.startswith("/") or ".." in parts or len(parts) < 2:
                continue
            if (parts[1] == "tests" and m.name.endswith(".py")) or parts[1:] == ("PKG-INFO",):
                members.append(m)
        tar.extractall(dest, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    roots = {Path(m.name).parts[0] for m in members}
    if len(roots) != 1:
        raise ValueError(f"{sdist}: unexpected layout {sorted(roots)}")
    return dest / roots.pop() / "tests"


# ------------------------------------------------------------------------------------------------
# Reading the cases off math-verify's test functions
# ------------------------------------------------------------------------------------------------

class _Parsed(list):
    """What the ``parse`` recorder returns: the real result, plus how it was called."""

    text: Any
    config: dict[str, Any]


def _non_default(fn: Callable[..., Any], args: tuple, kwargs: dict, skip_first: int) -> dict[str, Any]:
    """Arguments of a call to ``fn`` that differ from its defaults (the first ``skip_first``
    positional parameters are the data, not configuration)."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        if list(sig.parameters).index(name) < skip_first:
            continue
        default = sig.parameters[name].default
        try:
            same = value == default or (isinstance(value, (list, tuple)) and isinstance(default, (list, tuple))
                                        and list(value) == list(default))
        except Exception:  # noqa: BLE001  (odd __eq__)
            same = False
        if not same:
            out[name] = value
    return out


@contextlib.contextmanager
def _recording(namespaces: list[dict[str, Any]], real: dict[str, Callable[..., Any]],
               calls: list[tuple[str, Any]]) -> Iterator[None]:
    """Replace ``parse``/``verify``/``sympy_expr_eq`` in ``namespaces`` by recorders."""

    def parse(*args: Any, **kwargs: Any) -> _Parsed:
        out = _Parsed(real["parse"](*args, **kwargs))
        out.text = args[0] if args else kwargs.get("pred")
        out.config = _non_default(real["parse"], args, kwargs, 1)
        return out

    def verify(*args: Any, **kwargs: Any) -> bool:
        calls.append(("verify", (args, kwargs)))
        return False

    def sympy_expr_eq(*args: Any, **kwargs: Any) -> bool:
        calls.append(("sympy_expr_eq", None))
        return False

    fakes = {"parse": parse, "verify": verify, "sympy_expr_eq": sympy_expr_eq}
    saved = [(ns, name, ns[name]) for ns in namespaces for name in _PATCHED if name in ns]
    for ns, name, _ in saved:
        ns[name] = fakes[name]
    try:
        yield
    finally:
        for ns, name, value in saved:
            ns[name] = value


def _import_tests(tests_dir: Path) -> dict[str, types.ModuleType | Exception]:
    """Import every ``test_*.py`` of ``tests_dir`` under a private package name. Their
    ``from tests.test_all import ...`` is served by a temporary ``tests`` alias."""
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [str(tests_dir)]
    saved = {k: sys.modules.get(k) for k in ("tests", "tests.test_all")}
    sys.modules[_PKG] = pkg
    modules: dict[str, types.ModuleType | Exception] = {}
    try:
        sys.modules["tests"] = pkg
        for path in sorted(tests_dir.glob("test_*.py"), key=lambda p: (p.name != "test_all.py", p.name)):
            name = f"{_PKG}.{path.stem}"
            try:
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                mod = importlib.util.module_from_spec(spec)
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
                modules[path.name] = mod
                if path.name == "test_all.py":
                    sys.modules["tests.test_all"] = mod
            except Exception as e:  # noqa: BLE001  (reported as a skipped file)
                modules[path.name] = e
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return modules


def _param_sets(fn: Callable[..., Any]) -> list[tuple[dict[str, Any], str | None]] | None:
    """``[(params, reason_to_skip or None)]`` from the ``parametrize`` marks of ``fn``, or None
    if it is not parametrized. Several marks give their product, as pytest does."""
    marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
    if not marks:
        return None
    axes = []
    for m in marks:
        names = m.args[0] if not isinstance(m.args[0], str) else [n.strip() for n in m.args[0].split(",")]
        names = [n for n in names if n]
        axis = []
        for v in m.args[1]:
            skip = None
            if type(v).__name__ == "ParameterSet":
                if any(mk.name in ("skip", "skipif", "xfail") for mk in v.marks):
                    skip = "marked skip/xfail in math-verify"
                v = v.values
            values = tuple(v) if len(names) > 1 else (v,)
            if len(values) != len(names):
                axis.append(({}, f"malformed parameter set ({len(values)} values for {len(names)} names)"))
            else:
                axis.append((dict(zip(names, values)), skip))
        axes.append(axis)
    out = []
    for combo in itertools.product(*axes):
        params: dict[str, Any] = {}
        reason = None
        for p, r in combo:
            params.update(p)
            reason = reason or r
        out.append((params, reason))
    return out


def _classify(calls: list[tuple[str, Any]], expected: Any, real: dict[str, Callable[..., Any]]
              ) -> tuple[tuple[str, str] | None, str | None]:
    """``((gold, pred), None)`` for a kept parameter set, else ``(None, reason)``."""
    if expected is None or not (expected in (0, 1) and not isinstance(expected, float)):
        return None, "no 0/1 expected verdict"
    if any(kind == "sympy_expr_eq" for kind, _ in calls):
        return None, "calls sympy_expr_eq on Sympy objects"
    verifies = [c for kind, c in calls if kind == "verify"]
    if len(verifies) != 1:
        return None, f"{len(verifies)} verify calls (not one gold/prediction comparison)"
    args, kwargs = verifies[0]
    gold, pred = (list(args) + [kwargs.get("gold"), kwargs.get("target")])[:2]
    if not (isinstance(gold, _Parsed) and isinstance(pred, _Parsed)
            and isinstance(gold.text, str) and isinstance(pred.text, str)):
        return None, "verify on objects not parsed from strings"
    vconf = _non_default(real["verify"], args, kwargs, 2)
    if vconf:
        return None, "non-default verify: " + ", ".join(f"{k}={v!r}" for k, v in sorted(vconf.items()))
    for side in (gold, pred):
        if side.config and not _same_parse(list(side), real["parse"](side.text)):
            keys = ", ".join(sorted(side.config))
            return None, f"non-default parse ({keys}) extracts differently from the default"
    return (gold.text, pred.text), None


def _same_parse(a: list[Any], b: list[Any]) -> bool:
    from sympy import srepr

    def key(x: Any) -> str:
        return x if isinstance(x, str) else "S:" + srepr(x)

    try:
        return [key(x) for x in a] == [key(x) for x in b]
    except Exception:  # noqa: BLE001
        return False


def load_cases(tests_dir: Path | str) -> tuple[list[Case], list[Skip]]:
    """Kept cases and skipped parameter sets of math-verify's tests in ``tests_dir`` (see the
    module docstring for the rules). Imports and runs math-verify's test code: trusted (the
    package agro depends on; a tarball is checked against the pinned hash, a directory is not)."""
    from math_verify import parse, verify
    from math_verify.grader import sympy_expr_eq

    real = {"parse": parse, "verify": verify, "sympy_expr_eq": sympy_expr_eq}
    modules = _import_tests(Path(tests_dir))
    helper_ns = [m.__dict__ for m in modules.values() if isinstance(m, types.ModuleType)]
    cases: list[Case] = []
    skips: list[Skip] = []
    seen: dict[tuple[str, str, int], Case] = {}
    logging.disable(logging.CRITICAL)
    try:
        for fname, mod in modules.items():
            if isinstance(mod, Exception):
                skips.append(Skip(fname, "*", -1, f"import failed: {type(mod).__name__}: {mod}"))
                continue
            for tname, fn in vars(mod).items():
                if not (tname.startswith("test") and callable(fn)) or getattr(fn, "__module__", None) != mod.__name__:
                    continue
                sets = _param_sets(fn)
                if sets is None:
                    why = "not parametrized (config, timeout, raising or Sympy-object test)"
                    skips.append(Skip(fname, tname, -1, why))
                    continue
                for i, (params, reason) in enumerate(sets):
                    if reason is None and set(inspect.signature(fn).parameters) - set(params):
                        reason = "needs pytest fixtures"
                    if reason is None:
                        calls: list[tuple[str, Any]] = []
                        with _recording(helper_ns, real, calls):
                            try:
                                fn(**params)
                            except AssertionError:
                                pass
                            except Exception as e:  # noqa: BLE001
                                calls.append(("error", e))
                        if any(kind == "error" for kind, _ in calls):
                            reason = "test raised outside its assertion"
                        else:
                            expected = params.get("expected", params.get("result"))
                            pair, reason = _classify(calls, expected, real)
                            if pair is not None:
                                case = Case(fname, tname, i, pair[0], pair[1], int(expected))
                                first = seen.setdefault((case.gold, case.pred, case.expected), case)
                                if first is case:
                                    cases.append(case)
                                    continue
                                reason = f"duplicate of {first.id}"
                    skips.append(Skip(fname, tname, i, reason))
    finally:
        logging.disable(logging.NOTSET)
    return cases, skips


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------

def measure(cases: list[Case], graders: tuple[str, ...] = GRADERS) -> dict[str, list[float]]:
    """Verdict (1.0 / 0.0) of each grader in ``graders`` (see ``GRADERS``) on every case."""
    out: dict[str, list[float]] = {}
    golds, preds = [c.gold for c in cases], [c.pred for c in cases]
    if "math-verify" in graders:
        from math_verify import parse, verify

        logging.disable(logging.CRITICAL)
        try:
            out["math-verify"] = [float(verify(parse(g), parse(p))) for g, p in zip(golds, preds)]
        finally:
            logging.disable(logging.NOTSET)
    if "is_equivalent" in graders:
        from agro.grading import is_equivalent

        out["is_equivalent"] = [float(is_equivalent(g, p)) for g, p in zip(golds, preds)]
    if "math_reward" in graders:
        from agro.grading import math_reward

        out["math_reward"] = [0.0 if r is None else float(r) for r in math_reward(preds, golds)]
    if "unordered" in graders:
        from agro.grading import Grader

        with Grader(ordered_lists=False) as g:
            out["unordered"] = [0.0 if r is None else float(r) for r in g.equivalent(golds, preds).rewards]
    return out


def agreement(verdicts: list[float], cases: list[Case], idx: list[int] | None = None) -> float:
    idx = list(range(len(cases))) if idx is None else idx
    return sum(verdicts[i] == cases[i].expected for i in idx) / max(1, len(idx))


def table(cases: list[Case], skips: list[Skip], verdicts: dict[str, list[float]]) -> str:
    """Per source file and overall: kept / skipped counts and each grader's agreement."""
    files = sorted({c.file for c in cases} | {s.file for s in skips})
    rows = [("file", "kept", "skipped", *verdicts)]
    for f in files:
        idx = [i for i, c in enumerate(cases) if c.file == f]
        nskip = sum(1 for s in skips if s.file == f)
        rows.append((f, str(len(idx)), str(nskip),
                     *((f"{agreement(v, cases, idx):.3f}" if idx else "-") for v in verdicts.values())))
    rows.append(("all", str(len(cases)), str(len(skips)), *(f"{agreement(v, cases):.3f}" for v in verdicts.values())))
    w = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[j]) if j == 0 else c.rjust(w[j]) for j, c in enumerate(r)) for r in rows)


def skip_summary(skips: list[Skip]) -> str:
    counts = collections.Counter((s.file, "duplicate of an earlier case" if s.reason.startswith("duplicate")
                                  else s.reason) for s in skips)
    return "\n".join(f"  {f}: {n} x {reason}" for (f, reason), n in sorted(counts.items()))


def _short(s: str, n: int = 90) -> str:
    s = s.replace("\n", "\\n")
    return s if len(s) <= n else s[: n - 3] + "..."


def disagreements(cases: list[Case], verdicts: dict[str, list[float]], grader: str = "is_equivalent",
                  reference: str = "math-verify") -> tuple[list[int], list[int]]:
    """Indices where ``grader`` is wrong and ``reference`` right, and the reverse."""
    g, r = verdicts[grader], verdicts[reference]
    worse = [i for i, c in enumerate(cases) if g[i] != c.expected and r[i] == c.expected]
    better = [i for i, c in enumerate(cases) if g[i] == c.expected and r[i] != c.expected]
    return worse, better


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", help=f"math-verify {SDIST_VERSION} sdist (.tar.gz or extracted dir); default ${ENV_VAR}")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE), help="where a downloaded sdist is kept")
    ap.add_argument("--no-download", action="store_true", help="never run pip download")
    ap.add_argument("--show", type=int, default=30, help="disagreements to list")
    ap.add_argument("--json", help="write every case and verdict here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    if a.sdist:
        sdist, how = Path(a.sdist), "--sdist"
    else:
        found, how = find_sdist(a.cache, download=not a.no_download)
        if found is None:
            print(f"no math-verify sdist: {how}", file=sys.stderr)
            return 2
        sdist = found
    with tempfile.TemporaryDirectory(prefix="agro-mv-tests-") as tmp:
        tests_dir = extract_tests(sdist, tmp)
        pkg_info = tests_dir.parent / "PKG-INFO"
        if pkg_info.is_file() and f"Version: {SDIST_VERSION}" not in pkg_info.read_text():
            print(f"warning: {pkg_info} is not math-verify {SDIST_VERSION}", file=sys.stderr)
        cases, skips = load_cases(tests_dir)
    t_load = time.perf_counter() - t0
    try:
        installed = importlib.metadata.version("math-verify")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    from agro.grading import default_grader

    grader = default_grader()
    grader.start()
    t1 = time.perf_counter()
    verdicts = measure(cases)
    t_measure = time.perf_counter() - t1
    diag = grader.grade([c.pred for c in cases], [c.gold for c in cases])
    print(f"math-verify {SDIST_VERSION} test suite from {sdist} ({how}); installed math-verify: {installed or '?'}")
    print(f"{len(cases)} cases kept, {len(skips)} skipped (load {t_load:.1f} s, grading {t_measure:.1f} s)\n")
    print("agreement with the expected verdicts\n" + table(cases, skips, verdicts) + "\n")
    print("skipped, per file and reason:\n" + skip_summary(skips) + "\n")
    print(f"agro default grader on the kept cases: {diag.sandboxed} sandboxed, {diag.timeouts} timeouts, "
          f"{diag.errors} errors, {diag.gold_unparsable} unparsable golds")
    split = lambda name: (  # noqa: E731
        sum(1 for i, c in enumerate(cases) if c.expected == 1 and verdicts[name][i] != 1.0),
        sum(1 for i, c in enumerate(cases) if c.expected == 0 and verdicts[name][i] != 0.0))
    for name in verdicts:
        fn, fp = split(name)
        print(f"  {name:>13}: {fn} equivalent pairs scored 0, {fp} non-equivalent pairs scored 1")
    b_vs_c = [cases[i].id for i in range(len(cases)) if verdicts["is_equivalent"][i] != verdicts["math_reward"][i]]
    if b_vs_c:
        print(f"  is_equivalent and math_reward differ on {len(b_vs_c)}: {b_vs_c}")
    worse, better = disagreements(cases, verdicts)
    print(f"\nis_equivalent wrong where raw math-verify is right: {len(worse)}; the reverse: {len(better)}")
    for i in worse[: a.show]:
        c = cases[i]
        tag = " (right with ordered_lists=False)" if verdicts["unordered"][i] == c.expected else ""
        print(f"  {c.id}: expected {c.expected}, agro {int(verdicts['is_equivalent'][i])}{tag}\n"
              f"      gold {_short(c.gold)!r}\n      pred {_short(c.pred)!r}")
    if better:
        print("\nis_equivalent right where raw math-verify is wrong:")
        for i in better[: a.show]:
            c = cases[i]
            print(f"  {c.id}: expected {c.expected}\n      gold {_short(c.gold)!r}\n      pred {_short(c.pred)!r}")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "sdist": str(sdist), "sha256": SDIST_SHA256,
            "cases": [dict(c._asdict(), id=c.id, **{k: v[i] for k, v in verdicts.items()}) for i, c in enumerate(cases)],
            "skipped": [s._asdict() for s in skips],
        }, indent=1))
    print(f"\nwall time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
