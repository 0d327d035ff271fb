"""The fair coin of Sec. 5.4: whether an optimizer step is an objective step or a constraint step."""

from __future__ import annotations

import random


def is_constraint_step(seed: int, step: int, objective_step_probability: float = 0.5) -> bool:
    """The coin of Sec. 5.4 for optimizer step ``step``.

    It is a pure function of ``(seed, step)``: identical across gradient-accumulation micro-batches and processes,
    reproducible, and restored by a resumed run without any saved RNG state.
    """
    return random.Random(f"l3m-coin-{seed}-{step}").random() >= objective_step_probability


def objective_step_count(seed: int, max_steps: int, objective_step_probability: float = 0.5) -> int:
    """How many of ``max_steps`` optimizer steps the coin makes objective steps (an SFT run with as many steps
    takes the same number of task-objective steps as a constrained run)."""
    return sum(not is_constraint_step(seed, step, objective_step_probability) for step in range(max_steps))
