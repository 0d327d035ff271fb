"""Multiplier strategies: how the weights of the constraint gradients are produced.

The trainer's constraint step minimizes ``sum_i multiplier_i * C_i`` (a REINFORCE surrogate of it). Strategies differ
only in where the multipliers come from; sampling, scoring, REINFORCE and the objective steps are shared.

- :class:`LogBarrierMultipliers` (``solver: l3m``): the L3M log barrier derives them in closed form (Sec. 5.2),
  nothing is learned.
- :class:`DualAscentMultipliers` (``solver: mm``): the minimax-Lagrangian baseline of Sec. 6.3; the multipliers of
  the Lagrangian (Eq. 8) are learned by projected dual ascent after every constraint step.
- :class:`IterativeDualMultipliers` (``solver: dual``): the iterative dual method of Zhang et al. (2025); the
  multipliers are held fixed for an outer iteration of policy steps, then take one dual step.

Every strategy implements :class:`Multipliers` and keeps everything that changes during training in
``state_dict()``. :func:`build_multipliers` picks one from ``L3MConfig.solver``.

Sign convention (:mod:`l3m.barrier`): a constraint value ``C = b - r`` is satisfied when ``C <= 0``.
Shapes: K one-sided constraints.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from l3m.barrier import implied_multipliers, mu_at_step
from l3m.errors import L3MConfigError

if TYPE_CHECKING:
    from l3m.config import L3MConfig


class Multipliers(ABC):
    """What the trainer asks of a multiplier strategy.

    Per optimizer step that samples (a constraint step), the trainer calls :meth:`multipliers` (once per
    gradient-accumulation micro-batch) and then, at the optimizer-step boundary, :meth:`update_` once with the mean
    of the step's estimates. Steps are counted by the trainer; strategies that count steps of their own (warm-up,
    outer iterations) count these calls, i.e. the optimizer steps that sampled.
    """

    @abstractmethod
    def multipliers(self, step: int, total_steps: int, estimate: torch.Tensor) -> torch.Tensor:
        """``(K,)`` weights of the constraint gradients for optimizer step ``step`` of ``total_steps``.

        ``estimate`` is this step's ``(K,)`` Monte-Carlo estimate of :math:`C` (``C <= 0`` satisfied). Asking for the
        multipliers changes no state.
        """

    @abstractmethod
    def update_(self, estimate: torch.Tensor) -> None:
        """Fold one optimizer step's ``(K,)`` estimate of :math:`C` into the strategy's state."""

    @property
    @abstractmethod
    def estimate(self) -> torch.Tensor | None:
        """The ``(K,)`` smoothed estimate of :math:`C` the strategy works from (logged), or None before any update."""

    def log_values(self, names: list[str]) -> dict[str, float]:
        """Extra metrics of the strategy's current state for the trainer's logs (``names``: the K bounds')."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything that changes during training, as JSON-serializable values."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def _to_cpu_float(estimate: torch.Tensor) -> torch.Tensor:
    return estimate.detach().float().cpu().clone()


def _ema_step(ema: torch.Tensor | None, estimate: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``(1 - smoothing) * ema + smoothing * estimate``; the first estimate seeds the EMA."""
    estimate = _to_cpu_float(estimate)
    return estimate if ema is None else (1 - smoothing) * ema + smoothing * estimate


def _tensor_or_none(values: list[float] | None) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.float32)


def _list_or_none(values: torch.Tensor | None) -> list[float] | None:
    return None if values is None else values.tolist()


class LogBarrierMultipliers(Multipliers):
    r"""The L3M multipliers :math:`\tilde\lambda_i = \mu / (k \max(-\hat C_i, \mu^2))` (Sec. 5.2, Eq. 11).

    :math:`\hat C_i` is an exponential moving average of the per-step Monte-Carlo estimates of :math:`C_i`
    (Sec. 5.4): ``ema <- (1 - smoothing) * ema + smoothing * estimate``, seeded with the first estimate. A step's
    multipliers use the EMA *including* that step's own estimate ("its estimate can include information from
    previous mini-batches", Sec. 5.4), so a constraint that becomes violated is acted on in the same step. The EMA
    itself is advanced once per optimizer step (:meth:`update_`), with the mean of its micro-batch estimates.
    ``mu`` decays exponentially over the planned optimizer steps (:func:`l3m.barrier.mu_at_step`).
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

    def multipliers(self, step: int, total_steps: int, estimate: torch.Tensor) -> torch.Tensor:
        """``(K,)`` multipliers for optimizer step ``step`` of ``total_steps``.

        ``estimate`` is this (micro-)batch's ``(K,)`` Monte-Carlo estimate, blended into the EMA as :meth:`update_`
        will fold it in (it seeds the EMA when no constraint step has run yet).
        """
        ema = _ema_step(self.ema, estimate, self.ema_smoothing)
        return implied_multipliers(ema, self.mu(step, total_steps))

    def update_(self, estimate: torch.Tensor) -> None:
        """Fold one optimizer step's ``(K,)`` estimate of :math:`C` into the EMA."""
        self.ema = _ema_step(self.ema, estimate, self.ema_smoothing)

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else self.ema.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.ema = None if state["ema"] is None else torch.tensor(state["ema"], dtype=torch.float32)


class DualAscentMultipliers(Multipliers):
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
        estimate = _to_cpu_float(estimate)
        if self.lam is None:
            self.lam = self._initial(estimate.numel())
            self.log_lam = self.lam.log() if self.log_parametrization else None
        self.ema = _ema_step(self.ema, estimate, self.ema_smoothing)
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
            "multipliers": _list_or_none(self.lam),
            "log_multipliers": _list_or_none(self.log_lam),
            "ema": _list_or_none(self.ema),
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.lam = _tensor_or_none(state["multipliers"])
        self.log_lam = _tensor_or_none(state["log_multipliers"])
        self.ema = _tensor_or_none(state["ema"])
        self.num_updates = int(state["num_updates"])


class IterativeDualMultipliers(Multipliers):
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
            return self._initial(_to_cpu_float(estimate))
        return self.lam.clone()

    def update_(self, estimate: torch.Tensor) -> None:
        """Add the step's estimate to the outer iteration; after ``update_steps`` of them, take the dual step."""
        estimate = _to_cpu_float(estimate)
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

    def log_values(self, names: list[str]) -> dict[str, float]:
        r"""``dual/iteration`` (the index *t*) and ``dual/<name>/lambda`` (:math:`\lambda_t`) at logging time."""
        if self.lam is None:
            return {}
        return {"dual/iteration": float(self.iteration),
                **{f"dual/{name}/lambda": value for name, value in zip(names, self.lam.tolist())}}

    def state_dict(self) -> dict:
        return {
            "multipliers": _list_or_none(self.lam),
            "iteration": self.iteration,
            "steps_in_iteration": self.steps_in_iteration,
            "estimate_sum": _list_or_none(self.estimate_sum),
            "last_mean": _list_or_none(self.last_mean),
            "history": [list(lam) for lam in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        self.lam = _tensor_or_none(state["multipliers"])
        self.iteration = int(state["iteration"])
        self.steps_in_iteration = int(state["steps_in_iteration"])
        self.estimate_sum = _tensor_or_none(state["estimate_sum"])
        self.last_mean = _tensor_or_none(state["last_mean"])
        self.history = [list(lam) for lam in state["history"]]


def build_multipliers(args: L3MConfig) -> Multipliers:
    """The multiplier strategy of ``args.solver``: ``l3m``, ``mm`` or ``dual``.

    ``sft`` gets the log barrier too, as a run without constraints does: the trainer ignores the constraints then,
    so the strategy is never consulted.
    """
    if args.solver in ("l3m", "sft"):
        return LogBarrierMultipliers(args.mu_init, args.mu_final, args.ema_smoothing)
    if args.solver == "mm":
        return DualAscentMultipliers(
            dual_lr=args.dual_lr,
            multiplier_init=args.multiplier_init,
            multiplier_max=args.multiplier_max,
            warmup_steps=args.dual_warmup_steps,
            log_parametrization=args.dual_log_parametrization,
            ema_smoothing=args.dual_ema_smoothing,
        )
    if args.solver == "dual":
        return IterativeDualMultipliers(
            dual_lr=args.dual_lr,
            update_steps=args.dual_update_steps,
            multiplier_init=args.multiplier_init,
            multiplier_max=args.multiplier_max,
            warm_start=args.dual_warm_start,
        )
    raise L3MConfigError(f"solver: unknown solver {args.solver!r}; use one of l3m, mm, dual, sft")
