"""Reliability of L3MTrainer in-process: atomic checkpoints, resume, signals, non-finite steps, infeasibility, safe
loading. The real-process kill -9 / SIGTERM tests are in test_resume_subprocess.py."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from functools import partial

import pytest
import torch
from transformers import Trainer, TrainerCallback

from fixtures.tiny import make_examples
from fixtures.trainers import Recorder, copy_weights, make_trainer, same_weights
from l3m import Constraint, L3MConfigError, L3MTrainingStopped
from l3m.training.checkpoints import (SOLVER_STATE_NAME, TRAINER_STATE_NAME, StopSignals, check_resumable,
                                     last_complete_checkpoint)

LENGTH = Constraint("length_tokens", min=2, max=5, name="length")
_trainer = partial(make_trainer, constraints=(LENGTH,), max_steps=8, per_device_train_batch_size=4,
                   max_completion_length=12, logging_steps=1)


# ---- atomic checkpoints and resume ----

def test_a_save_killed_midway_is_never_taken_for_a_checkpoint(tmp_path, monkeypatch):
    straight = _trainer(tmp_path / "straight")
    straight.train()

    original = Trainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError("killed while saving")  # the weights and optimizer are written, the rest is not
        original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", dies_at_step_4)
    crashed = _trainer(tmp_path, save_strategy="steps", save_steps=2, save_total_limit=1)
    with pytest.raises(RuntimeError, match="killed while saving"):
        crashed.train()
    run_dir = tmp_path / "run"
    # checkpoint-2 is still there: old checkpoints are rotated only once the new one is complete
    assert sorted(os.listdir(run_dir)) == ["checkpoint-2", "tmp-checkpoint-4"]
    assert (run_dir / "tmp-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()
    assert last_complete_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-2")
    monkeypatch.setattr(Trainer, "_save_rng_state", original)

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw) or real_load(*a, **kw))
    resumed = _trainer(tmp_path, save_strategy="steps", save_steps=2, save_total_limit=1)
    resumed.train(resume_from_checkpoint=True)
    assert loads and all(kw.get("weights_only") is True for kw in loads)  # optimizer, scheduler, RNG states
    assert sorted(os.listdir(run_dir)) == ["checkpoint-8"]  # the staging folder is gone; rotation kept one
    assert {TRAINER_STATE_NAME, SOLVER_STATE_NAME, "model.safetensors"} <= set(os.listdir(run_dir / "checkpoint-8"))
    assert not (run_dir / "checkpoint-8" / "pytorch_model.bin").exists()  # weights: safetensors only
    assert same_weights(copy_weights(straight.model), copy_weights(resumed.model))


def test_resume_skips_incomplete_checkpoint_folders(tmp_path, caplog):
    for name, files in [("checkpoint-2", [TRAINER_STATE_NAME, SOLVER_STATE_NAME]),
                        ("checkpoint-4", ["model.safetensors"]), ("checkpoint-6", [TRAINER_STATE_NAME])]:
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-6: it is incomplete (no l3m_state.json)" in caplog.text
    assert last_complete_checkpoint(str(tmp_path), require_solver_state=False) == str(tmp_path / "checkpoint-6")
    with pytest.raises(L3MConfigError, match=r"^resume_from_checkpoint: .*checkpoint-4 is incomplete .*no "
                                             r"trainer_state.json, l3m_state.json"):
        check_resumable(str(tmp_path / "checkpoint-4"), require_solver_state=True)
    assert last_complete_checkpoint(str(tmp_path / "nothing-here")) is None


def test_sigterm_saves_after_the_current_step_and_stops(tmp_path):
    class SendSigterm(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    trainer = _trainer(tmp_path)
    trainer.add_callback(SendSigterm())
    with pytest.raises(L3MTrainingStopped, match=r"^SIGTERM: stopped at step 4 of 8 and saved .*checkpoint-4") as err:
        trainer.train()
    assert err.value.signum == signal.SIGTERM
    assert os.listdir(tmp_path / "run") == ["checkpoint-4"]  # saved although save_strategy is "no"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only in place during training


def test_a_second_signal_acts_at_once():
    # Python's own SIGINT handler, whatever an earlier test or library left in place
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGINT)
            assert signals.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):  # the usual handler is back for the second one
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)


# ---- non-finite steps ----

class NaNOnCall:
    """A length reward that returns NaN on the given calls (0-based), like a numerically unstable reward model."""

    __name__ = "unstable_length"

    def __init__(self, nan_calls):
        self.nan_calls, self.calls = nan_calls, 0

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        values = [float(len(ids)) for ids in completion_ids]
        self.calls += 1
        return [math.nan] + values[1:] if self.calls - 1 in self.nan_calls else values


@pytest.mark.parametrize("source", ["reward", "loss"])
def test_a_non_finite_step_is_skipped_counted_and_logged(tmp_path, source, caplog):
    if source == "reward":
        trainer = _trainer(tmp_path, constraints=[Constraint(NaNOnCall({1}), min=2, max=5, name="length")])
    else:
        trainer = _trainer(tmp_path, constraints=[])
        objective = trainer._objective_loss
        trainer._objective_loss = lambda model, inputs: objective(model, inputs) * (
            math.inf if trainer.state.global_step == 2 else 1.0)
    recorder = Recorder(trainer.model)
    trainer.add_callback(recorder)
    with caplog.at_level(logging.WARNING):
        trainer.train()

    assert trainer.guard.skipped == 1
    skipped = int(trainer.guard.last_reason.split("at step ")[1])  # the step index before its update
    assert trainer.guard.last_reason.startswith("reward of length" if source == "reward" else "loss")
    assert f"Skipped optimizer step {skipped}: non-finite" in caplog.text
    assert same_weights(recorder.weights[skipped], recorder.weights[skipped + 1])  # nothing reached the weights
    for step in range(8):
        if step != skipped:
            assert not same_weights(recorder.weights[step], recorder.weights[step + 1]), step  # the other steps train
    counts = [log["train/skipped_steps"] for log in recorder.logs if "train/skipped_steps" in log][:8]  # one a step
    assert counts == [0] * skipped + [1] * (8 - skipped)
    assert all(math.isfinite(v) for log in recorder.logs for k, v in log.items() if k != "loss")
    if source == "reward":
        assert torch.isfinite(trainer.solver.ema).all()  # the NaN estimate never reached the EMA


def test_too_many_skipped_steps_in_a_row_stop_with_a_checkpoint_of_the_last_good_weights(tmp_path):
    trainer = _trainer(tmp_path, constraints=[Constraint(NaNOnCall(set(range(100))), max=5, name="length")],
                       objective_step_probability=0.0, max_consecutive_skipped_steps=3)
    initial = copy_weights(trainer.model)
    with pytest.raises(L3MTrainingStopped, match=r"^max_consecutive_skipped_steps: 3 optimizer steps in a row had a "
                                                 r"non-finite loss, gradient or reward \(last: reward of length at step "
                                                 r"2\); stopped and saved the last good weights to .*checkpoint-3") as err:
        trainer.train()
    assert err.value.signum is None
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(initial[k], saved[k]) for k in saved)


# ---- infeasibility ----

def test_a_constraint_violated_for_long_is_reported_as_possibly_infeasible(tmp_path, caplog):
    impossible = Constraint("length_tokens", max=-1, name="negative_length")  # no response is shorter than 0
    easy = Constraint("length_words", max=1000, name="words")
    trainer = _trainer(tmp_path, constraints=[impossible, easy], objective_step_probability=0.0,
                       infeasibility_patience=3, max_steps=5)
    with caplog.at_level(logging.INFO, logger="l3m"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    flagged = [m for m in warnings if m.startswith("Constraint negative_length may be infeasible: mean reward ")]
    assert len(flagged) == 1 and "target <= -1, still violated after 3 constraint steps in a row" in flagged[0]
    assert "(step 2)" in flagged[0]
    assert not [m for m in warnings if "words" in m]
    summary = trainer.infeasibility.summary()
    assert summary[0].startswith("negative_length: POSSIBLY INFEASIBLE: mean reward ")
    assert "after 5 constraint steps in a row" in summary[0]
    assert summary[1].startswith("words: satisfied over the last 5 constraint steps: mean reward ")
    assert "bound <= 1000 (smoothed: mean reward " in summary[1]
    assert f"Constraint {summary[0]}" in warnings


# ---- safe loading ----

def test_data_cannot_trigger_imports(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_reward_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                                    "def boom(**kwargs):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reference = "evil_reward_module:boom"
    examples = [dict(example, reward=reference, constraints=[{"reward": reference, "max": 1}])
                for example in make_examples(16, 8, 12, seed=0)]
    examples[0]["messages"][0]["content"] = reference
    trainer = _trainer(tmp_path, examples=examples, max_steps=2)
    trainer.train()
    assert "evil_reward_module" not in sys.modules and not marker.exists()
