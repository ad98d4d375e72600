"""`agro repro`: the paper's LLM claims (§8, Figures 2-6) and ours (stale data, C6), reproduced at
small scale with the real trainer and given honest verdicts.

- :mod:`agro.repro.claims`: the arms (named `TrainConfig` overrides, shared across claims) and the
  six claims; the shared base settings (task, model, budget) for full and ``--quick`` runs.
- :mod:`agro.repro.runner`: the resumable sweep over arms x seeds (a run store keyed by settings;
  finished runs skipped, killed runs resumed from their checkpoint) and the outputs (runs.csv,
  arms.yaml, plots, verdict.md).
- :mod:`agro.repro.verdicts` / :mod:`agro.repro.stats`: the statistic that decides each claim and
  the decision rules; :mod:`agro.repro.plots`: the figures.
"""
