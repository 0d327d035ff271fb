"""Multiplier strategies: how the weights of the constraint gradients are produced.

The trainer's constraint step minimizes ``sum_i multiplier_i * C_i`` (a REINFORCE surrogate of it). Strategies differ
only in where the multipliers come from; the L3M log barrier derives them in closed form (Sec. 5.2), nothing is
learned. Every strategy keeps everything that changes during training in ``state_dict()``.

Shapes: K one-sided constraints.
"""

from __future__ import annotations

import torch

from l3m.barrier import implied_multipliers, mu_at_step


class LogBarrierMultipliers:
    r"""The L3M multipliers :math:`\tilde\lambda_i = \mu / (k \max(-\hat C_i, \mu^2))` (Sec. 5.2, Eq. 11).

    :math:`\hat C_i` is an exponential moving average of the per-step Monte-Carlo estimates of :math:`C_i`
    (Sec. 5.4): ``ema <- (1 - smoothing) * ema + smoothing * estimate``, seeded with the first estimate.
    The multipliers of a step are computed from the EMA *before* that step's samples are folded in, so a step's
    weights do not depend on its own samples (its first constraint step seeds the EMA first). ``mu`` decays
    exponentially over the planned optimizer steps (:func:`l3m.barrier.mu_at_step`).
    """

    def __init__(self, mu_init: float = 1.0, mu_final: float = 1e-6, ema_smoothing: float = 0.1):
        self.mu_init = mu_init
        self.mu_final = mu_final
        self.ema_smoothing = ema_smoothing
        self.ema: torch.Tensor | None = None

    def mu(self, step: int, total_steps: int) -> float:
        return mu_at_step(step, total_steps, self.mu_init, self.mu_final)

    def multipliers(self, step: int, total_steps: int, estimate: torch.Tensor) -> torch.Tensor:
        """``(K,)`` multipliers for optimizer step ``step`` of ``total_steps``.

        ``estimate`` (this step's ``(K,)`` Monte-Carlo estimate) seeds the EMA when no constraint step has run yet.
        """
        ema = estimate.detach().float().cpu() if self.ema is None else self.ema
        return implied_multipliers(ema, self.mu(step, total_steps))

    def update_(self, estimate: torch.Tensor) -> None:
        """Fold one optimizer step's ``(K,)`` estimate of :math:`C` into the EMA."""
        estimate = estimate.detach().float().cpu()
        if self.ema is None:
            self.ema = estimate.clone()
        else:
            self.ema = (1 - self.ema_smoothing) * self.ema + self.ema_smoothing * estimate

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else self.ema.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.ema = None if state["ema"] is None else torch.tensor(state["ema"], dtype=torch.float32)
