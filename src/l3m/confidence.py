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

Steps sample a policy that moves between them, so the EMA's variance is that of a weighted mean of estimates of
nearby policies: an approximation that holds where the solver has settled, which is where the target matters.

On a range (an ``expectation`` with ``min`` and ``max``) the term stops at :attr:`l3m.constraints.Bound.confidence_room`:
the two targets may meet in the middle, never cross. Shapes: N sampled responses, K one-sided bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from l3m.constraints import Bound


def step_statistics(values: torch.Tensor, group_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(K,)`` mean of a step's ``(N, K)`` per-sample terms and its ``(K,)`` squared standard error, both as
    CPU float32.

    With ``group_size`` G > 1 the rows are ``P = N / G`` groups of G consecutive responses to one prompt (the order
    the trainers sample in). Responses to one prompt are alike, so they are not N independent samples: the squared
    s.e. is that of the P prompts' means, ``var(prompt means) / P``. With one group (or G = 1) it is
    ``var(c) / N``, the responses taken as independent (0 with one response)."""
    values = values.detach().float().cpu()
    n = values.shape[0]
    mean = values.mean(dim=0)
    if group_size > 1 and n > group_size:
        if n % group_size:
            raise ValueError(f"{n} responses are not groups of {group_size}")
        prompt_means = values.view(n // group_size, group_size, -1).mean(dim=1)
        return mean, prompt_means.var(dim=0) / prompt_means.shape[0]
    return mean, (values.var(dim=0) / n if n > 1 else torch.zeros_like(mean))


def confidence_terms(bounds: Sequence[Bound], variance: torch.Tensor) -> torch.Tensor:
    """``(K,)`` terms ``z * sqrt(variance)``, 0 for a bound without a confidence, at most each bound's
    :attr:`~l3m.constraints.Bound.confidence_room`."""
    z = torch.tensor([b.constraint.z for b in bounds], dtype=variance.dtype)
    room = torch.tensor([b.confidence_room for b in bounds], dtype=variance.dtype)
    return torch.where(z > 0, z * variance.sqrt(), torch.zeros_like(variance)).minimum(room)


def training_estimate(bounds: Sequence[Bound], values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass's ``(K,)`` estimate of ``C`` from its ``(N, K)`` per-sample terms (against the targets) and the
    ``(K,)`` confidence terms it includes: ``mean + z * std / sqrt(N)`` per bound (:func:`confidence_terms`), on the
    device of ``values``. For an estimate that stands alone (a CAID pass); a trainer's solver follows a running
    estimate (:class:`RunningConfidence`)."""
    mean, variance = step_statistics(values)
    terms = confidence_terms(bounds, variance)
    return (mean + terms).to(values.device), terms.to(values.device)


class RunningConfidence:
    """Confidence terms on the solver's running estimate: ``z`` standard errors of its EMA (module docstring).

    The solvers fold each step's estimate into their EMA with weight ``smoothing`` (``Solver.estimate_smoothing``).
    For that EMA to hold ``EMA(mean) + term_t``, with ``term_t = z sqrt(V_t)`` (capped), the step's estimate carries
    ``mean_t + (term_t - (1 - a) term_{t-1}) / a``: the part of the term that is new at this step, never negative and,
    below the cap, at most the step's own ``z * s.e.`` (``V_t`` lies between ``(1 - a)² V_{t-1}`` and
    ``((1 - a) sqrt(V_{t-1}) + a s.e.)²``).
    With ``smoothing`` 1 it is the step's own ``z * s.e.``, as :func:`training_estimate`.

    :meth:`estimate` changes nothing (a micro-batch's multipliers); :meth:`update_` advances ``V`` once per optimizer
    step, as the solver advances its EMA. Both are in :meth:`state_dict`, so a resumed run continues the same terms.
    """

    def __init__(self, bounds: Sequence[Bound], smoothing: float):
        self.bounds = list(bounds)
        self.smoothing = smoothing
        self.variance: torch.Tensor | None = None  # (K,) V, the variance of the running estimate
        self.term: torch.Tensor | None = None  # (K,) the confidence term the solver's EMA holds

    def _next(self, mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.smoothing
        running = variance if self.variance is None else (1 - a) ** 2 * self.variance + a ** 2 * variance
        term = confidence_terms(self.bounds, running)
        new_part = term if self.term is None else (term - (1 - a) * self.term) / a
        return mean + new_part, term, running

    def estimate(self, mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(K,)`` estimate of ``C`` to hand the solver for a step of ``mean`` and squared standard error
        ``variance`` (:func:`step_statistics`), and the ``(K,)`` confidence terms of the running estimate it
        implies (logged as ``confidence_term``). Changes no state."""
        estimate, term, _ = self._next(mean, variance)
        return estimate, term

    def update_(self, mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`estimate` for one optimizer step, whose estimate the solver then folds in, and advance ``V``."""
        estimate, self.term, self.variance = self._next(mean, variance)
        return estimate, self.term

    def state_dict(self) -> dict:
        return {"variance": None if self.variance is None else self.variance.tolist(),
                "term": None if self.term is None else self.term.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.variance = None if state["variance"] is None else torch.tensor(state["variance"], dtype=torch.float32)
        self.term = None if state["term"] is None else torch.tensor(state["term"], dtype=torch.float32)
