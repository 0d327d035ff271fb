"""Configuration of :class:`l3m.training.grpo.ConstrainedGRPOTrainer`: TRL's ``GRPOConfig`` plus the solver's fields.

The solver fields have the names, defaults and meanings of :class:`l3m.L3MConfig`'s, so one YAML block of
``solver``, ``mu_init``, ``dual_lr``, ... means the same under ``l3m train`` and ``l3m grpo``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import trl
import yaml
from trl import GRPOConfig

from l3m.constraints import parse_constraints
from l3m.errors import L3MConfigError

GRPO_SOLVERS = ("l3m", "mm", "dual", "fixed")


@dataclass
class ConstrainedGRPOConfig(GRPOConfig):
    r"""``trl.GRPOConfig`` plus the constraints and the solver that weights them.

    The reward GRPO normalizes and optimizes is :math:`r_0 - \sum_i \lambda_i c_i(y)` with :math:`c_i` the per-sample
    constraint term (``b_i - r_i`` for an expectation constraint, ``C_i = E[c_i] <= 0`` satisfied) and
    :math:`\lambda_i` set every step by the solver: ``l3m`` (log barrier, closed form from an EMA, μ decaying), ``mm``
    (projected dual ascent), ``dual`` (iterative dual) or ``fixed`` (``multiplier_init``, a hand-weighted penalty).

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
    constraints: list[dict] | str | None = field(
        default=None,
        metadata={"help": "Constraint records, e.g. [{name: length, reward: length_tokens, max: 40}], as in `l3m "
                          "train`. On the command line: a YAML/JSON string."},
    )
    solver: str = field(
        default="l3m",
        metadata={"help": "Where the constraint weights come from: 'l3m' (log barrier: closed form from an EMA of "
                          "the constraint values, mu decaying), 'mm' (projected dual ascent, the PPO-Lagrangian "
                          "baseline), 'dual' (iterative dual) or 'fixed' (multiplier_init, never updated)."},
    )
    mu_init: float = field(default=1.0, metadata={"help": "Solver l3m: initial log-barrier parameter mu."})
    mu_final: float = field(default=1e-6, metadata={"help": "Solver l3m: final log-barrier parameter mu."})
    ema_smoothing: float = field(
        default=0.1, metadata={"help": "Weight of the newest estimate in the EMA of each constraint value."}
    )
    dual_lr: float = field(
        default=0.05, metadata={"help": "Solvers mm/dual: dual step size, lambda <- max(0, lambda + dual_lr * C)."}
    )
    multiplier_init: float = field(
        default=0.0,
        metadata={"help": "Solvers mm/dual: initial multipliers; solver fixed: the weight of every constraint."},
    )
    multiplier_max: float | None = field(
        default=None, metadata={"help": "Solvers mm/dual: cap on the multipliers; unset means no cap."}
    )
    dual_warmup_steps: int = field(
        default=0, metadata={"help": "Solver mm: no dual update during the first this many steps."}
    )
    dual_log_parametrization: bool = field(
        default=False, metadata={"help": "Solver mm: learn log(lambda) (needs multiplier_init > 0)."}
    )
    dual_ema_smoothing: float = field(
        default=1.0, metadata={"help": "Solver mm: weight of the newest estimate in the EMA driving the dual step."}
    )
    dual_update_steps: int = field(default=10, metadata={"help": "Solver dual: steps per outer iteration."})
    dual_warm_start: bool = field(
        default=False, metadata={"help": "Solver dual: start from dual_lr * max(0, C) of the first estimate."}
    )
    max_consecutive_skipped_steps: int = field(
        default=5,
        metadata={"help": "Stop training (saving a checkpoint) after this many optimizer steps in a row were "
                          "skipped for a non-finite loss, gradient or reward."},
    )
    infeasibility_patience: int = field(
        default=100,
        metadata={"help": "Warn that a constraint may be infeasible when its smoothed value stays violated for this "
                          "many steps in a row."},
    )
    scale_rewards: str = field(
        default="batch",
        metadata={"help": "GRPO's reward scaling: 'batch' (l3m's default: one std per batch, so the weights keep "
                          "their meaning), 'group' (TRL's default) or 'none'. See docs/grpo.md."},
    )

    def __post_init__(self):
        for name in ("constraints", "reward"):  # a structure given as a YAML string on the command line
            value = getattr(self, name)
            if isinstance(value, str) and (name == "constraints" or value.lstrip().startswith(("[", "{"))):
                try:
                    setattr(self, name, yaml.safe_load(value))
                except yaml.YAMLError as err:
                    raise L3MConfigError(f"{name}: not valid YAML/JSON ({err})") from err
        self.parsed_constraints = parse_constraints(self.constraints)
        _check(self.solver in GRPO_SOLVERS, "solver", f"must be one of {', '.join(GRPO_SOLVERS)}, got {self.solver!r}")
        for name in ("mu_init", "mu_final", "ema_smoothing", "dual_lr", "multiplier_init", "dual_ema_smoothing"):
            value = getattr(self, name)
            _check(not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value), name,
                   f"expected a finite number, got {value!r}")
        _check(self.mu_init > 0, "mu_init", f"must be > 0, got {self.mu_init}")
        _check(0 < self.mu_final < self.mu_init, "mu_final",
               f"must be in (0, mu_init={self.mu_init}) so that mu decays, got {self.mu_final}")
        _check(0 < self.ema_smoothing <= 1, "ema_smoothing", f"must be in (0, 1], got {self.ema_smoothing}")
        _check(self.dual_lr >= 0, "dual_lr", f"must be >= 0, got {self.dual_lr}")
        _check(self.multiplier_init >= 0, "multiplier_init", f"must be >= 0, got {self.multiplier_init}")
        _check(not self.dual_log_parametrization or self.multiplier_init > 0, "multiplier_init",
               f"must be > 0 with dual_log_parametrization, got {self.multiplier_init}")
        _check(self.multiplier_max is None or self.multiplier_max >= self.multiplier_init, "multiplier_max",
               f"must be >= multiplier_init={self.multiplier_init}, got {self.multiplier_max}")
        _check(self.dual_warmup_steps >= 0, "dual_warmup_steps", f"must be >= 0, got {self.dual_warmup_steps}")
        _check(0 < self.dual_ema_smoothing <= 1, "dual_ema_smoothing",
               f"must be in (0, 1], got {self.dual_ema_smoothing}")
        _check(self.dual_update_steps >= 1, "dual_update_steps", f"must be >= 1, got {self.dual_update_steps}")
        _check(self.max_consecutive_skipped_steps >= 1, "max_consecutive_skipped_steps",
               f"must be >= 1, got {self.max_consecutive_skipped_steps}")
        _check(self.infeasibility_patience >= 1, "infeasibility_patience",
               f"must be >= 1, got {self.infeasibility_patience}")
        _check(self.scale_rewards in ("batch", "group", "none", True, False), "scale_rewards",
               f"must be 'batch', 'group' or 'none', got {self.scale_rewards!r}")
        _check(self.multi_objective_aggregation == "sum_then_normalize", "multi_objective_aggregation",
               "must be 'sum_then_normalize' with constraints: 'normalize_then_sum' would weight each constraint's "
               "per-group z-score, not c_i, so lambda_i would no longer be its multiplier")
        super().__post_init__()


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise L3MConfigError(f"{name}: {message}")


@dataclass
class GRPOModelConfig(trl.ModelConfig):
    """``l3m grpo``'s model arguments: :class:`l3m.ModelConfig`'s, except ``trust_remote_code``, which
    ``GRPOConfig`` already has (the loader reads it from there)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A hub model id or a local folder; 'demo' for the embedded SmolLM2-135M."}
    )
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules LoRA adapts: 'all-linear' (every linear layer but the output head) or names, "
                          "e.g. q_proj v_proj."},
    )
