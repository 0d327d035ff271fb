"""What the trainer asks of a solver: the source of the multipliers that weight the constraint gradients.

The trainer's constraint step minimizes ``sum_i multiplier_i * C_i`` (a REINFORCE surrogate of it, Eq. 11-12).
Solvers differ only in where the multipliers come from; sampling, scoring, REINFORCE and the objective steps are
the trainer's. Every solver keeps everything that changes during training in ``state_dict()``.

Sign convention (:mod:`l3m.solvers.barrier`): a constraint value ``C = b - r`` is satisfied when ``C <= 0``.
Shapes: K one-sided constraints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Solver(ABC):
    """What the trainer asks of a solver.

    Per optimizer step that samples (a constraint step), the trainer calls :meth:`multipliers` (once per
    gradient-accumulation micro-batch) and then, at the optimizer-step boundary, :meth:`update_` once with the mean
    of the step's estimates. Steps are counted by the trainer; solvers that count steps of their own (warm-up, outer
    iterations) count these calls, i.e. the optimizer steps that sampled. Each solver reports its own state through
    :meth:`step_metrics` (every optimizer step, averaged over the logging interval) and :meth:`log_values` (at
    logging time); the trainer logs the multipliers themselves as ``constraints/<name>/multiplier``.
    """

    @abstractmethod
    def multipliers(self, step: int, total_steps: int, estimate: torch.Tensor) -> torch.Tensor:
        """``(K,)`` weights of the constraint gradients for optimizer step ``step`` of ``total_steps``.

        ``estimate`` is this step's ``(K,)`` Monte-Carlo estimate of :math:`C` (``C <= 0`` satisfied). Asking for the
        multipliers changes no state.
        """

    @abstractmethod
    def update_(self, estimate: torch.Tensor) -> None:
        """Fold one optimizer step's ``(K,)`` estimate of :math:`C` into the solver's state."""

    @property
    @abstractmethod
    def estimate(self) -> torch.Tensor | None:
        """The ``(K,)`` smoothed estimate of :math:`C` the solver works from (logged), or None before any update."""

    @property
    def estimate_smoothing(self) -> float:
        """The weight of a step's estimate in the running estimate the multipliers follow: the solver's
        ``ema_smoothing`` if it keeps an EMA of the estimates, else 1 (each step's own). A ``confidence`` term is
        ``z`` standard errors of that running estimate (:class:`l3m.confidence.RunningConfidence`)."""
        return getattr(self, "ema_smoothing", 1.0)

    def step_metrics(self, step: int, total_steps: int) -> dict[str, float]:
        """Metrics of optimizer step ``step`` of ``total_steps`` (the trainer averages them over the logging interval)."""
        return {}

    def log_values(self) -> dict[str, float]:
        """Metrics of the solver's current state, read at logging time."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything that changes during training, as JSON-serializable values."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def to_cpu_float(estimate: torch.Tensor) -> torch.Tensor:
    return estimate.detach().float().cpu().clone()


def ema_step(ema: torch.Tensor | None, estimate: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``(1 - smoothing) * ema + smoothing * estimate``; the first estimate seeds the EMA."""
    estimate = to_cpu_float(estimate)
    return estimate if ema is None else (1 - smoothing) * ema + smoothing * estimate


def tensor_or_none(values: list[float] | None) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.float32)


def list_or_none(values: torch.Tensor | None) -> list[float] | None:
    return None if values is None else values.tolist()
