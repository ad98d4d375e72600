"""Runs a validated `LabConfig` (agro.config): the tabular experiments of agro_math.md §9 (Figure 1)
and §4.6 (the on-policy pitfall).

    agro lab figure1 out=DIR [steps=N instances=N seed=S ...]
    agro lab pitfall out=DIR [steps=N betas=0.1,0.3 lr_coefs=1,0 ...]

Arguments are parsed by `agro.cli.cmd_lab` like every other `agro` command (YAML file and/or
``key=value``, `--help` lists the fields); this module maps the config onto the keyword arguments
of `agro.lab.experiments.figure1` / `pitfall` and calls it.
"""
from __future__ import annotations

from agro.config import LabConfig

__all__ = ["experiment_kwargs", "run_lab"]


def experiment_kwargs(cfg: LabConfig) -> dict:
    """The keyword arguments of the experiment function named by ``cfg.experiment`` (all but
    out_dir and verbose): the fields it takes, 0 in steps/instances/log_every replaced by that
    experiment's default, lists as tuples."""
    out = {}
    for k in LabConfig.TAKES[cfg.experiment]:
        v = getattr(cfg, k)
        if k in LabConfig.DEFAULTS[cfg.experiment] and v == 0:
            v = LabConfig.DEFAULTS[cfg.experiment][k]
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


def run_lab(cfg: LabConfig) -> dict:
    """Run the experiment (on one intra-op thread: tiny tensors) and return its summary."""
    import torch

    from agro.lab import experiments

    torch.set_num_threads(1)
    fn = {"figure1": experiments.figure1, "pitfall": experiments.pitfall}[cfg.experiment]
    return fn(cfg.out, **experiment_kwargs(cfg))
