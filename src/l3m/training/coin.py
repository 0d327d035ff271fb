"""Which optimizer steps are objective steps and which are constraint steps (Sec. 5.4 of the L3M paper).

The paper alternates the two by flipping a fair coin per step (``schedule="coin"``). Over thousands of steps the
coin's share of each kind is steady; over a few dozen its streaks are not: in a 40-step run one kind can take 13 of
the last 21 steps, and a constraint that was met drifts out while the objective steps pull (docs/solver.md, "Step
schedule"). ``schedule="alternate"`` (the default) keeps the coin's marginals, each step a constraint step with
probability ``1 - objective_step_probability``, but spreads the kinds evenly: systematic sampling with a seeded
phase ``u``, step ``t`` is a constraint step when ``floor((t + 1) q + u) > floor(t q + u)`` with
``q = 1 - objective_step_probability``, so every window of ``n`` steps holds ``n q`` constraint steps to within one
(at 0.5: strict alternation, the seed choosing which kind goes first).

Both are pure functions of ``(seed, step)``: identical across gradient-accumulation micro-batches and processes,
reproducible, and restored by a resumed run without any saved RNG state.
"""

from __future__ import annotations

import math
import random

STEP_SCHEDULES = ("alternate", "coin")


def is_constraint_step(seed: int, step: int, objective_step_probability: float = 0.5,
                       schedule: str = "alternate") -> bool:
    """Whether optimizer step ``step`` is a constraint step under ``schedule`` (module docstring)."""
    if schedule == "coin":
        return random.Random(f"l3m-coin-{seed}-{step}").random() >= objective_step_probability
    if schedule != "alternate":
        raise ValueError(f"unknown step schedule {schedule!r}; use one of {', '.join(STEP_SCHEDULES)}")
    q = 1.0 - objective_step_probability
    phase = random.Random(f"l3m-coin-{seed}").random()
    return math.floor((step + 1) * q + phase) > math.floor(step * q + phase)


def objective_step_count(seed: int, max_steps: int, objective_step_probability: float = 0.5,
                         schedule: str = "alternate") -> int:
    """How many of ``max_steps`` optimizer steps are objective steps (an SFT run with as many steps takes the same
    number of task-objective steps as a constrained run)."""
    return sum(not is_constraint_step(seed, step, objective_step_probability, schedule) for step in range(max_steps))


def objective_steps_of(args) -> int:
    """:func:`objective_step_count` of a constrained run configured by ``args`` (an :class:`l3m.L3MConfig`): its
    seed, ``max_steps``, ``objective_step_probability`` and ``step_schedule``."""
    return objective_step_count(args.seed, args.max_steps, args.objective_step_probability, args.step_schedule)
