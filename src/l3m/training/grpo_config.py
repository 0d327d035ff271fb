"""Configuration of :class:`l3m.training.grpo.ConstrainedGRPOTrainer`: TRL's ``GRPOConfig`` plus the solver's fields.

The solver fields are :class:`l3m.config.SolverConfig`'s, shared with :class:`l3m.L3MConfig`, so one YAML block of
``solver``, ``mu_init``, ``dual_lr``, ... means the same under ``l3m train`` and ``l3m grpo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml
from trl import GRPOConfig

from l3m.config import SolverConfig, _check
from l3m.errors import L3MConfigError

GRPO_SOLVERS = ("l3m", "mm", "lagged_dual", "fixed")


@dataclass
class ConstrainedGRPOConfig(SolverConfig, GRPOConfig):
    r"""``trl.GRPOConfig`` plus the constraints and the solver that weights them.

    The reward GRPO normalizes and optimizes is :math:`r_0 - \sum_i \lambda_i c_i(y)` with :math:`c_i` the per-sample
    constraint term (``b_i - r_i`` for an expectation constraint, ``C_i = E[c_i] <= 0`` satisfied) and
    :math:`\lambda_i` set every step by the solver: ``l3m`` (log barrier, closed form from an EMA, μ decaying), ``mm``
    (projected dual ascent), ``lagged_dual`` (lagged dual ascent) or ``fixed`` (``multiplier_init``, a hand-weighted
    penalty).

    Defaults that differ from ``GRPOConfig``: ``scale_rewards="batch"`` (docs/grpo.md: with one scale per batch the
    policy gradient is the Lagrangian's, times one positive number per step; per-group scaling reweights prompts by
    the spread of the weighted sum); ``remove_unused_columns=False`` is GRPO's already.
    """

    reward: str | None = field(
        default=None,
        metadata={"help": "The objective r_0 to maximize, as a constraint's reward is written: a built-in "
                          "(length_tokens, ...), 'module:function', a reward-model mapping {type: lm|seqcls, path: "
                          "...}, or a YAML list of them (their rewards are summed, weighted by reward_weights)."},
    )
    solver: str = field(
        default="l3m",
        metadata={"help": "Where the constraint weights come from: 'l3m' (log barrier: closed form from an EMA of "
                          "the constraint values, mu decaying), 'mm' (projected dual ascent, the PPO-Lagrangian "
                          "baseline), 'lagged_dual' (dual ascent, multipliers fixed for dual_update_steps "
                          "steps) or 'fixed' (multiplier_init, never updated)."},
    )
    scale_rewards: str = field(
        default="batch",
        metadata={"help": "GRPO's reward scaling: 'batch' (l3m's default: one std per batch, so the weights keep "
                          "their meaning), 'group' (TRL's default) or 'none'. See docs/grpo.md."},
    )

    def __post_init__(self):
        if isinstance(self.reward, str) and self.reward.lstrip().startswith(("[", "{")):  # YAML on the command line
            try:
                self.reward = yaml.safe_load(self.reward)
            except yaml.YAMLError as err:
                raise L3MConfigError(f"reward: not valid YAML/JSON ({err})") from err
        self._check_solver_fields(GRPO_SOLVERS)
        _check(self.scale_rewards in ("batch", "group", "none", True, False), "scale_rewards",
               f"must be 'batch', 'group' or 'none', got {self.scale_rewards!r}")
        _check(self.multi_objective_aggregation == "sum_then_normalize", "multi_objective_aggregation",
               "must be 'sum_then_normalize' with constraints: 'normalize_then_sum' would weight each constraint's "
               "per-group z-score, not c_i, so lambda_i would no longer be its multiplier")
        super().__post_init__()
