"""The order of training examples (l3m.training.batch_order): an L3M's objective steps read the examples plain SFT
reads, in the same order, whatever the coin does; constraint steps read theirs from another stream."""

from __future__ import annotations

from functools import partial

import pytest

from fixtures.trainers import make_trainer
from l3m import Constraint
from l3m.training.batch_order import CoinSampler
from l3m.training.coin import is_constraint_step, objective_step_count


def _steps(sampler: CoinSampler, epochs: int = 1) -> list[list[int]]:
    """The sampler's indices over ``epochs`` epochs, one list per optimizer step."""
    indices = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        indices += list(sampler)
    k = sampler.examples_per_step
    return [indices[i:i + k] for i in range(0, len(indices), k)]


def test_objective_steps_read_the_stream_sft_reads():
    coin = partial(is_constraint_step, 3)
    l3m = _steps(CoinSampler(40, 4, seed=3, is_constraint_step=coin), epochs=3)
    sft = _steps(CoinSampler(40, 4, seed=3, is_constraint_step=lambda step: False), epochs=3)
    objective = [batch for step, batch in enumerate(l3m) if not coin(step)]
    constraint = [batch for step, batch in enumerate(l3m) if coin(step)]
    assert len(objective) == objective_step_count(3, len(l3m)) and constraint
    assert objective == sft[:len(objective)]
    assert constraint != sft[:len(constraint)]  # its own stream
    # each stream shows every example once per pass (40 examples = 10 steps of 4), across epoch boundaries
    for stream in (sft, constraint[:10]):
        assert sorted(i for batch in stream[:10] for i in batch) == list(range(40))


def test_the_order_is_a_function_of_the_seed_and_the_epoch():
    coin = partial(is_constraint_step, 0)
    a, b = CoinSampler(10, 3, 0, coin), CoinSampler(10, 3, 0, coin)
    assert len(a) == 9  # whole steps only
    assert _steps(a, 2) == _steps(b, 2)
    b.set_epoch(1)
    assert list(b) == sum(_steps(a, 2)[3:], [])  # epoch 1 alone: what a run that reached it reads (a resume)
    assert _steps(CoinSampler(10, 3, 1, coin)) != _steps(a)
    assert len(CoinSampler(2, 4, 0, coin)) == 4  # fewer examples than a step: one step, examples repeated


@pytest.mark.parametrize("accumulation", [1, 2])
def test_an_l3m_run_trains_its_objective_steps_on_sfts_batches(tmp_path, accumulation, monkeypatch):
    """Record the task batches of every objective step of an L3M run and of an SFT run with as many steps."""
    run = partial(make_trainer, num_examples=24, per_device_train_batch_size=4 // accumulation,
                  gradient_accumulation_steps=accumulation, max_completion_length=4, lr_scheduler_type="constant")
    seen = {}
    for name, constraints, steps in (("l3m", [Constraint("length_tokens", max=3)], 12),
                                     ("sft", [], objective_step_count(0, 12))):
        trainer = run(tmp_path / name, constraints=constraints, max_steps=steps)
        batches = seen[name] = []
        objective_loss = trainer._objective_loss

        def record(model, inputs, objective_loss=objective_loss, batches=batches):
            batches.append(inputs["input_ids"].tolist())
            return objective_loss(model, inputs)

        monkeypatch.setattr(trainer, "_objective_loss", record)
        trainer.train()
    assert len(seen["l3m"]) == objective_step_count(0, 12) * accumulation < 12 * accumulation
    assert seen["l3m"] == seen["sft"]
