"""Solver ``lagged_dual``: dual ascent on the SFT objective's constraints with a lagged multiplier: λ held fixed for
``dual_update_steps`` constraint steps, then one projected step on their mean estimate."""

from __future__ import annotations

import torch

from l3m.errors import L3MConfigError
from l3m.solvers.base import Solver, list_or_none, tensor_or_none, to_cpu_float


class LaggedDualSolver(Solver):
    r"""Lagged dual ascent on the SFT objective (solver ``lagged_dual``, formerly named ``dual``).

    The trainer minimizes the Lagrangian :math:`L(\theta) + \sum_i \lambda_i C_i(\theta)` (Eq. 8 of the L3M paper;
    :math:`L` the SFT loss) at a :math:`\lambda` that is updated only every ``update_steps`` constraint steps:

    - an outer iteration *t* is ``update_steps`` optimizer steps that sample (calls of :meth:`update_`; with the
      fair coin the trainer also takes about as many objective steps in between); all of them use :math:`\lambda_t`.
    - at its end, :math:`\lambda_{t+1} = \min(\max(0, \lambda_t + \eta \bar C_t), \lambda_\max)` with
      :math:`\eta` = ``dual_lr`` and :math:`\bar C_t` the mean of the estimates measured during iteration *t*
      (samples of the policy as it moves; :math:`\lambda_i` grows while constraint *i* is violated).

    With ``update_steps`` = 1 this is ``mm`` without its EMA, warm-up and log parametrization; larger values hold
    :math:`\lambda` for longer and step on an average over more samples.

    This is **not** CAID, the iterative dual alignment method of Zhang, Li, Hounie, Bastani, Ding, Ribeiro (2025,
    arXiv 2505.19387), which ``l3m align`` implements (:mod:`l3m.alignment`, docs/alignment.md): there is no
    reward objective, no KL to a reference, no maximization of the Lagrangian to convergence between dual steps
    (here a policy "step" is ``update_steps`` steps of the shared trainer) and no one-shot dual warm start.

    ``warm_start``: :math:`\lambda_0 = \eta \max(0, \hat C)` from the first estimate (one projected dual step from
    :math:`\lambda = 0` at the initial policy, on one batch), replacing ``multiplier_init``. The first estimate also
    counts towards :math:`\bar C_0`.

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
