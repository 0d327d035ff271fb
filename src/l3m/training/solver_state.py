"""What both constrained trainers share beside their steps: the solver state in atomic checkpoints, resuming it,
and stopping cleanly on a signal or on too many non-finite steps.

:class:`SolverTrainerMixin` goes before the Trainer class in the bases of :class:`l3m.L3MTrainer` (SFT objective) and
:class:`l3m.ConstrainedGRPOTrainer` (reward objective, TRL's ``GRPOTrainer``). It expects ``self.solver``,
``self.bounds``, ``self.guard`` (:class:`~l3m.training.guards.NonFiniteGuard`), ``self.infeasibility``
(:class:`~l3m.training.guards.InfeasibilityMonitor`) and ``self.confidence``
(:class:`~l3m.confidence.RunningConfidence`), set by the trainer's ``__init__``.
"""

from __future__ import annotations

import json
import logging
import os
import signal

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from l3m.errors import L3MConfigError, L3MTrainingStopped
from l3m.files import write_json
from l3m.solvers import RENAMED_SOLVERS
from l3m.training.checkpoints import (SOLVER_STATE_NAME, TRAINER_STATE_NAME, StopSignals, check_resumable,
                                      last_complete_checkpoint, publish_checkpoint, remove_staging_dirs, staging_dir)

logger = logging.getLogger(__name__)


class SolverTrainerMixin:
    """Saves, restores and reports the solver state of a constrained trainer (see the module docstring)."""

    _stop_signals: StopSignals | None = None
    _staging_run_dir: str | None = None

    def _on_any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process, so that every process takes the same decision."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device)).max() > 0)

    def _guarded_training_step(self, model, inputs, num_items_in_batch, step: int):
        """The Trainer's training step on one micro-batch; a non-finite loss flags the optimizer step, and after the
        last micro-batch (before clipping and the optimizer) the trainer's ``_end_optimizer_step`` closes it."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            self.guard.flag("loss")
        if self.accelerator.sync_gradients:
            self._end_optimizer_step(model, step)
        return loss

    def _stop_requested(self) -> bool:
        """Whether a SIGTERM/SIGINT arrived or too many steps in a row were skipped, on any process: the Trainer
        then saves after this step's update, and stops."""
        signalled = self._stop_signals is not None and self._stop_signals.received is not None
        if self._on_any_process(signalled or self.guard.exhausted):
            self.control.should_save = True
            self.control.should_training_stop = True
            return True
        return False

    def solver_state(self) -> dict:
        """Everything the solver and the guards change during training, saved beside each checkpoint."""
        return {"solver": self.args.solver, "multipliers": self.solver.state_dict(),
                "global_step": self.state.global_step, "constraints": [b.name for b in self.bounds],
                "guard": self.guard.state_dict(), "infeasibility": self.infeasibility.state_dict(),
                "confidence": self.confidence.state_dict(), **self.solver_state_extras()}

    def solver_state_extras(self) -> dict:
        """What a trainer saves with the solver state besides the common fields."""
        return {}

    # The two private hooks below are overridden because transformers offers no public way to save a checkpoint
    # atomically (docs/reliability.md). Trainer._save_checkpoint(model, trial) (transformers 5.25: trainer.py
    # L3407-3474) writes straight into <_get_output_dir(trial)>/checkpoint-<global_step> (weights, optimizer, scheduler,
    # scaler and RNG states, then trainer_state.json) and then rotates the checkpoints of that folder. l3m points
    # _get_output_dir at a staging folder while the Trainer saves, and renames the finished folder into place.
    # tests/test_trainer_hooks.py pins what this relies on and fails, naming the change, when transformers changes it.

    def _get_output_dir(self, trial) -> str:
        return self._staging_run_dir or super()._get_output_dir(trial)

    # Saves atomically (l3m.training.checkpoints): the solver state (a file beside the Trainer's, as TRL's trainers
    # write theirs) and the Trainer's files go into tmp-checkpoint-N/checkpoint-N, renamed to checkpoint-N once every
    # process has written its part (the Trainer does not wait for the others' rng_state_<rank>.pth); old checkpoints
    # are rotated only then.
    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_dir(run_dir, self.state.global_step)
        if self.args.should_save:
            remove_staging_dirs(run_dir)
            os.makedirs(os.path.join(staging, name))
            write_json(os.path.join(staging, name, SOLVER_STATE_NAME), self.solver_state())
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_run_dir = None
        self._unstage_best_model_checkpoint(staging, run_dir, name)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staging, run_dir, name)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _unstage_best_model_checkpoint(self, staging: str, run_dir: str, name: str) -> None:
        """Point ``state.best_model_checkpoint`` at the published folder rather than the staging one.

        The Trainer records the best checkpoint as ``<folder it saved into>/checkpoint-<best step>`` when that exists
        there, i.e. when this step is the best one. Fixed on every process (each one loads the best model at the end
        with ``load_best_model_at_end``) and in the staged ``trainer_state.json``, which a resumed run reads.
        """
        best = self.state.best_model_checkpoint
        if best is None or os.path.dirname(best) != staging:
            return
        self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staging, name, TRAINER_STATE_NAME))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """Train; ``resume_from_checkpoint`` (a folder, or True for the last complete one) also restores the solver
        state.

        SIGTERM/SIGINT during training save a checkpoint after the current optimizer step and raise
        :class:`l3m.L3MTrainingStopped`, as do ``max_consecutive_skipped_steps`` non-finite steps in a row.
        """
        resume_from_checkpoint = self._checkpoint_to_resume(resume_from_checkpoint)
        if resume_from_checkpoint:
            self._load_solver_state(resume_from_checkpoint)
        with StopSignals() as signals:
            self._stop_signals = signals
            try:
                output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            finally:
                self._stop_signals = None
        for line in self.infeasibility.summary():
            alarm = ": violated " in line or ": POSSIBLY INFEASIBLE: " in line
            logger.log(logging.WARNING if alarm else logging.INFO, "Constraint %s", line)
        checkpoint = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.guard.exhausted:
            raise L3MTrainingStopped(
                f"max_consecutive_skipped_steps: {self.guard.consecutive} optimizer steps in a row had a non-finite "
                f"loss, gradient or reward (last: {self.guard.last_reason}); stopped and saved the last good weights "
                f"to {checkpoint}; fix the reward or lower learning_rate, then resume from it")
        if signals.received is not None and self.state.global_step < self.state.max_steps:
            raise L3MTrainingStopped(
                f"{signal.Signals(signals.received).name}: stopped at step {self.state.global_step} of "
                f"{self.state.max_steps} and saved {checkpoint}; resume with resume_from_checkpoint=true",
                signum=signals.received)
        return output

    def _checkpoint_to_resume(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint folder to resume from: ``True`` (or ``"true"``/``"last"``) means the last complete one."""
        needs_solver_state = bool(self.bounds)
        if resume_from_checkpoint is True or (isinstance(resume_from_checkpoint, str)
                                              and resume_from_checkpoint.lower() in ("true", "last")):
            folder = last_complete_checkpoint(self.args.output_dir, require_solver_state=needs_solver_state)
            if folder is None:
                raise L3MConfigError(f"resume_from_checkpoint: no complete checkpoint found in {self.args.output_dir}")
            return folder
        if not resume_from_checkpoint:
            return None
        check_resumable(resume_from_checkpoint, require_solver_state=needs_solver_state)
        return resume_from_checkpoint

    def _load_solver_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, SOLVER_STATE_NAME)
        if not os.path.exists(path):  # a plain Trainer checkpoint, accepted for runs without constraints
            return
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        if "guard" in state:
            self.guard.load_state_dict(state["guard"])
        if not self.bounds:
            return
        if state["constraints"] != [b.name for b in self.bounds]:
            raise L3MConfigError(f"constraints: the checkpoint was trained with {state['constraints']}, not "
                                 f"{[b.name for b in self.bounds]}")
        saved = RENAMED_SOLVERS.get(state["solver"], state["solver"])  # a checkpoint of "dual" is "lagged_dual"'s
        if saved != self.args.solver:
            raise L3MConfigError(f"solver: the checkpoint was trained with solver {saved!r}, "
                                 f"not {self.args.solver!r}")
        self.solver.load_state_dict(state["multipliers"])
        if "infeasibility" in state:
            self.infeasibility.load_state_dict(state["infeasibility"])
        if "confidence" in state:  # checkpoints from before it was kept start its variance afresh
            self.confidence.load_state_dict(state["confidence"])
