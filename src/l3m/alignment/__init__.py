"""Constrained alignment by dualization (CAID, Zhang et al. 2025): the one-shot dual, pseudo-preference DPO at fixed
multipliers, and the iterative dual loop. See docs/alignment.md.

- :mod:`l3m.alignment.dual`: the dual function, its minimizer, the dual step and the pseudo-preference pairs (pure
  functions, float64).
- :mod:`l3m.alignment.policy`: the policy step at fixed multipliers, DPO (TRL's ``DPOTrainer``) on pseudo-preference
  pairs, reference pi_ref.
- :mod:`l3m.alignment.samples`: a sampling pass over the training prompts, scored (objective, constraint slack, KL).
- :mod:`l3m.alignment.config` and :mod:`l3m.alignment.caid`: :class:`CAIDConfig` and :func:`run_caid`, the loop.
"""

from l3m.alignment.caid import run_caid
from l3m.alignment.config import CAIDConfig
from l3m.alignment.dual import (DualSolution, dual_objective, dual_step, pseudo_preference_pairs, solve_one_shot_dual,
                                tilted_mean, tilted_weights)

__all__ = ["CAIDConfig", "DualSolution", "dual_objective", "dual_step", "pseudo_preference_pairs", "run_caid",
           "solve_one_shot_dual", "tilted_mean", "tilted_weights"]
