"""Solver ``dual``: multipliers held fixed for an outer iteration, then one dual step (after Zhang et al. 2025)."""

from __future__ import annotations

import torch

from l3m.errors import L3MConfigError
from l3m.solvers.base import Solver, list_or_none, tensor_or_none, to_cpu_float


class IterativeDualSolver(Solver):
    r"""The iterative dual baseline (CAID; Zhang, Li, Hounie, Bastani, Ding, Ribeiro 2025, arXiv 2505.19387).

    Solver ``dual``. Alternates policy optimization of the Lagrangian
    :math:`L(\theta) + \sum_i \lambda_i C_i(\theta)` (Eq. 8 of the L3M paper) at a *fixed* :math:`\lambda` with one
    step of projected dual descent on the dual function, whose gradient is the constraint value at the current policy:

    - an outer iteration *t* is ``update_steps`` optimizer steps that sample (calls of :meth:`update_`; with the
      fair coin the trainer also takes about as many objective steps in between); all of them use :math:`\lambda_t`.
    - at its end, :math:`\lambda_{t+1} = \min(\max(0, \lambda_t + \eta \bar C_t), \lambda_\max)` with
      :math:`\eta` = ``dual_lr`` and :math:`\bar C_t` the mean of the estimates measured during iteration *t*
      (fresh samples of the current policy; in this sign convention the paper's descent on the slack is an ascent
      on :math:`C`, so :math:`\lambda_i` grows while constraint *i* is violated).

    Differences from the paper, in l3m's setting (task objective = SFT loss, no reference model, no reward
    :math:`r/\beta`): the policy step is ``update_steps`` steps of the shared trainer rather than DPO on
    pseudo-preference pairs, and :math:`\bar C_t` averages the samples drawn *during* the iteration (as the
    policy moves) instead of a separate sampling pass after it.

    ``warm_start``: :math:`\lambda_0 = \eta \max(0, \hat C)` from the first estimate (one projected dual step from
    :math:`\lambda = 0` at the initial policy), replacing ``multiplier_init``. This is a simplification of the paper's
    warm start, which solves a one-shot dual problem to convergence on many reference-policy samples with a
    softmax-weighted (per-prompt :math:`\exp((r + \lambda^\top g)/\beta)`) slack; here the weights are uniform (there
    is no reward or β to form them) and a single step is taken on one batch. The first estimate also counts towards
    :math:`\bar C_0`.

    ``history`` holds :math:`\lambda_t` of every outer iteration so far (``history[t]``), ``iteration`` the number of
    dual steps taken; both are part of the state.
    """

    def __init__(
        self,
        dual_lr: float = 0.05,
        update_steps: int = 10,
        multiplier_init: float = 0.0,
        multiplier_max: float | None = None,
        warm_start: bool = False,
    ):
        if update_steps < 1:
            raise L3MConfigError(f"dual_update_steps: must be >= 1, got {update_steps}")
        self.dual_lr = dual_lr
        self.update_steps = update_steps
        self.multiplier_init = multiplier_init
        self.multiplier_max = multiplier_max
        self.warm_start = warm_start
        self.lam: torch.Tensor | None = None  # (K,) λ_t of the current outer iteration
        self.iteration = 0  # dual steps taken: the current outer iteration's index t
        self.steps_in_iteration = 0  # estimates folded into the current outer iteration
        self.estimate_sum: torch.Tensor | None = None  # (K,) their sum
        self.last_mean: torch.Tensor | None = None  # (K,) mean estimate of the last completed outer iteration
        self.history: list[list[float]] = []  # history[t] = λ_t

    @property
    def estimate(self) -> torch.Tensor | None:
        r"""The mean estimate of the current outer iteration so far (the :math:`\bar C_t` of its dual step), or of
        the last completed one when the current iteration has no estimate yet."""
        if self.steps_in_iteration:
            return self.estimate_sum / self.steps_in_iteration
        return self.last_mean

    def _clamp(self, lam: torch.Tensor) -> torch.Tensor:
        lam = lam.clamp(min=0.0)
        return lam if self.multiplier_max is None else lam.clamp(max=self.multiplier_max)

    def _initial(self, estimate: torch.Tensor) -> torch.Tensor:
        if self.warm_start:
            return self._clamp(self.dual_lr * estimate.clamp(min=0.0))
        return self._clamp(torch.full((estimate.numel(),), float(self.multiplier_init)))

    def multipliers(self, step: int, total_steps: int, estimate: torch.Tensor) -> torch.Tensor:
        """:math:`\\lambda_t` of the current outer iteration (before the first update: the initial or warm-start λ)."""
        if self.lam is None:
            return self._initial(to_cpu_float(estimate))
        return self.lam.clone()

    def update_(self, estimate: torch.Tensor) -> None:
        """Add the step's estimate to the outer iteration; after ``update_steps`` of them, take the dual step."""
        estimate = to_cpu_float(estimate)
        if self.lam is None:
            self.lam = self._initial(estimate)
            self.history.append(self.lam.tolist())
        self.estimate_sum = estimate if self.estimate_sum is None else self.estimate_sum + estimate
        self.steps_in_iteration += 1
        if self.steps_in_iteration < self.update_steps:
            return
        self.last_mean = self.estimate_sum / self.steps_in_iteration
        self.lam = self._clamp(self.lam + self.dual_lr * self.last_mean)
        self.iteration += 1
        self.history.append(self.lam.tolist())
        self.steps_in_iteration = 0
        self.estimate_sum = None

    def log_values(self) -> dict[str, float]:
        r"""``dual/iteration``: the index *t* of the current outer iteration (its :math:`\lambda_t` is logged by the
        trainer as ``constraints/<name>/multiplier``)."""
        return {} if self.lam is None else {"dual/iteration": float(self.iteration)}

    def state_dict(self) -> dict:
        return {
            "multipliers": list_or_none(self.lam),
            "iteration": self.iteration,
            "steps_in_iteration": self.steps_in_iteration,
            "estimate_sum": list_or_none(self.estimate_sum),
            "last_mean": list_or_none(self.last_mean),
            "history": [list(lam) for lam in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.lam = tensor_or_none(state["multipliers"])
        self.iteration = int(state["iteration"])
        self.steps_in_iteration = int(state["steps_in_iteration"])
        self.estimate_sum = tensor_or_none(state["estimate_sum"])
        self.last_mean = tensor_or_none(state["last_mean"])
        self.history = [list(lam) for lam in state["history"]]
