"""`agro lab ...`: command line for the tabular experiments (agro_math.md §9 Figure 1, §4.6 pitfall).

    agro lab figure1 --out DIR [--steps N --instances N --seed S ...]
    agro lab pitfall --out DIR [--steps N --instances N --betas 0.1 0.3 ...]
    python -m agro.lab.cli figure1 --out DIR

The top-level `agro` CLI dispatches `agro lab ...` to `lab_main(argv)`.
"""
from __future__ import annotations

import argparse
import inspect
import sys

import torch

from agro.lab import experiments


def _defaults(fn) -> dict:
    """Keyword defaults of an experiment function, so the CLI never drifts from the library."""
    return {k: p.default for k, p in inspect.signature(fn).parameters.items()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agro lab", description="Exact tabular AGRO experiments.")
    F, Q = _defaults(experiments.figure1), _defaults(experiments.pitfall)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("figure1", help="Figure 1 (§9): AGRO vs KL-PG on off-policy data mu = pi_ref.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("--out", required=True, help="output directory (figure1.csv, figure1.png)")
    f.add_argument("--K", type=int, default=F['K'], help="number of actions")
    f.add_argument("--beta", type=float, default=F['beta'], help="KL coefficient")
    f.add_argument("--n", type=int, default=F['n'], help="samples per update (group size, >= 2)")
    f.add_argument("--eta", type=float, default=F['eta'], help="SGD step size on the logits")
    f.add_argument("--steps", type=int, default=F['steps'], help="number of updates")
    f.add_argument("--instances", type=int, default=F['instances'], help="random problem instances")
    f.add_argument("--log-every", type=int, default=F['log_every'], help="log the metric every N updates")
    f.add_argument("--seed", type=int, default=F['seed'], help="seed of instances and data")
    f.add_argument("--methods", nargs="+", default=list(F['methods']),
                   help="losses to compare (registered names of agro.losses)")
    f.add_argument("--no-plot", action="store_true", help="write the CSV only")

    q = sub.add_parser("pitfall", help="§4.6: on-policy AGRO (Eq. 6) on binary-reward bandits.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--out", required=True, help="output directory (pitfall.csv, pitfall.png)")
    q.add_argument("--K", type=int, default=Q['K'], help="number of arms")
    q.add_argument("--p-ref", type=float, default=Q['p_ref'], help="reference success probability")
    q.add_argument("--successes", type=int, default=Q['successes'], help="arms with reward 1")
    q.add_argument("--n", type=int, default=Q['n'], help="samples per update (group size, >= 2)")
    q.add_argument("--eta", type=float, default=Q['eta'], help="SGD step size on the logits")
    q.add_argument("--steps", type=int, default=Q['steps'], help="number of updates")
    q.add_argument("--instances", type=int, default=Q['instances'], help="random problem instances")
    q.add_argument("--betas", type=float, nargs="+", default=list(Q['betas']), help="KL coefficients")
    q.add_argument("--lr-coefs", type=float, nargs="+", default=list(Q['lr_coefs']),
                   help="weights on the likelihood-ratio part (1 = exact Eq. 6, 0 = PD only)")
    q.add_argument("--lr-baseline", default=Q['lr_baseline'], choices=["none", "loo_var", "loo_sq"],
                   help="baseline c in the LR weight (A^2 - c)")
    q.add_argument("--log-every", type=int, default=Q['log_every'], help="log the metric every N updates")
    q.add_argument("--seed", type=int, default=Q['seed'], help="seed of instances and samples")
    q.add_argument("--no-plot", action="store_true", help="write the CSV only")
    return p


def lab_main(argv: list[str]) -> int:
    """Run `agro lab <command> ...`; returns the process exit code."""
    args = _parser().parse_args(argv)
    torch.set_num_threads(1)      # tiny tensors: threads only add overhead
    if args.command == "figure1":
        experiments.figure1(args.out, K=args.K, beta=args.beta, n=args.n, eta=args.eta,
                            steps=args.steps, instances=args.instances, log_every=args.log_every,
                            seed=args.seed, methods=tuple(args.methods), plot=not args.no_plot)
    elif args.command == "pitfall":
        experiments.pitfall(args.out, K=args.K, p_ref=args.p_ref, successes=args.successes,
                            n=args.n, eta=args.eta, steps=args.steps, instances=args.instances,
                            betas=tuple(args.betas), lr_coefs=tuple(args.lr_coefs),
                            lr_baseline=args.lr_baseline, log_every=args.log_every,
                            seed=args.seed, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(lab_main(sys.argv[1:]))
