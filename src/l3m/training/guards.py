"""Numerical guards and infeasibility diagnosis for :class:`l3m.L3MTrainer`.

- :class:`NonFiniteGuard`: an optimizer step whose loss, gradient or reward is NaN or infinite is *skipped* — its
  gradients are dropped before the optimizer sees them, so neither the weights nor the optimizer state nor the
  solver state move; the step still counts (the coin, μ and the learning-rate schedule follow the step number).
  Skips are counted (``train/skipped_steps``); ``max_consecutive_skipped_steps`` skips in a row stop the run.
- :class:`InfeasibilityMonitor`: a constraint whose per-step estimate of ``C_i`` stays ``> 0`` (violated; the log
  barrier then holds its multiplier at the cap ``1/(kμ)``, Sec. 5.2) for ``infeasibility_patience`` constraint steps
  in a row may be infeasible for this model and data; it is named in a warning and in the end-of-training summary,
  which judges every other constraint on its last few constraint steps against the user's bound, with their
  standard error.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence

import torch

from l3m.confidence import StepStatistics
from l3m.constraints import Bound, Constraint

logger = logging.getLogger(__name__)


def gradients_are_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient entry is finite (their total 2-norm is; an overflowing norm counts as non-finite)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def drop_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Remove the gradients: optimizers skip parameters without one (no update, no weight decay, no state step)."""
    for p in parameters:
        p.grad = None


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite value and says when too many came in a row.

    ``flag(reason)`` marks the current optimizer step (e.g. ``"reward 'length'"``, ``"loss"``); ``end_step`` closes
    it and returns whether it is skipped.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.last_reason: str | None = None
        self._reason: str | None = None

    def flag(self, reason: str) -> None:
        self._reason = self._reason or reason

    def end_step(self, step: int, skip: bool) -> bool:
        """Close optimizer step ``step``; ``skip`` is the verdict (agreed across processes) that it is skipped."""
        reason, self._reason = self._reason or "gradient", None
        if not skip:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        self.last_reason = f"{reason} at step {step}"
        logger.warning("Skipped optimizer step %d: non-finite %s (%d in a row, %d in all)", step, reason,
                       self.consecutive, self.skipped)
        return True

    @property
    def pending(self) -> bool:
        """Whether the current optimizer step has been flagged."""
        return self._reason is not None

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "last_reason": self.last_reason}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self.last_reason = state["last_reason"]


def describe_bound(bound: Bound, value: float, target: bool = True, standard_error: float | None = None) -> str:
    """A constraint value ``C`` (``<= 0`` satisfied) in the words of its kind, with the bound's target.

    expectation: ``C = b - E[r]`` (for a ``max``: ``E[r] - max``) -> the mean reward; chance:
    ``C = (1 - epsilon) - P[meets]`` -> the fraction of responses meeting the bound; uniform:
    ``C = E[max(0, shortfall)] - delta`` -> the mean shortfall. With ``target``, ``C`` is against the training
    target (the threshold moved inward by the ``margin``), as training estimates it; without, against the user's
    threshold itself (``bound`` in an expectation's words). A ``standard_error`` of ``value`` is said beside it.

    >>> from l3m.constraints import Constraint
    >>> describe_bound(Constraint("length_tokens", max=8).bounds()[0], 2.0)
    'mean reward 10, target <= 8'
    >>> describe_bound(Constraint("length_tokens", min=3, kind="chance", epsilon=0.1).bounds()[0], 0.3)
    'fraction meeting >= 3: 0.6, target >= 0.9'
    >>> describe_bound(Constraint("length_tokens", min=3, kind="uniform").bounds()[0], 0.5)
    'mean shortfall below 3: 0.5, target <= 0'
    >>> describe_bound(Constraint("length_tokens", max=8, margin=1).bounds()[0], 2.0)
    'mean reward 9, target <= 7'
    >>> describe_bound(Constraint("length_tokens", max=8, margin=1).bounds()[0], -1.0, target=False)
    'mean reward 7, bound <= 8'
    >>> describe_bound(Constraint("length_tokens", max=8).bounds()[0], -0.75, standard_error=0.41)
    'mean reward 7.25 ± 0.41, target <= 8'
    """
    c = bound.constraint
    level = bound.target() if target else bound.sign * bound.threshold  # in reward units
    side = f">= {level:g}" if bound.sign > 0 else f"<= {level:g}"
    error = "" if standard_error is None else f" ± {standard_error:.2g}"
    if c.kind == "chance":
        return f"fraction meeting {side}: {(1 - c.epsilon) - value:.4g}{error}, target >= {1 - c.epsilon:g}"
    if c.kind == "uniform":
        direction = "below" if bound.sign > 0 else "above"
        return f"mean shortfall {direction} {abs(level):g}: {value + c.delta:.4g}{error}, target <= {c.delta:g}"
    return f"mean reward {level - bound.sign * value:.4g}{error}, {'target' if target else 'bound'} {side}"


def _target_words(c: Constraint) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in (("margin", c.margin), ("confidence", c.confidence))
                     if value)


class InfeasibilityMonitor:
    """Tracks, per one-sided constraint, how many constraint steps in a row it has been violated, and how its last
    few steps stand against the user's bound.

    A step counts as violated when that step's own estimate of ``C`` against the training target is ``> 0``, not the
    solver's smoothed value: an EMA of non-negative terms (a ``uniform`` constraint with ``delta = 0``) stays above 0
    for hundreds of steps after a single failing response, although every later response passes.

    The summary judges the user's bound itself (a bound with a ``margin`` or a ``confidence`` trains towards a
    stricter target, Eq. 9-11 on the tightened bound; the target's state is said beside) on the plain mean of the
    last ``window`` constraint steps' estimates, with its standard error from the steps' own: ``satisfied`` when the
    mean meets the bound, ``violated`` when it misses it by more than two standard errors, and ``at its bound`` in
    between, where the training samples cannot tell. One step's 16 responses missed a length bound by more than a
    token in runs whose held-out means were well inside (docs/reliability.md). The window,
    ``round((2 - a) / a)`` steps for an EMA weight ``a``, is the number of independent steps whose mean has the
    variance of the solver's EMA.
    """

    def __init__(self, bounds: Sequence[Bound], patience: int, smoothing: float = 1.0):
        self.bounds = list(bounds)
        self.patience = patience
        self.window = max(1, round((2 - smoothing) / smoothing))
        self.recent: deque[tuple[list[float], list[float]]] = deque(maxlen=self.window)  # (mean, s.e.²) per step
        self.violated_steps = [0] * len(self.bounds)
        self.last_values: list[float] | None = None  # the smoothed estimate after the last constraint step
        self.last_estimates: list[float] | None = None  # the last constraint step's own estimate (training target)
        self.last_multipliers: list[float] | None = None
        self.collapsed_ranges: set[str] = set()  # ranges whose two targets have met in the middle (warned once)

    def observe(self, step: int, values: torch.Tensor, multipliers: torch.Tensor,
                estimates: torch.Tensor | None = None, bound_statistics: StepStatistics | None = None,
                confidence_terms: torch.Tensor | None = None) -> None:
        """Record one constraint step: the smoothed values ``(K,)``, the multipliers it used ``(K,)``, its own
        estimate ``(K,)`` against the training targets (the smoothed values when not given), its statistics against
        the user's bounds (:func:`l3m.confidence.step_statistics`; without them, the estimate against the targets
        with no standard error: no margin or confidence), and the confidence terms it included
        (:mod:`l3m.confidence`)."""
        self.last_values, self.last_multipliers = values.tolist(), multipliers.tolist()
        self.last_estimates = self.last_values if estimates is None else estimates.tolist()
        if bound_statistics is None:
            self.recent.append((self.last_estimates, [0.0] * len(self.bounds)))
        else:
            self.recent.append((bound_statistics.mean.tolist(), bound_statistics.variance.tolist()))
        for i, bound in enumerate(self.bounds):
            self.violated_steps[i] = self.violated_steps[i] + 1 if self.last_estimates[i] > 0 else 0
            if self.violated_steps[i] == self.patience:
                logger.warning("Constraint %s may be infeasible: %s", bound.name, self._describe(i) +
                               f" (step {step}); check its target, or give the run more steps")
        if confidence_terms is not None:
            self._warn_collapsed_ranges(step, confidence_terms.tolist())

    def _warn_collapsed_ranges(self, step: int, terms: list[float]) -> None:
        """Once per range: both sides' confidence terms at their cap (:attr:`Bound.confidence_room`) put both
        training targets at the middle of the range, a one-point target that one side or the other always misses,
        so the barrier's multipliers switch between the two sides (docs/reliability.md, docs/demo.md)."""
        capped: dict[str, tuple[Constraint, int]] = {}  # by name: the constraint and how many of its sides capped
        for bound, term in zip(self.bounds, terms):
            c = bound.constraint
            if c.z > 0 and term >= bound.confidence_room * (1 - 1e-6):
                capped[c.name] = (c, capped.get(c.name, (c, 0))[1] + 1)
        for name in sorted(capped.keys() - self.collapsed_ranges):
            c, sides = capped[name]
            if sides == 2:
                self.collapsed_ranges.add(name)
                logger.warning("Constraint %s: at step %d the confidence terms (z * s.e.) reached half the range "
                               "[%g, %g], so both training targets sat at its middle, %g, which one side always "
                               "misses; lower the confidence, widen the range or sample more responses per step",
                               name, step, c.min, c.max, (c.min + c.max) / 2)

    @property
    def last_bound_estimates(self) -> list[float] | None:
        """The last constraint step's estimate against the user's bounds."""
        return self.recent[-1][0] if self.recent else None

    def _last_step(self, i: int) -> str:
        """The last constraint step in the words of the kind: against the bound, and the training target's state
        when the bound has one."""
        bound = self.bounds[i]
        if not bound.constraint.has_target:
            return describe_bound(bound, self.last_estimates[i])
        met = "met" if self.last_estimates[i] <= 0 else "not met"
        return (f"{describe_bound(bound, self.last_bound_estimates[i], target=False)}; training target "
                f"({_target_words(bound.constraint)}) {met}")

    def _describe(self, i: int) -> str:
        # with a target, the last step's words already end in "training target (...) not met"
        still = " after" if self.bounds[i].constraint.has_target else ", still violated after"
        return (f"{self._last_step(i)}{still} {self.violated_steps[i]} constraint steps in a row with multiplier "
                f"{self.last_multipliers[i]:.4g}")

    def _recent(self, i: int) -> str:
        """The verdict on the last ``window`` constraint steps against the user's bound (class docstring), their mean
        with its standard error, and the training target's state at the last step when the bound has one."""
        bound, steps = self.bounds[i], len(self.recent)
        mean = sum(means[i] for means, _ in self.recent) / steps
        standard_error = math.sqrt(sum(variances[i] for _, variances in self.recent)) / steps
        status = "satisfied" if mean <= 0 else "violated" if mean > 2 * standard_error else "at its bound"
        over = "the last constraint step" if steps == 1 else f"the last {steps} constraint steps"
        words = f"{status} over {over}: {describe_bound(bound, mean, target=False, standard_error=standard_error)}"
        if status == "at its bound":
            words += " (missed by less than 2 standard errors: the training samples cannot tell)"
        if bound.constraint.has_target:
            met = "met" if self.last_estimates[i] <= 0 else "not met"
            words += f"; training target ({_target_words(bound.constraint)}) {met} at the last step"
        return words

    def summary(self) -> list[str]:
        """One line per constraint: how its last constraint steps stand against the user's bound (or that it looks
        infeasible: the training target missed at ``patience`` steps in a row) and the smoothed estimate, in the
        words of its kind."""
        if self.last_values is None:
            return []
        lines = []
        for i, bound in enumerate(self.bounds):
            if bound.constraint.has_target:
                smoothed = f" (smoothed against the training target: C = {self.last_values[i]:.4g})"
            else:
                smoothed = f" (smoothed: {describe_bound(bound, self.last_values[i]).split(', target')[0]})"
            if self.violated_steps[i] >= self.patience:
                lines.append(f"{bound.name}: POSSIBLY INFEASIBLE: {self._describe(i)}{smoothed}")
            else:
                lines.append(f"{bound.name}: {self._recent(i)}{smoothed}")
        return lines

    def state_dict(self) -> dict:
        return {"violated_steps": list(self.violated_steps), "last_values": self.last_values,
                "last_estimates": self.last_estimates, "last_multipliers": self.last_multipliers,
                "recent": [list(step) for step in self.recent]}

    def load_state_dict(self, state: dict) -> None:
        self.violated_steps = [int(n) for n in state["violated_steps"]]
        self.last_values, self.last_multipliers = state["last_values"], state["last_multipliers"]
        # checkpoints from before each was kept: the last step stands for what is missing
        self.last_estimates = state.get("last_estimates", self.last_values)
        recent = state.get("recent")
        if recent is None:
            last = state.get("last_bound_estimates", self.last_estimates)
            recent = [(last, [0.0] * len(self.bounds))] if last else []
        self.recent = deque((tuple(step) for step in recent), maxlen=self.window)
