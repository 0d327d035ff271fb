"""Constraints on rewards of sampled responses (Eq. 4/5 of the L3M paper).

Sign convention, stated once: a constraint value ``C_i = E[b_i - r_i(y|x)]`` is satisfied when ``C_i <= 0``.
A user-facing :class:`Constraint` may carry a ``min`` and a ``max``; a range expands into two one-sided
:class:`Bound` s (Sec. 6.2): ``r >= min`` and ``-r >= -max``.

Shapes: N sampled responses, K one-sided bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from l3m.errors import L3MConfigError
from l3m.rewards import RewardFunc, resolve_reward

CONSTRAINT_KINDS = ("expectation",)
_SPEC_KEYS = {"name", "reward", "min", "max", "kind"}


@dataclass
class Constraint:
    """A minimum requirement on a reward, enforced on average over prompts and sampled responses.

    Args:
        reward: a built-in reward name (``length_tokens``, ``length_words``, ``length_chars``), a
            ``module:function`` reference, a reward model mapping ``{type: lm|seqcls, path: ...}``
            (:mod:`l3m.rewards.models`), or a callable with TRL's reward signature.
        min: lower bound ``b`` in ``E[r] >= b``; ``None`` for no lower bound.
        max: upper bound in ``E[r] <= max``; ``None`` for no upper bound.
        name: used in logs and metrics (``constraints/<name>/...``); defaults to the reward's name.
        kind: ``"expectation"`` (Eq. 4), the only kind implemented so far.
    """

    reward: str | RewardFunc
    min: float | None = None
    max: float | None = None
    name: str | None = None
    kind: str = "expectation"

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


@dataclass
class Bound:
    """One constraint ``sign * r >= threshold`` of Eq. (4); its per-sample violation is ``threshold - sign * r``."""

    name: str
    constraint: Constraint
    threshold: float
    sign: float


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
    """Score ``N`` responses once per constraint; returns ``{name: (N,) rewards}``.

    A reward function that returns the wrong count, ``None`` or non-numbers has a bug: :class:`L3MConfigError`.
    NaN or inf are an error too unless ``allow_nonfinite`` (the trainer's choice: such a value is a numerical event,
    and the step is skipped and counted, :mod:`l3m.guards`). ``reward_kwargs`` are passed on to every reward function
    (the trainer passes ``trainer_state``, as TRL does).
    """
    rewards = {}
    n = len(completions)
    for constraint in constraints:
        values = constraint.reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                        **reward_kwargs)
        where = f"constraints[{constraint.name}].reward"
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
        rewards[constraint.name] = tensor
    return rewards


def violations(bounds: Sequence[Bound], rewards: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample constraint values ``c_i(y|x) = b_i - r_i(y|x)`` (Eq. 12), shape ``(N, K)``; ``<= 0`` is satisfied."""
    return torch.stack([b.threshold - b.sign * rewards[b.constraint.name] for b in bounds], dim=1)
