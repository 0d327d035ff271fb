"""``L3MTrainer``: the one place that sequences an L3M optimizer step (Sec. 5 of the L3M paper).

Each optimizer step flips a seeded coin (Sec. 5.4). An *objective step* takes a gradient step on the task objective
``L`` (length-normalized response NLL, Eq. 1/3). A *constraint step* samples responses for the batch's prompts,
scores them, and takes a REINFORCE step on ``sum_i multiplier_i * C_i`` with the log-barrier multipliers (Eq. 11,
Sec. 5.2) — or, with ``args.solver`` ``mm`` / ``dual``, a baseline's learned multipliers (:mod:`l3m.solvers`).
The Trainer clips each step's gradient on its own, so the two parts are clipped separately. With no constraints, or
``solver="sft"``, every step is an objective step: plain SFT.

Reliability (docs/reliability.md): a step with a non-finite loss, gradient or reward is skipped (:mod:`l3m.training.guards`);
checkpoints are written atomically and SIGTERM/SIGINT save one before stopping (:mod:`l3m.training.checkpoints`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from l3m.config import L3MConfig, ModelConfig
from l3m.constraints import (Constraint, compute_rewards, parse_constraints, satisfied_mask, surrogate_violations,
                             violations)
from l3m.data import CompletionCollator, prepare_dataset
from l3m.errors import L3MConfigError, L3MTrainingStopped
from l3m.loading import load_model_and_tokenizer, load_tokenizer
from l3m.rewards.models import place_reward_models
from l3m.sampling import completion_logps, eos_ids, response_nll, sample_completions
from l3m.solvers import build_solver
from l3m.training.checkpoints import (SOLVER_STATE_NAME, TRAINER_STATE_NAME, StopSignals, check_resumable,
                                      last_complete_checkpoint, publish_checkpoint, remove_staging_dirs, staging_dir)
from l3m.training.coin import is_constraint_step
from l3m.training.distributed import check_launch, process_local_sampling
from l3m.training.guards import InfeasibilityMonitor, NonFiniteGuard, drop_gradients, gradients_are_finite
from l3m.training.reinforce import constraint_advantages, reinforce_loss

logger = logging.getLogger(__name__)


class L3MTrainer(Trainer):
    """Fine-tune a causal LM on task data subject to reward constraints, with the L3M log barrier.

    Args:
        model: a `PreTrainedModel`, or a hub id / local folder / ``demo`` loaded by :mod:`l3m.loading` (float32).
        args: an :class:`l3m.L3MConfig`.
        train_dataset / eval_dataset: `datasets.Dataset` with ``messages`` or ``prompt``/``completion`` columns.
        processing_class: the tokenizer; loaded from the model's folder when omitted.
        constraints: :class:`l3m.Constraint` s or records; defaults to ``args.constraints``.
        peft_config: a `peft.PeftConfig` to train an adapter instead of all weights.
    """

    def __init__(
        self,
        model,
        args: L3MConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        constraints: list[Constraint | dict] | None = None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args if args is not None else L3MConfig(output_dir="l3m-output")
        if not isinstance(args, L3MConfig):
            raise L3MConfigError("args: expected an l3m.L3MConfig (it carries the solver's fields)")
        check_launch(args)
        if isinstance(model, str):
            model, loaded_tokenizer = load_model_and_tokenizer(ModelConfig(model_name_or_path=model))
            processing_class = processing_class or loaded_tokenizer
        if processing_class is None:
            processing_class = load_tokenizer(model.config._name_or_path)
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        if peft_config is not None:
            try:
                from peft import get_peft_model
            except ImportError as err:
                raise L3MConfigError("peft_config: install peft (pip install 'l3m[peft]') to train adapters") from err
            model = get_peft_model(model, peft_config)
        if train_dataset is None:
            raise L3MConfigError("train_dataset: required (a datasets.Dataset of task data)")

        self.constraints = parse_constraints(constraints) if constraints is not None else args.parsed_constraints
        # solver "sft" ignores the constraints: no constraint steps, no constraint metrics
        self.bounds = [] if args.solver == "sft" else [bound for c in self.constraints for bound in c.bounds()]
        train_dataset = prepare_dataset(train_dataset, processing_class, args.max_length, args.seed, "train",
                                        field="train_dataset")
        if eval_dataset is not None:
            eval_dataset = prepare_dataset(eval_dataset, processing_class, args.max_length, args.seed, "eval",
                                           field="eval_dataset")

        super().__init__(
            model=model,
            args=args,
            data_collator=CompletionCollator(processing_class.pad_token_id),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # l3m's losses are per-micro-batch means, which the Trainer must divide by the gradient accumulation steps. It
        # does not when it takes the model for normalizing the loss over the accumulated batch (num_items_in_batch),
        # i.e. when the model accepts loss kwargs. Saying it does not is the switch every transformers 5.x reads
        # (`loss_is_scaled_for_ga` only exists since 5.19 and, left at None, follows it; TRL sets this one before
        # 5.19); it also spares the Trainer counting label tokens that l3m's losses do not use.
        self.model_accepts_loss_kwargs = False
        self.stop_ids = eos_ids(processing_class, model)
        self.solver = build_solver(args)
        place_reward_models([c.reward_func for c in self.constraints], self.accelerator.device)  # not trained
        self._constraint_step = False
        self._pending_estimates: list[torch.Tensor] = []
        self._step_multipliers: torch.Tensor | None = None
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._metric_marks: dict[str, int] | None = None  # metric counts when the current optimizer step began
        self.guard = NonFiniteGuard(args.max_consecutive_skipped_steps)
        self.infeasibility = InfeasibilityMonitor(self.bounds, args.infeasibility_patience)
        self._stop_signals: StopSignals | None = None
        self._staging_run_dir: str | None = None

    # Overridden to flip the coin once per optimizer step, and to close each optimizer step (after the last
    # gradient-accumulation micro-batch's backward, before clipping and the optimizer) in _end_optimizer_step.
    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        if self._metric_marks is None:  # the first micro-batch of this optimizer step
            self._metric_marks = {key: len(values) for key, values in self._metrics.items()}
        self._constraint_step = bool(self.bounds) and is_constraint_step(
            self.args.seed, step, self.args.objective_step_probability
        )
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            self.guard.flag("loss")
        if self.accelerator.sync_gradients:
            self._end_optimizer_step(model, step)
        return loss

    def _end_optimizer_step(self, model, step: int) -> None:
        """Skip the step if anything in it was non-finite, else fold its constraint estimate into the solver state
        (once per optimizer step, with the mean of its micro-batch estimates); then stop the run if asked to."""
        skip = self._on_any_process(self.guard.pending or not gradients_are_finite(model.parameters()))
        if self.guard.end_step(step, skip):
            drop_gradients(model.parameters())
            self._pending_estimates.clear()
            for key, values in self._metrics.items():  # the skipped step's values would poison the averages
                del values[self._metric_marks.get(key, 0):]
        elif self._pending_estimates:
            estimate = torch.stack(self._pending_estimates).mean(dim=0)
            self._pending_estimates.clear()
            self.solver.update_(estimate)
            self.infeasibility.observe(step, self.solver.estimate, self._step_multipliers, estimates=estimate)
        self._metric_marks = None
        self._metrics["step/constraint"].append(float(self._constraint_step))
        if self.bounds:
            for key, value in self.solver.step_metrics(step, self.state.max_steps).items():
                self._metrics[key].append(value)
        signalled = self._stop_signals is not None and self._stop_signals.received is not None
        if self._on_any_process(signalled or self.guard.exhausted):
            self.control.should_save = True  # the Trainer saves after this step's update, then stops
            self.control.should_training_stop = True

    def _on_any_process(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process, so that every process takes the same decision."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.gather(torch.tensor([float(flag)], device=self.accelerator.device)).max() > 0)

    # Overridden because the loss depends on the step kind; the inputs carry no model loss.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self._constraint_step:
            loss = self._constraint_loss(model, inputs)
        else:
            loss = self._objective_loss(model, inputs)
        return (loss, None) if return_outputs else loss

    def _objective_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """Eq. (1)/(3): the batch mean of the length-normalized NLL of the response tokens."""
        nll = response_nll(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        loss = nll.mean()
        if model.training:
            self._metrics["objective/loss"].append(self.accelerator.gather(loss.detach()).mean().item())
        return loss

    def _constraint_loss(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        """Eq. (11)-(12): REINFORCE on ``sum_i multiplier_i * C_i`` over responses sampled from the current policy."""
        args = self.args
        with process_local_sampling(self.accelerator):
            completions = sample_completions(
                self.accelerator.unwrap_model(model),
                inputs["prompt_input_ids"],
                inputs["prompt_attention_mask"],
                stop_ids=self.stop_ids,
                pad_token_id=self.processing_class.pad_token_id,
                num_generations=args.num_generations,
                max_new_tokens=args.max_completion_length,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
            )
        prompts = [p for p in inputs["prompts"] for _ in range(args.num_generations)]
        texts = self.processing_class.batch_decode(completions.completion_ids, skip_special_tokens=True)
        rewards = compute_rewards(self.constraints, prompts, texts, completions.completion_ids, allow_nonfinite=True,
                                  trainer_state=self.state)
        nonfinite = [name for name, values in rewards.items() if not torch.isfinite(values).all()]
        if nonfinite:  # a numerical event, not a user error: the step is skipped (l3m.training.guards)
            self.guard.flag(f"reward of {', '.join(nonfinite)}")
        device = completions.sequences.device
        local_violations = violations(self.bounds, rewards).to(device)  # (N, K), each kind's per-sample term

        # The estimate that drives the multipliers is reduced across processes first: every process holds the same
        # estimate (the mean over all processes' responses), multipliers and EMA.
        all_violations = self.accelerator.gather(local_violations)
        estimate = all_violations.mean(dim=0)
        multipliers = self.solver.multipliers(self.state.global_step, self.state.max_steps, estimate)
        self._step_multipliers = multipliers
        self._pending_estimates.append(estimate.detach().cpu())

        # The gradient follows each kind's surrogate (the smoothed indicator for chance constraints).
        advantages = constraint_advantages(surrogate_violations(self.bounds, rewards).to(device),
                                           multipliers.to(device), args.reinforce_baseline,
                                           group_size=args.num_generations,
                                           lengths=completions.completion_mask.sum(dim=1))  # Eq. 12's |y|
        loss = reinforce_loss(advantages, completion_logps(model, completions))

        lengths = torch.tensor([len(ids) for ids in completions.completion_ids], dtype=torch.float32, device=device)
        self._metrics["completions/mean_length"].append(self.accelerator.gather(lengths).mean().item())
        self._metrics["completions/truncated_frac"].append(
            self.accelerator.gather(completions.truncated.float()).mean().item())
        satisfied = self.accelerator.gather(satisfied_mask(self.bounds, rewards).float().to(device))  # (N, K)
        for i, bound in enumerate(self.bounds):
            self._metrics[f"constraints/{bound.name}/value"].append(estimate[i].item())
            self._metrics[f"constraints/{bound.name}/multiplier"].append(multipliers[i].item())
            self._metrics[f"constraints/{bound.name}/satisfied_frac"].append(satisfied[:, i].mean().item())
        for name, values in rewards.items():
            gathered = self.accelerator.gather(values.to(device))
            self._metrics[f"rewards/{name}/mean"].append(gathered.mean().item())
        return loss

    # Overridden so that evaluation reports the task objective (the inputs carry no model-computed loss).
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self._objective_loss(model, inputs)
        return loss.detach(), None, None

    # Overridden to add the buffered solver metrics (averaged over the logging interval) to the Trainer's logs.
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not any(key.startswith("eval_") for key in logs):
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items() if v}}
            if self.solver.estimate is not None:
                for bound, value in zip(self.bounds, self.solver.estimate.tolist()):
                    logs[f"constraints/{bound.name}/ema"] = value
            logs["train/skipped_steps"] = self.guard.skipped
            logs.update(self.solver.log_values())
            self._metrics.clear()
        super().log(logs, start_time)

    def solver_state(self) -> dict:
        """Everything the solver changes during training, saved beside each checkpoint."""
        return {
            "solver": self.args.solver,
            "multipliers": self.solver.state_dict(),
            "global_step": self.state.global_step,
            "constraints": [b.name for b in self.bounds],
            "coin": {"seed": self.args.seed, "objective_step_probability": self.args.objective_step_probability},
            "guard": self.guard.state_dict(),
            "infeasibility": self.infeasibility.state_dict(),
        }

    # The two private hooks below are overridden because transformers offers no public way to save a checkpoint
    # atomically (docs/reliability.md). Trainer._save_checkpoint(model, trial) (transformers 5.24: trainer.py
    # L3363-3430) writes straight into <_get_output_dir(trial)>/checkpoint-<global_step> (weights, optimizer, scheduler,
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
            with open(os.path.join(staging, name, SOLVER_STATE_NAME), "w", encoding="utf-8") as f:
                json.dump(self.solver_state(), f, indent=2)
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
            logger.log(logging.INFO if ": satisfied " in line else logging.WARNING, "Constraint %s", line)
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
        if state["solver"] != self.args.solver:
            raise L3MConfigError(f"solver: the checkpoint was trained with solver {state['solver']!r}, "
                                 f"not {self.args.solver!r}")
        self.solver.load_state_dict(state["multipliers"])
        if "infeasibility" in state:
            self.infeasibility.load_state_dict(state["infeasibility"])
