"""Solver ``l3m``: the L3M log barrier's multipliers, set in closed form (Sec. 5.2, Eq. 11)."""

from __future__ import annotations

import torch

from l3m.solvers.barrier import implied_multipliers, mu_at_step
from l3m.solvers.base import Solver, ema_step


class LogBarrierSolver(Solver):
    r"""The L3M multipliers :math:`\tilde\lambda_i = \mu / (k \max(-\hat C_i, \mu^2))` (Sec. 5.2, Eq. 11).

    :math:`\hat C_i` is an exponential moving average of the per-step Monte-Carlo estimates of :math:`C_i`
    (Sec. 5.4): ``ema <- (1 - smoothing) * ema + smoothing * estimate``, seeded with the first estimate. A step's
    multipliers use the EMA *including* that step's own estimate ("its estimate can include information from
    previous mini-batches", Sec. 5.4), so a constraint that becomes violated is acted on in the same step. The EMA
    itself is advanced once per optimizer step (:meth:`update_`), with the mean of its micro-batch estimates.
    ``mu`` decays exponentially over the planned optimizer steps (:func:`l3m.solvers.barrier.mu_at_step`).
    """

    def __init__(self, mu_init: float = 1.0, mu_final: float = 1e-6, ema_smoothing: float = 0.1):
        self.mu_init = mu_init
        self.mu_final = mu_final
        self.ema_smoothing = ema_smoothing
        self.ema: torch.Tensor | None = None

    @property
    def estimate(self) -> torch.Tensor | None:
        """The EMA of the constraint values."""
        return self.ema

    def mu(self, step: int, total_steps: int) -> float:
        return mu_at_step(step, total_steps, self.mu_init, self.mu_final)

    def step_metrics(self, step: int, total_steps: int) -> dict[str, float]:
        """``barrier/mu``: the barrier parameter of the step."""
        return {"barrier/mu": self.mu(step, total_steps)}

    def multipliers(self, step: int, total_steps: int, estimate: torch.Tensor) -> torch.Tensor:
        """``(K,)`` multipliers for optimizer step ``step`` of ``total_steps``.

        ``estimate`` is this (micro-)batch's ``(K,)`` Monte-Carlo estimate, blended into the EMA as :meth:`update_`
        will fold it in (it seeds the EMA when no constraint step has run yet).
        """
        ema = ema_step(self.ema, estimate, self.ema_smoothing)
        return implied_multipliers(ema, self.mu(step, total_steps))

    def update_(self, estimate: torch.Tensor) -> None:
        """Fold one optimizer step's ``(K,)`` estimate of :math:`C` into the EMA."""
        self.ema = ema_step(self.ema, estimate, self.ema_smoothing)

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else self.ema.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.ema = None if state["ema"] is None else torch.tensor(state["ema"], dtype=torch.float32)
