"""Solver ``mm``: the minimax-Lagrangian baseline, multipliers learned by projected dual ascent (Sec. 4.2, 6.3)."""

from __future__ import annotations

import math

import torch

from l3m.errors import L3MConfigError
from l3m.solvers.base import Solver, ema_step, list_or_none, tensor_or_none, to_cpu_float


class MinimaxSolver(Solver):
    r"""The MM baseline: Lagrange multipliers learned by projected dual ascent (Sec. 4.2 Eq. 8, Sec. 6.3).

    Solver ``mm``. The minimax formulation looks for a saddle point of the Lagrangian
    :math:`\mathcal{L}(\theta, \lambda) = L(\theta) + \sum_i \lambda_i C_i(\theta)` (Eq. 8): the policy descends in
    :math:`\theta` (the trainer's shared objective and constraint steps, with the constraint gradients weighted by
    :math:`\lambda`), and :math:`\lambda \ge 0` ascends along :math:`\partial_\lambda \mathcal{L} = C`, measured on the
    policy's samples. As in the L3M paper's MM runs (Sec. 6.3, after Moskovitz et al. 2024 and Dai et al. 2024,
    Safe-RLHF's PPO-Lag) the task objective is minimized directly; there is no reference/SFT model.

    After each optimizer step that sampled (:meth:`update_`):

    - :math:`\hat C \leftarrow (1 - s)\hat C + s\,\text{estimate}` (seeded with the first estimate; ``ema_smoothing``
      :math:`s = 1` uses the step's raw estimate);
    - from the ``warmup_steps + 1``-th estimate on (none skipped by default), one projected dual ascent step
      :math:`\lambda \leftarrow \min(\max(0, \lambda + \eta \hat C), \lambda_\max)` with :math:`\eta` = ``dual_lr``:
      :math:`\lambda_i` grows while constraint *i* is violated and shrinks, down to exactly 0, while it is slack.
    - With ``log_parametrization`` (as Safe-RLHF's PPO-Lag): the iterate is :math:`\log\lambda`,
      :math:`\log\lambda \leftarrow \min(\log\lambda + \eta \hat C, \log\lambda_\max)` and
      :math:`\lambda = \exp(\log\lambda)`, i.e. the multiplicative step
      :math:`\lambda \leftarrow \lambda e^{\eta \hat C}`. λ stays positive without a projection (and never reaches
      0); it needs ``multiplier_init > 0``. Safe-RLHF's own step is SGD on :math:`\log\lambda` of the dual loss
      :math:`-\lambda \hat C`
      (``lambda_loss = -(episode_cost - threshold) * log_lambda.exp()``), whose gradient carries an extra factor λ:
      :math:`\log\lambda \mathrel{+}= \eta\lambda\hat C`. l3m leaves that factor out: with constraint values in
      large units (tokens) it makes λ overflow within a few steps unless capped.

    :meth:`multipliers` returns the current :math:`\lambda` (``multiplier_init`` before the first update), i.e. a
    step's weights come from the estimates of earlier steps only. ``warmup_steps`` counts the optimizer steps that
    sampled (calls of :meth:`update_`), not all optimizer steps. The L3M paper reports that MM is "extremely
    sensitive to the choice of the learning rate" (Sec. 6.3).
    """

    def __init__(
        self,
        dual_lr: float = 0.05,
        multiplier_init: float = 0.0,
        multiplier_max: float | None = None,
        warmup_steps: int = 0,
        log_parametrization: bool = False,
        ema_smoothing: float = 1.0,
    ):
        if log_parametrization and multiplier_init <= 0:
            raise L3MConfigError(f"multiplier_init: must be > 0 with dual_log_parametrization (log λ starts at its "
                                 f"log), got {multiplier_init}")
        self.dual_lr = dual_lr
        self.multiplier_init = multiplier_init
        self.multiplier_max = multiplier_max
        self.warmup_steps = warmup_steps
        self.log_parametrization = log_parametrization
        self.ema_smoothing = ema_smoothing
        self.lam: torch.Tensor | None = None  # (K,) current multipliers
        self.log_lam: torch.Tensor | None = None  # (K,) their logarithm, the iterate with log_parametrization
        self.ema: torch.Tensor | None = None  # (K,) smoothed constraint estimate
        self.num_updates = 0  # estimates folded in so far

    @property
    def estimate(self) -> torch.Tensor | None:
        """The EMA :math:`\\hat C` of the constraint values that drives the dual step."""
        return self.ema

    def _initial(self, k: int) -> torch.Tensor:
        lam = torch.full((k,), float(self.multiplier_init))
        return lam if self.multiplier_max is None else lam.clamp(max=self.multiplier_max)

    def multipliers(self, step: int, total_steps: int, estimate: torch.Tensor) -> torch.Tensor:
        """The current ``(K,)`` λ, before this step's update (``multiplier_init`` before any update)."""
        return self._initial(estimate.numel()) if self.lam is None else self.lam.clone()

    def update_(self, estimate: torch.Tensor) -> None:
        """Fold the step's estimate into :math:`\\hat C`, then (after the warm-up) take one dual ascent step."""
        estimate = to_cpu_float(estimate)
        if self.lam is None:
            self.lam = self._initial(estimate.numel())
            self.log_lam = self.lam.log() if self.log_parametrization else None
        self.ema = ema_step(self.ema, estimate, self.ema_smoothing)
        self.num_updates += 1
        if self.num_updates <= self.warmup_steps:
            return
        if self.log_parametrization:
            log_lam = self.log_lam + self.dual_lr * self.ema
            if self.multiplier_max is not None:
                log_lam = log_lam.clamp(max=math.log(self.multiplier_max))
            self.log_lam = log_lam
            self.lam = log_lam.exp()
        else:
            lam = (self.lam + self.dual_lr * self.ema).clamp(min=0.0)
            self.lam = lam if self.multiplier_max is None else lam.clamp(max=self.multiplier_max)

    def state_dict(self) -> dict:
        return {
            "multipliers": list_or_none(self.lam),
            "log_multipliers": list_or_none(self.log_lam),
            "ema": list_or_none(self.ema),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.lam = tensor_or_none(state["multipliers"])
        self.log_lam = tensor_or_none(state["log_multipliers"])
        self.ema = tensor_or_none(state["ema"])
        self.num_updates = int(state["num_updates"])
