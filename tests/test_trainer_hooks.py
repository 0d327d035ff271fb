"""What L3MTrainer relies on in transformers' Trainer, pinned so that an upgrade that changes it fails here, saying
what changed, instead of silently breaking atomic checkpoints or gradient accumulation."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
import transformers
import transformers.trainer
from transformers import Trainer, TrainerState

from fixtures.tiny import make_examples
from fixtures.trainers import Recorder, make_trainer
from l3m import ConstrainedGRPOTrainer, L3MTrainer
from l3m.training.checkpoints import TRAINER_STATE_NAME
from l3m.training.solver_state import SolverTrainerMixin

VERSION = f"transformers {transformers.__version__}"

# The private Trainer methods both constrained trainers override (SolverTrainerMixin, l3m/training/solver_state.py),
# with the parameters they expect.
OVERRIDDEN = {"_save_checkpoint": ["self", "model", "trial"], "_get_output_dir": ["self", "trial"]}


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_the_private_methods_l3m_overrides_keep_their_signature(name):
    method = getattr(Trainer, name, None)
    assert method is not None, (f"{VERSION} has no Trainer.{name}, which L3MTrainer overrides to save checkpoints "
                                "atomically: rework L3MTrainer._save_checkpoint")
    assert name in vars(SolverTrainerMixin), f"SolverTrainerMixin no longer overrides {name}: update OVERRIDDEN"
    assert getattr(L3MTrainer, name) is getattr(SolverTrainerMixin, name)
    assert getattr(ConstrainedGRPOTrainer, name) is getattr(SolverTrainerMixin, name)
    parameters = list(inspect.signature(method).parameters)
    assert parameters == OVERRIDDEN[name], (
        f"{VERSION} changed Trainer.{name}{inspect.signature(method)}; L3MTrainer overrides it as "
        f"{name}({', '.join(OVERRIDDEN[name][1:])}): rework the override")


def test_the_trainer_saves_where_get_output_dir_says_trainer_state_last_then_rotates(tmp_path, monkeypatch):
    """L3MTrainer._save_checkpoint makes the Trainer save into a staging folder through _get_output_dir, and publishes
    the folder after the Trainer returns: every file must land in ``<_get_output_dir()>/checkpoint-<step>``, and the
    Trainer may only rotate the checkpoints of that folder, after writing them all."""
    calls = []

    def spy(owner, name: str, parameter: str):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            calls.append((name, inspect.signature(original).bind(*args, **kwargs).arguments[parameter]))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)

    for name in ("save_model", "_save_optimizer_and_scheduler", "_save_scaler", "_save_rng_state"):
        spy(Trainer, name, "output_dir")
    spy(TrainerState, "save_to_json", "json_path")
    spy(transformers.trainer, "rotate_checkpoints", "output_dir")  # the Trainer's own rotation, not l3m's
    trainer = make_trainer(tmp_path, max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
                           save_total_limit=1)
    trainer.train()

    staging = str(tmp_path / "run" / "tmp-checkpoint-2")
    folder = os.path.join(staging, "checkpoint-2")
    expected = [("save_model", folder), ("_save_optimizer_and_scheduler", folder), ("_save_scaler", folder),
                ("_save_rng_state", folder), ("save_to_json", os.path.join(folder, TRAINER_STATE_NAME)),
                ("rotate_checkpoints", staging)]
    assert calls == expected, (f"{VERSION} changed what Trainer._save_checkpoint writes where, or in which order; "
                               "L3MTrainer._save_checkpoint relies on it (see its comment).\n"
                               f"expected {expected}\ngot      {calls}")
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-2"]


def test_the_best_checkpoint_is_recorded_where_it_is_published(tmp_path):
    """The Trainer records the best checkpoint under the folder it saved into, the staging one: L3MTrainer moves the
    record to the published folder, so that rotation keeps the best checkpoint, load_best_model_at_end finds it and a
    resumed run still knows it."""
    trainer = make_trainer(tmp_path, max_steps=6, per_device_train_batch_size=4,
                           eval_examples=make_examples(8, 8, 12, seed=1), eval_strategy="steps", eval_steps=2,
                           save_strategy="steps", save_steps=2, save_total_limit=1, metric_for_best_model="loss",
                           load_best_model_at_end=True)
    trainer.train()  # loads the best model at the end

    run_dir = tmp_path / "run"
    best = trainer.state.best_model_checkpoint
    assert best == str(run_dir / f"checkpoint-{trainer.state.best_global_step}") and os.path.isdir(best)
    assert not [name for name in os.listdir(run_dir) if name.startswith("tmp-")]
    for name in os.listdir(run_dir):  # the best checkpoint and the last one, each with the record of its time
        with open(run_dir / name / TRAINER_STATE_NAME) as f:
            state = json.load(f)
        assert state["best_model_checkpoint"] == str(run_dir / f"checkpoint-{state['best_global_step']}"), name


def test_gradient_accumulation_makes_the_update_of_the_whole_batch(tmp_path):
    """Two accumulated micro-batches of 4 make the same optimizer step as one batch of the same 8 examples: l3m's
    loss is a micro-batch mean and the Trainer divides it by the accumulation steps (model_accepts_loss_kwargs).

    Plain SGD without weight decay or clipping, so that the update is the gradient times the learning rate: a loss
    the Trainer did not divide would move the weights twice as far (a relative difference of 1), which clipping or
    Adam's normalization would hide."""
    examples = make_examples(8, 8, 12, seed=0)  # one epoch, one optimizer step in both runs
    updates, seen = {}, {}
    for accumulation, batch in ((2, 4), (1, 8)):
        trainer = make_trainer(tmp_path / str(accumulation), examples=examples, max_steps=1,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                               optim="sgd", weight_decay=0.0, learning_rate=0.1, lr_scheduler_type="constant",
                               max_grad_norm=0.0)
        seen[accumulation] = micro_batches = []
        compute_loss = trainer.compute_loss

        def recording_compute_loss(model, inputs, *args, **kwargs):
            micro_batches.append([ids[mask.bool()].tolist() for ids, mask in
                                  zip(inputs["input_ids"], inputs["attention_mask"])])
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = recording_compute_loss
        recorder = Recorder(trainer.model)
        trainer.add_callback(recorder)
        trainer.train()
        assert trainer.state.global_step == 1
        before, after = recorder.weights[0], recorder.weights[1]
        updates[accumulation] = torch.cat([(after[k] - before[k]).flatten() for k in before])

    assert [len(b) for b in seen[2]] == [4, 4] and [len(b) for b in seen[1]] == [8]
    assert seen[2][0] + seen[2][1] == seen[1][0], "both runs must see the same examples in the same order"
    assert updates[1].norm() > 0
    difference = ((updates[2] - updates[1]).norm() / updates[1].norm()).item()
    assert difference < 1e-5, f"accumulated and whole-batch updates differ by {difference:.2g} (relative)"
