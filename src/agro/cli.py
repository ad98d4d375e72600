"""The `agro` command line: train, generate, eval, plot, lab, repro.

Each command parses one typed config (see agro.config) from an optional YAML file and
``key=value`` overrides, validates it before any model loads, then calls the library.
"""
from __future__ import annotations

import sys
from pathlib import Path

USAGE = """usage: agro COMMAND [CONFIG.yaml] [key=value ...]

commands:
  train     RL fine-tuning with AGRO (no arguments: the embedded default job)
            agro train [CONFIG.yaml] [key=value ...] [--resume OUTPUT_DIR]
  generate  sample scored groups and write an offline dataset
            agro generate [CONFIG.yaml] [key=value ...]   (output=FILE.jsonl|.parquet)
  eval      held-out accuracy (greedy and sampled) of a model or a run directory
            agro eval MODEL_OR_RUN [CONFIG.yaml] [key=value ...]
  plot      curves of one or more run directories in one image
            agro plot RUN_DIR... [CONFIG.yaml] [key=value ...]   (out=FILE.png)
  lab       exact tabular experiments (Figure 1 of the paper; the on-policy pitfall)
            agro lab figure1|pitfall [CONFIG.yaml] [key=value ...]   (out=DIR)
  repro     the paper's LLM claims with verdicts, resumable sweeps of the real trainer
            agro repro --list | agro repro c1..c7 --out DIR [--quick] [--render] [key=value ...]

`agro COMMAND --help` lists every field of that command's config.
"""


def _split_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
    """-> (yaml path or None, key=value overrides, remaining flags/positionals)."""
    yaml_path, overrides, rest = None, [], []
    for a in argv:
        if "=" in a and not a.startswith("-"):
            overrides.append(a)
        elif a.endswith((".yaml", ".yml")) and yaml_path is None and not a.startswith("-"):
            yaml_path = a
        else:
            rest.append(a)
    return yaml_path, overrides, rest


def _help(argv: list[str], usage: str, cls) -> bool:
    """Print `usage` and every field of config class `cls` if -h/--help was given."""
    if "-h" not in argv and "--help" not in argv:
        return False
    from .config import format_help

    print(f"usage: {usage}\n")
    print(format_help(cls))
    return True


def _die(msg: str, code: int = 2) -> int:
    print(f"agro: error: {msg}", file=sys.stderr)
    return code


def cmd_train(argv: list[str]) -> int:
    from .config import ConfigError, TrainConfig, load_config

    if _help(argv, "agro train [CONFIG.yaml] [key=value ...] [--resume OUTPUT_DIR]", TrainConfig):
        return 0
    yaml_path, overrides, rest = _split_args(argv)
    resume_dir = None
    if "--resume" in rest:
        i = rest.index("--resume")
        if i + 1 >= len(rest):
            return _die("--resume needs the run's OUTPUT_DIR")
        resume_dir = rest[i + 1]
        del rest[i:i + 2]
    if rest:
        return _die(f"unexpected arguments {rest}; fields are set as key=value "
                    "(see agro train --help)")
    try:
        if resume_dir is not None:
            saved = Path(resume_dir) / "config.yaml"
            if not saved.is_file():
                return _die(f"--resume {resume_dir}: no config.yaml there (not an agro run?)")
            cfg = load_config(TrainConfig, str(saved), overrides + [f"output_dir={resume_dir}"])
        else:
            cfg = load_config(TrainConfig, yaml_path, overrides)
    except ConfigError as e:
        return _die(str(e))

    from .trainer import TrainingAborted, train

    try:
        res = train(cfg, resume=resume_dir is not None)
    except TrainingAborted as e:
        return _die(str(e), 3)
    print(summary_lines(res))
    return 0


def summary_lines(res) -> str:
    lines = ["", f"agro: {res.steps_done} steps done; run directory {res.output_dir}"]
    b, a = res.before, res.after
    if a is not None:
        if b is not None:
            lines.append(f"  held-out sampled accuracy: before {b['sampled_accuracy']:.3f} -> "
                         f"after {a['sampled_accuracy']:.3f}  "
                         f"({int(a.get('sampled_samples', 0))} samples each)")
            lines.append(f"  mean completion length:    before {b['sampled_len_mean']:.1f} -> "
                         f"after {a['sampled_len_mean']:.1f} tokens")
        else:
            lines.append(f"  held-out sampled accuracy: {a['sampled_accuracy']:.3f}")
        if "kl_pi_ref" in a:
            lines.append(f"  KL(pi || pi_ref) moved:    {b.get('kl_pi_ref', 0.0) if b else 0.0:.4f}"
                         f" -> {a['kl_pi_ref']:.4f} nats per completion")
    if res.final_dir:
        lines.append(f"  model (transformers):      {res.final_dir}")
    if res.plot_path:
        lines.append(f"  plot:                      {res.plot_path}")
    return "\n".join(lines)


def cmd_generate(argv: list[str]) -> int:
    from .config import ConfigError, GenerateConfig, load_config

    if _help(argv, "agro generate [CONFIG.yaml] [key=value ...]", GenerateConfig):
        return 0
    yaml_path, overrides, rest = _split_args(argv)
    if rest:
        return _die(f"unexpected arguments {rest}")
    try:
        cfg = load_config(GenerateConfig, yaml_path, overrides)
    except ConfigError as e:
        return _die(str(e))
    from .workflows import generate_offline

    path, n_groups = generate_offline(cfg)
    print(f"agro: wrote {n_groups} groups to {path}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from .config import ConfigError, EvalConfig, load_config

    if _help(argv, "agro eval MODEL_OR_RUN [CONFIG.yaml] [key=value ...]", EvalConfig):
        return 0
    yaml_path, overrides, rest = _split_args(argv)
    if len(rest) > 1 or any(r.startswith("-") for r in rest):
        return _die(f"unexpected arguments {rest}")
    from .workflows import eval_defaults_from_run

    pre = eval_defaults_from_run(rest[0]) if rest else []
    try:
        cfg = load_config(EvalConfig, yaml_path, pre + overrides)
    except ConfigError as e:
        return _die(str(e))
    from .workflows import run_eval

    res = run_eval(cfg)
    print(f"agro eval: {cfg.model}")
    for k in sorted(res):
        v = res[k]
        print(f"  {k:24s} {v:.4f}" if isinstance(v, float) else f"  {k:24s} {v}")
    return 0


def _out_flag(rest: list[str]) -> tuple[list[str], list[str]]:
    """``--out X`` (the form of older docs) -> the override ``out=X``; -> (overrides, rest)."""
    rest = list(rest)
    if "--out" not in rest:
        return [], rest
    i = rest.index("--out")
    if i + 1 >= len(rest):
        return ["--out"], rest[:i]          # load_config then reports "expected key=value"
    value = rest[i + 1]
    del rest[i:i + 2]
    return [f"out={value}"], rest


def cmd_plot(argv: list[str]) -> int:
    import json

    from .config import ConfigError, PlotConfig, load_config

    if _help(argv, "agro plot RUN_DIR... [CONFIG.yaml] [key=value ...]", PlotConfig):
        return 0
    yaml_path, overrides, rest = _split_args(argv)
    out, rest = _out_flag(rest)
    flags = [r for r in rest if r.startswith("-")]
    if flags:
        return _die(f"unexpected arguments {flags}; fields are set as key=value "
                    "(see agro plot --help)")
    if rest and any(o.split("=", 1)[0].strip() == "runs" for o in overrides):
        return _die("give the run directories as positionals or as runs=..., not both")
    pre = [f"runs={json.dumps(rest)}"] if rest else []
    try:
        cfg = load_config(PlotConfig, yaml_path, pre + out + overrides)
    except ConfigError as e:
        return _die(str(e))
    from .plotting import plot_runs

    dest = cfg.out or (Path(cfg.runs[0]) / "curves.png" if len(cfg.runs) == 1 else "agro_runs.png")
    try:
        path = plot_runs(cfg.runs, dest, labels=cfg.labels or None, smooth=cfg.smooth)
    except (FileNotFoundError, ValueError) as e:
        return _die(str(e), 1)
    print(f"agro plot: wrote {path}")
    return 0


def cmd_lab(argv: list[str]) -> int:
    from .config import ConfigError, LabConfig, load_config

    if _help(argv, "agro lab figure1|pitfall [CONFIG.yaml] [key=value ...]", LabConfig):
        return 0
    yaml_path, overrides, rest = _split_args(argv)
    out, rest = _out_flag(rest)
    pre = [f"experiment={rest.pop(0)}"] if rest and not rest[0].startswith("-") else []
    if rest:
        return _die(f"unexpected arguments {rest}; fields are set as key=value "
                    "(see agro lab --help)")
    if not pre and yaml_path is None and not any(o.startswith("experiment=") for o in overrides):
        return _die("name the experiment: agro lab figure1|pitfall [key=value ...] "
                    "(see agro lab --help)")
    try:
        cfg = load_config(LabConfig, yaml_path, pre + out + overrides)
    except ConfigError as e:
        return _die(str(e))
    from .lab.cli import run_lab

    run_lab(cfg)
    return 0


def cmd_repro(argv: list[str]) -> int:
    from .config import ConfigError, ReproConfig, load_config

    usage = "agro repro --list | agro repro c1..c7 --out DIR [--quick] [--render] [CONFIG.yaml] [key=value ...]"
    if _help(argv, usage, ReproConfig):
        return 0
    if "--list" in argv:
        from .repro.claims import ARMS, CLAIMS

        for c in CLAIMS.values():
            print(f"{c.name}  {c.title}")
            print(f"    arms: {', '.join(c.arms)}")
        print(f"\n{len(ARMS)} arms in all; an arm shared by claims runs once per seed "
              "and code revision.")
        return 0
    yaml_path, overrides, rest = _split_args(argv)
    out, rest = _out_flag(rest)
    flags = [f"{f[2:]}=true" for f in ("--quick", "--render") if f in rest]
    rest = [r for r in rest if r not in ("--quick", "--render")]
    pre = [f"claim={rest.pop(0)}"] if rest and not rest[0].startswith("-") else []
    if rest:
        return _die(f"unexpected arguments {rest}; fields are set as key=value "
                    "(see agro repro --help)")
    if not pre and yaml_path is None and not any(o.startswith("claim=") for o in overrides):
        return _die(f"name the claim: {usage}")
    try:
        cfg = load_config(ReproConfig, yaml_path, pre + out + flags + overrides)
    except ConfigError as e:
        return _die(str(e))
    from .repro.ledger import LedgerError
    from .repro.runner import SweepError, run_sweep

    try:
        verdict, left = run_sweep(cfg.claim, cfg.out, quick=cfg.quick, store=cfg.store or None,
                                  seeds=cfg.seeds or None, arms=cfg.arms or None,
                                  max_runs=cfg.max_runs, reuse=cfg.reuse,
                                  render_only=cfg.render)
    except (SweepError, LedgerError) as e:
        return _die(str(e))
    print(f"agro repro {cfg.claim}: {verdict['verdict']}"
          + (f" (pitfall: {verdict['pitfall_verdict']})" if "pitfall_verdict" in verdict else ""))
    print(f"  wrote {Path(cfg.out) / 'verdict.md'}, runs.csv, arms.yaml and the plots")
    print(f"  runs still pending: {left}")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval,
            "plot": cmd_plot, "lab": cmd_lab, "repro": cmd_repro}


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv`` None: this process's arguments, and the command may re-execute
    itself on jemalloc, :mod:`agro.allocator`; a list: a call from Python, which never does)."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        return _die(f"unknown command {cmd!r}; valid: {', '.join(COMMANDS)}")
    if from_shell:
        from .allocator import cap_onednn_caches, maybe_reexec

        cap_onednn_caches()          # before any oneDNN primitive; the re-exec inherits it
        try:
            maybe_reexec()
        except (RuntimeError, ValueError) as e:
            return _die(str(e))
    return COMMANDS[cmd](rest)


if __name__ == "__main__":
    sys.exit(main())
