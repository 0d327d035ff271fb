"""Solver ``fixed``: hand-set multipliers that never change (the hand-weighted penalty users run today)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from l3m.errors import L3MConfigError
from l3m.solvers.base import Solver, ema_step, list_or_none, tensor_or_none


class FixedSolver(Solver):
    r"""Constant multipliers :math:`\lambda_i = w_i \ge 0`: a fixed penalty weight per one-sided constraint.

    Solver ``fixed``, the baseline of every reward-shaping recipe ("length penalty with weight 0.1"): the constraint
    term :math:`\lambda_i c_i` is a penalty whose weight is chosen by hand, so whether the constraint ends satisfied
    depends on that choice. ``weights`` is one number for every constraint or one per one-sided constraint (in the
    order of the bounds). The solver still keeps an EMA of the constraint estimates (``ema_smoothing``), only for
    logging (``constraints/<name>/ema``) and the infeasibility report; it never feeds back into the weights.
    """

    def __init__(self, weights: float | Sequence[float] = 0.0, ema_smoothing: float = 0.1):
        values = [weights] if isinstance(weights, (int, float)) else list(weights)
        for w in values:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise L3MConfigError(f"multiplier_init: solver fixed needs finite weights >= 0, got {weights!r}")
        if not values:
            raise L3MConfigError("multiplier_init: solver fixed needs at least one weight")
        self.weights = torch.tensor([float(w) for w in values], dtype=torch.float32)
        self.ema_smoothing = ema_smoothing
        self.ema: torch.Tensor | None = None

    @property
    def estimate(self) -> torch.Tensor | None:
        """The EMA of the constraint values (logged; the weights do not depend on it)."""
        return self.ema

    def multipliers(self, step: int, total_steps: int, estimate: torch.Tensor) -> torch.Tensor:
        """The ``(K,)`` fixed weights (one weight broadcast to every constraint)."""
        k = estimate.numel()
        if self.weights.numel() == 1:
            return self.weights.expand(k).clone()
        if self.weights.numel() != k:
            raise L3MConfigError(f"multiplier_init: {self.weights.numel()} fixed weights for {k} one-sided "
                                 "constraints; give one weight, or one per bound (a range counts twice)")
        return self.weights.clone()

    def update_(self, estimate: torch.Tensor) -> None:
        self.ema = ema_step(self.ema, estimate, self.ema_smoothing)

    def state_dict(self) -> dict:
        return {"weights": self.weights.tolist(), "ema": list_or_none(self.ema)}

    def load_state_dict(self, state: dict) -> None:
        if state["weights"] != self.weights.tolist():
            raise L3MConfigError(f"multiplier_init: the checkpoint was trained with fixed weights {state['weights']}, "
                                 f"not {self.weights.tolist()}")
        self.ema = tensor_or_none(state["ema"])
