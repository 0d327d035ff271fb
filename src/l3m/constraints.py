"""Constraints on rewards of sampled responses (Eq. 4-7 of the L3M paper).

Sign convention, stated once: a constraint value ``C_i`` is satisfied when ``C_i <= 0``. A user-facing
:class:`Constraint` may carry a ``min`` and a ``max``; a range expands into two one-sided :class:`Bound` s
(Sec. 6.2): ``r >= min`` and ``-r >= -max``. Writing ``m = sign * r - threshold`` for a sample's margin (``m >= 0``:
the sample meets the bound), each kind (Sec. 4.1) is an expectation of a per-sample term ``c``:

- ``expectation`` (Eq. 4): ``c = -m``, so ``C = E[b - r]``;
- ``chance`` (Eq. 7): ``c = (1 - epsilon) - 1{m >= 0}``, so ``C = (1 - epsilon) - P[r >= b]``;
- ``uniform`` (a surrogate of Eq. 6): ``c = max(0, -m) - delta``, so ``C = E[max(0, b - r)] - delta``, the mean
  shortfall minus its tolerance.

Each :class:`Bound` also gives the per-sample terms whose score-function gradient a constraint step follows
(:meth:`Bound.surrogate`): ``c`` itself, except for ``chance``, whose indicator has no gradient signal when all
samples fail, so the gradient follows the smoothed indicator ``sigmoid(m / indicator_temperature)``.

A satisfaction target (issue 15): training aims inside the user's bound, evaluation judges against the bound itself.
``margin`` moves each threshold inward by that many reward units (``m - margin`` in training); ``confidence`` adds
``z * s.e.`` to the estimate of ``C`` the solver follows, ``z`` the standard normal quantile of the confidence and s.e.
that estimate's standard error, from the samples' spread (:mod:`l3m.confidence`). On a range (an expectation with
``min`` and ``max``) the term is capped at what keeps the two targets from crossing: at most to the range's middle.

Shapes: N sampled responses, K one-sided bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import torch

from l3m.errors import L3MConfigError
from l3m.rewards import RewardFunc, resolve_reward

CONSTRAINT_KINDS = ("expectation", "chance", "uniform")
_SPEC_KEYS = {"name", "reward", "min", "max", "kind", "epsilon", "delta", "indicator_temperature", "margin",
              "confidence", "heldout_size"}


@dataclass
class Constraint:
    """A minimum requirement on a reward of the sampled responses, of one of the kinds of Sec. 4.1.

    Args:
        reward: a built-in reward name (``length_tokens``, ``length_words``, ``length_chars``), a
            ``module:function`` reference, a reward model mapping ``{type: lm|seqcls, path: ...}``
            (:mod:`l3m.rewards.models`), or a callable with TRL's reward signature.
        min: lower bound ``b`` (``r >= b``); ``None`` for no lower bound.
        max: upper bound (``r <= max``); ``None`` for no upper bound.
        name: used in logs and metrics (``constraints/<name>/...``); defaults to the reward's name.
        kind: ``"expectation"`` (Eq. 4: ``E[r] >= b``), ``"chance"`` (Eq. 7: ``P[r >= b] >= 1 - epsilon``) or
            ``"uniform"`` (Eq. 6, every response ``r >= b``, enforced through the mean shortfall
            ``E[max(0, b - r)] <= delta``). A range applies the kind to each side.
        epsilon: ``chance`` only: the allowed probability of a response failing a bound, in (0, 1).
        delta: ``uniform`` only: the allowed mean shortfall, in reward units (>= 0; 0 asks for every response).
        indicator_temperature: ``chance`` only: temperature of the smoothed indicator ``sigmoid((r - b) / T)``
            whose gradient the constraint steps follow, in reward units (> 0).
        margin: room kept inside each bound during training, in reward units (>= 0; default 0): training
            targets ``min + margin`` and ``max - margin``; evaluation and reports judge against ``min``/``max``.
        confidence: in [0.5, 1): the estimate of ``C`` the solver follows is raised by ``z * s.e.``, the standard
            normal quantile of ``confidence`` times that estimate's standard error (of the barrier's EMA over
            steps, from each step's samples' spread; :mod:`l3m.confidence`), so that the solver stops at a bound
            the policy's true value clears with about that probability (docs/solver.md, "Satisfaction targets").
        heldout_size: with ``confidence``, the number of held-out prompts (one response each) whose mean will be
            judged against the bound: the term then also covers that mean's own sampling error,
            ``z * sqrt(s.e.² + S / heldout_size)``, ``S`` the variance of one response's term. Without it the
            confidence is about the policy's expected value (an infinitely large held-out set).
    """

    reward: str | RewardFunc
    min: float | None = None
    max: float | None = None
    name: str | None = None
    kind: str = "expectation"
    epsilon: float | None = None
    delta: float | None = None
    indicator_temperature: float | None = None
    margin: float | None = None
    confidence: float | None = None
    heldout_size: int | None = None

    def __post_init__(self):
        label = self.name or (self.reward if isinstance(self.reward, str) else "reward")
        self.reward_func = resolve_reward(self.reward, field=f"constraints[{label}].reward")
        if self.name is None:
            self.name = self.reward if isinstance(self.reward, str) else getattr(self.reward_func, "__name__", "reward")
        where = f"constraints[{self.name}]"
        if self.kind not in CONSTRAINT_KINDS:
            raise L3MConfigError(f"{where}.kind: unknown kind {self.kind!r}; supported: {', '.join(CONSTRAINT_KINDS)}")
        for side in ("min", "max"):
            value = getattr(self, side)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise L3MConfigError(f"{where}.{side}: expected a finite number, got {value!r}")
            setattr(self, side, float(value))
        if self.min is None and self.max is None:
            raise L3MConfigError(f"{where}: give at least one of 'min' or 'max'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise L3MConfigError(f"{where}: min ({self.min:g}) > max ({self.max:g}); swap them or widen the range")
        self._check_kind_options(where)
        self._check_target(where)

    def _check_kind_options(self, where: str) -> None:
        """Each kind's own option, its default and its range; an option of another kind is an error."""
        options = {"chance": ("epsilon", "indicator_temperature"), "uniform": ("delta",)}
        for kind, names in options.items():
            for option in names:
                value = getattr(self, option)
                if value is None:
                    continue
                if self.kind != kind:
                    raise L3MConfigError(f"{where}.{option}: only applies to kind: {kind} (this constraint is "
                                         f"kind: {self.kind})")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise L3MConfigError(f"{where}.{option}: expected a finite number, got {value!r}")
                setattr(self, option, float(value))
        if self.kind == "chance":
            if self.epsilon is None:
                raise L3MConfigError(f"{where}.epsilon: required for kind: chance (P[r >= b] >= 1 - epsilon), "
                                     "e.g. epsilon: 0.1")
            if not 0 < self.epsilon < 1:
                raise L3MConfigError(f"{where}.epsilon: must be in (0, 1), got {self.epsilon:g}")
            if self.indicator_temperature is None:
                self.indicator_temperature = 1.0
            if self.indicator_temperature <= 0:
                raise L3MConfigError(f"{where}.indicator_temperature: must be > 0 (in reward units), got "
                                     f"{self.indicator_temperature:g}")
        if self.kind == "uniform":
            if self.delta is None:
                self.delta = 0.0
            if self.delta < 0:
                raise L3MConfigError(f"{where}.delta: must be >= 0 (an allowed mean shortfall), got {self.delta:g}")

    def _check_target(self, where: str) -> None:
        """``margin`` (>= 0, leaving a non-empty range), ``confidence`` (in [0.5, 1)) and ``heldout_size`` (>= 1,
        with a confidence)."""
        for option in ("margin", "confidence"):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise L3MConfigError(f"{where}.{option}: expected a finite number, got {value!r}")
        self.margin = 0.0 if self.margin is None else float(self.margin)
        if self.margin < 0:
            raise L3MConfigError(f"{where}.margin: must be >= 0 (room inside the bound, in reward units), got "
                                 f"{self.margin:g}")
        if self.min is not None and self.max is not None and self.min + self.margin > self.max - self.margin:
            raise L3MConfigError(f"{where}.margin: {self.margin:g} on each side leaves nothing of [{self.min:g}, "
                                 f"{self.max:g}]; use at most {(self.max - self.min) / 2:g}")
        if self.confidence is not None:
            self.confidence = float(self.confidence)
            if not 0.5 <= self.confidence < 1:
                raise L3MConfigError(f"{where}.confidence: must be in [0.5, 1) (e.g. 0.9), got {self.confidence:g}")
        if self.heldout_size is not None:
            if isinstance(self.heldout_size, bool) or not isinstance(self.heldout_size, int) or self.heldout_size < 1:
                raise L3MConfigError(f"{where}.heldout_size: expected a number of prompts >= 1 (e.g. 500), got "
                                     f"{self.heldout_size!r}")
            if self.confidence is None:
                raise L3MConfigError(f"{where}.heldout_size: only applies with a confidence (e.g. confidence: 0.9)")

    @property
    def has_target(self) -> bool:
        """Whether training aims inside the bounds (a ``margin`` or a ``confidence``) rather than at them."""
        return bool(self.margin) or self.confidence is not None

    @property
    def z(self) -> float:
        """The standard normal quantile of ``confidence`` (0 without one)."""
        return 0.0 if self.confidence is None else NormalDist().inv_cdf(self.confidence)

    def bounds(self) -> list[Bound]:
        """The one-sided bounds this constraint expands into (two for a range, Sec. 6.2)."""
        two_sided = self.min is not None and self.max is not None
        out = []
        if self.min is not None:
            out.append(Bound(f"{self.name}/min" if two_sided else self.name, self, self.min, +1.0))
        if self.max is not None:
            out.append(Bound(f"{self.name}/max" if two_sided else self.name, self, -self.max, -1.0))
        return out

    def is_satisfied_by(self, value: float) -> bool:
        """Whether a reward (or a mean reward) lies inside ``[min, max]``."""
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def is_met_by(self, rewards: torch.Tensor) -> bool:
        """Whether the sampled ``(N,)`` rewards satisfy the constraint as its kind defines it: the Monte-Carlo
        estimate of every bound's ``C`` is ``<= 0`` (expectation: mean reward in the range; chance: at least
        ``1 - epsilon`` of the samples meet each bound; uniform: mean shortfall at most ``delta`` on each side)."""
        return all(bound.values(rewards).mean().item() <= 0 for bound in self.bounds())


@dataclass
class Bound:
    """One constraint on ``sign * r >= threshold`` (Eq. 4-7), of its constraint's kind.

    The per-sample margin is ``m = sign * r - threshold`` (``>= 0``: the sample meets the bound).
    """

    name: str
    constraint: Constraint
    threshold: float
    sign: float

    def margins(self, rewards: torch.Tensor, target: bool = False) -> torch.Tensor:
        """``(N,)`` margins ``m = sign * r - threshold`` of ``(N,)`` rewards; with ``target``, against the training
        target: ``m - margin``."""
        return self.sign * rewards - self.threshold - (self.constraint.margin if target else 0.0)

    def values(self, rewards: torch.Tensor, target: bool = False) -> torch.Tensor:
        """``(N,)`` per-sample terms ``c`` whose mean is the Monte-Carlo estimate of ``C`` (``<= 0`` satisfied).

        expectation: ``-m``; chance: ``(1 - epsilon) - 1{m >= 0}``; uniform: ``max(0, -m) - delta``. With
        ``target``, against the training target: ``m - margin`` in place of ``m``.
        """
        c = self.constraint
        m = self.margins(rewards, target)
        if c.kind == "chance":
            return (1.0 - c.epsilon) - (m >= 0).to(m.dtype)
        if c.kind == "uniform":
            return (-m).clamp(min=0.0) - c.delta
        return -m

    def surrogate(self, rewards: torch.Tensor) -> torch.Tensor:
        """``(N,)`` per-sample terms whose score-function gradient estimates the constraint step's direction.

        For ``chance`` the indicator is replaced by ``sigmoid(m / T)`` (``T = indicator_temperature``): a failing
        sample closer to the bound scores higher, so the gradient points towards meeting it even when every sample
        fails (the indicator's REINFORCE estimate is then exactly 0). It is the gradient of
        ``(1 - epsilon) - E[sigmoid(m / T)]``, a smoothed ``C`` that tends to ``C`` as ``T -> 0`` (a sample exactly at
        the bound counts 1/2). The other kinds' terms are their own values. Training only: against the target
        (``m - margin``).
        """
        c = self.constraint
        if c.kind == "chance":
            return (1.0 - c.epsilon) - torch.sigmoid(self.margins(rewards, target=True) / c.indicator_temperature)
        return self.values(rewards, target=True)

    @property
    def confidence_room(self) -> float:
        """The largest confidence term (units of ``C``) this bound takes: on a range of an expectation, half its
        width less the margin, so the two tightened targets meet at most in the middle; unbounded otherwise."""
        c = self.constraint
        if c.kind != "expectation" or c.min is None or c.max is None:
            return math.inf
        return (c.max - c.min) / 2 - c.margin

    def target(self, confidence_term: float = 0.0) -> float:
        """The bound training aims at, in reward units (logged as ``constraints/<name>/target``): the threshold
        moved inward by ``margin`` and, for an expectation, by the step's ``confidence_term`` (``z * s.e.``; for the
        other kinds it is in units of ``C``, a probability or a shortfall, and logged on its own)."""
        shift = self.constraint.margin + (confidence_term if self.constraint.kind == "expectation" else 0.0)
        return self.sign * (self.threshold + shift)


def parse_constraints(specs: Sequence[dict[str, Any] | Constraint] | None) -> list[Constraint]:
    """Build :class:`Constraint` s from config records such as ``{name: length, reward: length_tokens, min: 20}``."""
    if specs is None:
        return []
    if isinstance(specs, dict) or not isinstance(specs, (list, tuple)):
        raise L3MConfigError(f"constraints: expected a list of constraint records, got {type(specs).__name__}")
    constraints = []
    for i, spec in enumerate(specs):
        if isinstance(spec, Constraint):
            constraints.append(spec)
            continue
        if not isinstance(spec, dict):
            raise L3MConfigError(f"constraints[{i}]: expected a mapping like {{reward: length_tokens, min: 20}}")
        unknown = set(spec) - _SPEC_KEYS
        if unknown:
            raise L3MConfigError(
                f"constraints[{i}]: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}"
            )
        if "reward" not in spec:
            raise L3MConfigError(f"constraints[{i}]: missing 'reward' (e.g. reward: length_tokens)")
        constraints.append(Constraint(**spec))
    names = [c.name for c in constraints]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise L3MConfigError(f"constraints: duplicated name(s) {duplicated}; give each constraint its own 'name'")
    return constraints


def compute_rewards(
    constraints: Sequence[Constraint], prompts: list[str], completions: list[str], completion_ids: list[list[int]],
    allow_nonfinite: bool = False,
    **reward_kwargs,
) -> dict[str, torch.Tensor]:
    """Score ``N`` responses once per constraint (:func:`score_responses`); returns ``{name: (N,) rewards}``.

    NaN or inf are an error unless ``allow_nonfinite`` (the trainer's choice: such a value is a numerical event,
    and the step is skipped and counted, :mod:`l3m.training.guards`). ``reward_kwargs`` are passed on to every reward function
    (the trainer passes ``trainer_state``, as TRL does).
    """
    return {c.name: score_responses(c.reward_func, f"constraints[{c.name}].reward", prompts, completions,
                                    completion_ids, allow_nonfinite, **reward_kwargs) for c in constraints}


def score_responses(
    reward_func: RewardFunc, where: str, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
    allow_nonfinite: bool = False,
    **reward_kwargs,
) -> torch.Tensor:
    """``(N,)`` rewards of ``N`` responses: ``reward_func`` called with l3m's keyword arguments and its output checked.

    A reward function that returns the wrong count, ``None`` or non-numbers has a bug: :class:`L3MConfigError`
    naming ``where`` (the field that set the reward). NaN or inf are an error too unless ``allow_nonfinite``.
    """
    n = len(completions)
    values = reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids, **reward_kwargs)
    if values is None or not hasattr(values, "__len__") or len(values) != n:
        got = f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
        raise L3MConfigError(f"{where}: the reward function returned {got}; expected a list of {n} numbers")
    bad = [v for v in values if isinstance(v, (str, bytes, bool)) or v is None]
    if bad:
        raise L3MConfigError(f"{where}: the reward function returned a non-number ({bad[0]!r})")
    try:
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise L3MConfigError(f"{where}: the reward function returned a non-number ({err})") from err
    if not allow_nonfinite and not torch.isfinite(tensor).all():
        raise L3MConfigError(f"{where}: the reward function returned NaN or inf")
    return tensor


def violations(bounds: Sequence[Bound], rewards: dict[str, torch.Tensor], target: bool = False) -> torch.Tensor:
    """Per-sample constraint values ``c_i(y|x)`` (Eq. 12; ``b_i - r_i`` for an expectation constraint), shape
    ``(N, K)``: their mean over samples estimates ``C_i`` (``<= 0`` is satisfied), see :meth:`Bound.values`;
    with ``target``, against the training targets (each bound's ``margin``)."""
    return torch.stack([b.values(rewards[b.constraint.name], target) for b in bounds], dim=1)


def surrogate_violations(bounds: Sequence[Bound], rewards: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample terms whose score-function gradient the constraint step follows, shape ``(N, K)``
    (:meth:`Bound.surrogate`; equal to :func:`violations` except for chance constraints)."""
    return torch.stack([b.surrogate(rewards[b.constraint.name]) for b in bounds], dim=1)


def target_metrics(bound: Bound, confidence_term: float) -> dict[str, float]:
    """A training step's ``constraints/<name>/target`` (:meth:`Bound.target`, when the bound has a margin or a
    confidence) and ``constraints/<name>/confidence_term`` (``z * s.e.`` in units of ``C``, with a confidence)."""
    c = bound.constraint
    metrics = {}
    if c.has_target:
        metrics[f"constraints/{bound.name}/target"] = bound.target(confidence_term)
    if c.confidence is not None:
        metrics[f"constraints/{bound.name}/confidence_term"] = confidence_term
    return metrics


def satisfied_mask(bounds: Sequence[Bound], rewards: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(N, K)`` booleans: sample meets bound ``sign * r >= threshold`` (the event every kind is built on)."""
    return torch.stack([b.margins(rewards[b.constraint.name]) >= 0 for b in bounds], dim=1)
