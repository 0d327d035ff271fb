"""The confidence term of a satisfaction target: ``z`` standard errors of the estimate of ``C`` the solver follows.

A constraint with ``confidence`` trains towards ``C + z * s.e. <= 0`` (issue 15; :mod:`l3m.constraints`), ``z`` the
standard normal quantile of the confidence. Which estimate's standard error depends on what the multipliers follow:

- a step's own estimate, the mean of its ``N`` per-sample terms ``c`` (CAID's passes, ``lagged_dual``, ``mm`` with
  its default ``dual_ema_smoothing: 1``): s.e.² = ``var(c) / N``, or with ``G`` responses to each of ``P`` prompts
  the variance of the prompts' means over ``P`` (:func:`step_statistics`, :func:`training_estimate`);
- the exponential moving average of those means (the ``l3m`` barrier, Sec. 5.4, and ``mm`` with a smoothing
  ``a < 1``): ``EMA_t = (1 - a) EMA_{t-1} + a mean_t`` has, for independent steps, the variance
  ``V_t = (1 - a)² V_{t-1} + a² s.e._t²`` (seeded like the EMA, with the first step's), i.e. ``a / (2 - a)`` of a
  step's when the spread is steady: 0.58 of its standard error at ``a = 0.5`` (:class:`RunningConfidence`).

With a ``heldout_size`` ``n`` the constraint asks for more: that the mean over ``n`` held-out prompts (one response
each) clear the bound, so the term also covers that mean's own sampling error, ``z * sqrt(V + S / n)``, with ``S``
the variance of one response's term (an EMA of each step's, prompts included; :func:`confidence_terms`).

Steps sample a policy that moves between them, so the EMA's variance is that of a weighted mean of estimates of
nearby policies: an approximation that holds where the solver has settled, which is where the target matters.

On a range (an ``expectation`` with ``min`` and ``max``) the term stops at
:attr:`l3m.constraints.Bound.confidence_room`: the two targets may meet in the middle, never cross.

Shapes: N sampled responses, K one-sided bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from l3m.constraints import Bound


class StepStatistics(NamedTuple):
    """What a step's ``(N, K)`` per-sample terms say about its estimate of ``C``, each ``(K,)`` CPU float32."""

    mean: torch.Tensor  # the estimate
    variance: torch.Tensor  # its squared standard error
    spread: torch.Tensor  # the variance of one response's term (prompts included): a held-out mean's is this over n


def step_statistics(values: torch.Tensor, group_size: int = 1) -> StepStatistics:
    """The mean of a step's ``(N, K)`` per-sample terms, its squared standard error and the responses' variance.

    With ``group_size`` G > 1 the rows are ``P = N / G`` groups of G consecutive responses to one prompt (the order
    the trainers sample in). Responses to one prompt are alike, so they are not N independent samples: the squared
    s.e. is that of the P prompts' means, ``var(prompt means) / P``. With one group (or G = 1) it is
    ``var(c) / N``, the responses taken as independent (0 with one response)."""
    values = values.detach().float().cpu()
    n = values.shape[0]
    mean = values.mean(dim=0)
    spread = values.var(dim=0) if n > 1 else torch.zeros_like(mean)
    if group_size > 1 and n > group_size:
        if n % group_size:
            raise ValueError(f"{n} responses are not groups of {group_size}")
        prompt_means = values.view(n // group_size, group_size, -1).mean(dim=1)
        return StepStatistics(mean, prompt_means.var(dim=0) / prompt_means.shape[0], spread)
    return StepStatistics(mean, spread / n, spread)


def pooled_statistics(steps: Sequence[StepStatistics]) -> StepStatistics:
    """The statistics of the mean of several equal-sized parts of one optimizer step (its micro-batches or scored
    batches): their means and spreads averaged, the squared s.e. of their average ``mean(variance) / count``."""
    mean, variance, spread = (torch.stack(x).mean(dim=0) for x in zip(*steps))
    return StepStatistics(mean, variance / len(steps), spread)


def confidence_terms(bounds: Sequence[Bound], variance: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """``(K,)`` terms ``z * sqrt(variance + spread / heldout_size)`` (no second part without a ``heldout_size``),
    0 for a bound without a confidence, at most each bound's :attr:`~l3m.constraints.Bound.confidence_room`."""
    z = torch.tensor([b.constraint.z for b in bounds], dtype=variance.dtype)
    room = torch.tensor([b.confidence_room for b in bounds], dtype=variance.dtype)
    heldout = torch.tensor([b.constraint.heldout_size or math.inf for b in bounds], dtype=variance.dtype)
    total = variance + spread / heldout
    return torch.where(z > 0, z * total.sqrt(), torch.zeros_like(variance)).minimum(room)


def training_estimate(bounds: Sequence[Bound], values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass's ``(K,)`` estimate of ``C`` from its ``(N, K)`` per-sample terms (against the targets) and the
    ``(K,)`` confidence terms it includes: ``mean + z * std / sqrt(N)`` per bound (:func:`confidence_terms`), on the
    device of ``values``. For an estimate that stands alone (a CAID pass, one row per prompt); a trainer's solver
    follows a running estimate (:class:`RunningConfidence`)."""
    step = step_statistics(values)
    terms = confidence_terms(bounds, step.variance, step.spread)
    return (step.mean + terms).to(values.device), terms.to(values.device)


class RunningConfidence:
    """Confidence terms on the solver's running estimate: ``z`` standard errors of its EMA (module docstring).

    The solvers fold each step's estimate into their EMA with weight ``smoothing`` (``Solver.estimate_smoothing``).
    For that EMA to hold ``EMA(mean) + term_t``, with ``term_t = z sqrt(V_t)`` (capped; plus ``S_t / n`` under the
    root with a ``heldout_size``), the step's estimate carries ``mean_t + (term_t - (1 - a) term_{t-1}) / a``: the
    part of the term that is new at this step, never negative (``V_t >= (1 - a)² V_{t-1}``). With ``smoothing`` 1
    it is the step's own term, as :func:`training_estimate`.

    :meth:`estimate` changes nothing (a micro-batch's multipliers); :meth:`update_` advances ``V`` and ``S`` once per
    optimizer step, as the solver advances its EMA. They are in :meth:`state_dict`, so a resumed run continues the
    same terms.
    """

    def __init__(self, bounds: Sequence[Bound], smoothing: float):
        self.bounds = list(bounds)
        self.smoothing = smoothing
        self.variance: torch.Tensor | None = None  # (K,) V, the variance of the running estimate
        self.spread: torch.Tensor | None = None  # (K,) an EMA of the responses' variance, for a heldout_size
        self.term: torch.Tensor | None = None  # (K,) the confidence term the solver's EMA holds

    def _next(self, step: StepStatistics) -> tuple[torch.Tensor, ...]:
        a = self.smoothing
        if self.variance is None:
            variance, spread = step.variance, step.spread
        else:
            variance = (1 - a) ** 2 * self.variance + a ** 2 * step.variance
            spread = (1 - a) * self.spread + a * step.spread
        term = confidence_terms(self.bounds, variance, spread)
        new_part = term if self.term is None else (term - (1 - a) * self.term) / a
        return step.mean + new_part, term, variance, spread

    def estimate(self, step: StepStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(K,)`` estimate of ``C`` to hand the solver for a step (:func:`step_statistics`), and the ``(K,)``
        confidence terms of the running estimate it implies (logged as ``confidence_term``). Changes no state."""
        estimate, term, _, _ = self._next(step)
        return estimate, term

    def update_(self, step: StepStatistics) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`estimate` for one optimizer step, whose estimate the solver then folds in; advances the state."""
        estimate, self.term, self.variance, self.spread = self._next(step)
        return estimate, self.term

    def state_dict(self) -> dict:
        return {key: None if value is None else value.tolist()
                for key, value in (("variance", self.variance), ("spread", self.spread), ("term", self.term))}

    def load_state_dict(self, state: dict) -> None:
        self.variance, self.spread, self.term = (None if state[key] is None else torch.tensor(state[key])
                                                 for key in ("variance", "spread", "term"))
