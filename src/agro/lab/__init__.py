"""The exact tabular lab: tabular policies with enumerable expectations, used to check the losses of
`agro.losses` against agro_math.md (§1-§6, §10) and to reproduce the paper's Figure 1 (§9) and the
on-policy pitfall (§4.6). See `tabular` (exact quantities, bridge to compute_loss), `experiments`
(sampled and exact training runs) and `cli` (`agro lab figure1|pitfall`).
"""
from agro.lab.tabular import TabularProblem, loss_inputs, run_loss

__all__ = ["TabularProblem", "loss_inputs", "run_loss"]
