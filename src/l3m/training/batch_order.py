"""The order in which an L3M run reads its training examples: one shuffled stream per step kind.

An objective step trains on task examples; a constraint step only needs prompts (Sec. 5.4). If both kinds read one
shuffled stream, the objective steps see whichever batches the coin leaves them, and an SFT run with as many
objective steps sees different examples: with 20-step runs the task log-perplexity then moves with the batches
drawn more than with the constraint (docs/solver.md, "Data order"). :class:`CoinSampler` gives the objective steps
a stream of their own, the same one plain SFT (every step an objective step) reads, so an L3M's objective steps and
SFT's steps see the same examples in the same order; constraint steps read their prompts from a second stream, over
the task examples or, when the user gives prompts of their own (``constraint_dataset``), over those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class _Stream:
    """Example indices in shuffled passes over ``num_examples``; pass ``k`` is a permutation seeded by ``seed``,
    ``stream`` (0: objective, 1: constraint) and ``k``, so every pass shows each example once and the order is a pure
    function of the seed, the same in every process."""

    def __init__(self, num_examples: int, seed: int, stream: int):
        self.num_examples, self.seed, self.stream = num_examples, seed, stream
        self.passes = 0
        self.pending: list[int] = []

    def take(self, count: int) -> list[int]:
        while len(self.pending) < count:
            generator = torch.Generator().manual_seed((2 * self.seed + self.stream) * 1_000_003 + self.passes)
            self.pending += torch.randperm(self.num_examples, generator=generator).tolist()
            self.passes += 1
        taken, self.pending = self.pending[:count], self.pending[count:]
        return taken


class CoinSampler(Sampler[int]):
    """Training example indices for every optimizer step: ``examples_per_step`` of them (per-device batch x gradient
    accumulation x processes; accelerate deals consecutive batches to the processes), taken from the objective
    stream or, when ``is_constraint_step(step)``, from the constraint stream.

    With ``constraint_examples``, the dataset holds that many prompts after its ``num_examples`` task examples
    (:func:`l3m.data.with_constraint_prompts`) and the constraint stream runs over those prompts only.

    An epoch is ``len(self)`` indices (``num_examples`` rounded down to whole steps, at least one step); the streams
    run on across epochs (``set_epoch``), so the objective steps read each pass of their stream whole. The order
    depends only on ``seed`` and the coin: a resumed run reads the same examples.
    """

    def __init__(self, num_examples: int, examples_per_step: int, seed: int,
                 is_constraint_step: Callable[[int], bool], constraint_examples: int = 0):
        if num_examples < 1:
            raise ValueError("CoinSampler needs at least one example")
        self.num_examples, self.examples_per_step, self.seed = num_examples, examples_per_step, seed
        self.constraint_examples = constraint_examples
        self.is_constraint_step = is_constraint_step
        self.steps_per_epoch = max(1, num_examples // examples_per_step)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.examples_per_step

    def __iter__(self) -> Iterator[int]:
        constraint = _Stream(self.constraint_examples or self.num_examples, self.seed, 1)
        streams = {False: (_Stream(self.num_examples, self.seed, 0), 0),
                   True: (constraint, self.num_examples if self.constraint_examples else 0)}
        first = self.epoch * self.steps_per_epoch
        for step in range(first + self.steps_per_epoch):
            stream, offset = streams[bool(self.is_constraint_step(step))]
            indices = stream.take(self.examples_per_step)
            if step >= first:
                yield from (offset + index for index in indices)
