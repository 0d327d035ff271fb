"""``L3MTrainer``: the one place that sequences an L3M optimizer step (Sec. 5 of the L3M paper).

Each optimizer step is an objective step or a constraint step, by a seeded schedule (Sec. 5.4's fair coin, spread
evenly by default: :mod:`l3m.training.coin`). An *objective step* takes a gradient step on the task objective ``L``
(length-normalized response NLL, Eq. 1/3). A *constraint step* samples responses for the batch's prompts,
scores them, and takes a REINFORCE step on ``sum_i multiplier_i * C_i`` with the log-barrier multipliers (Eq. 11,
Sec. 5.2) — or, with ``args.solver`` ``mm`` / ``lagged_dual``, a baseline's learned multipliers (:mod:`l3m.solvers`).
The Trainer clips each step's gradient on its own, so the two parts are clipped separately. With no constraints, or
``solver="sft"``, every step is an objective step: plain SFT.

Reliability (docs/reliability.md): a step with a non-finite loss, gradient or reward is skipped (:mod:`l3m.training.guards`);
checkpoints are written atomically and SIGTERM/SIGINT save one before stopping (:mod:`l3m.training.checkpoints`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer

from l3m.config import L3MConfig, ModelConfig
from l3m.confidence import RunningConfidence, StepStatistics, pooled_statistics, step_statistics
from l3m.constraints import (Constraint, compute_rewards, parse_constraints, satisfied_mask, surrogate_violations,
                             target_metrics, violations)
from l3m.data import CompletionCollator, prepare_dataset, prepare_prompts, with_constraint_prompts
from l3m.errors import L3MConfigError
from l3m.hardware import warn_slow_bf16
from l3m.loading import load_model_and_tokenizer, load_tokenizer
from l3m.rewards.models import place_reward_models
from l3m.sampling import completion_logps, eos_ids, response_nll, sample_completions
from l3m.solvers import build_solver
from l3m.training.batch_order import CoinSampler
from l3m.training.coin import is_constraint_step
from l3m.training.distributed import check_launch, process_local_sampling, shards_weights
from l3m.training.guards import InfeasibilityMonitor, NonFiniteGuard, drop_gradients, gradients_are_finite
from l3m.training.reinforce import constraint_advantages, reinforce_loss
from l3m.training.solver_state import SolverTrainerMixin

logger = logging.getLogger(__name__)


class L3MTrainer(SolverTrainerMixin, Trainer):
    """Fine-tune a causal LM on task data subject to reward constraints, with the L3M log barrier.

    Args:
        model: a `PreTrainedModel`, or a hub id / local folder / ``demo`` loaded by :mod:`l3m.loading` (float32).
        args: an :class:`l3m.L3MConfig`.
        train_dataset / eval_dataset: `datasets.Dataset` with ``messages`` or ``prompt``/``completion`` columns.
        processing_class: the tokenizer; loaded from the model's folder when omitted.
        constraints: :class:`l3m.Constraint` s or records; defaults to ``args.constraints``.
        constraint_dataset: prompts for the constraint steps (:func:`l3m.data.prepare_prompts`: a ``prompt``
            column, or task data whose answers are not used), e.g. the prompts the model will be deployed on; by
            default constraint steps sample responses to the task data's prompts. Objective steps read
            ``train_dataset`` either way.
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
        constraint_dataset=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        args = args if args is not None else L3MConfig(output_dir="l3m-output")
        if not isinstance(args, L3MConfig):
            raise L3MConfigError("args: expected an l3m.L3MConfig (it carries the solver's fields)")
        check_launch(args)
        warn_slow_bf16(args)
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
        self._constraint_prompts = 0  # rows of train_dataset after the task examples: the constraint steps' prompts
        if constraint_dataset is not None:
            if not self.constraints:
                raise L3MConfigError("constraint_dataset: given, but there are no constraints to sample it for")
            prompts = prepare_prompts(constraint_dataset, processing_class, args.max_length, args.seed)
            train_dataset = with_constraint_prompts(train_dataset, prompts)
            self._constraint_prompts = len(prompts)
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
        self.confidence = RunningConfidence(self.bounds, self.solver.estimate_smoothing)
        # per micro-batch: the statistics against the training targets (l3m.confidence), and against the bounds
        self._pending_estimates: list[tuple[StepStatistics, StepStatistics]] = []
        self._step_multipliers: torch.Tensor | None = None
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._metric_marks: dict[str, int] | None = None  # metric counts when the current optimizer step began
        self.guard = NonFiniteGuard(args.max_consecutive_skipped_steps)
        self.infeasibility = InfeasibilityMonitor(self.bounds, args.infeasibility_patience,
                                                  self.solver.estimate_smoothing)

    # Overridden so that objective steps read the task data in the order plain SFT does (batch_order.py).
    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        args = self.args
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return CoinSampler(len(dataset) - self._constraint_prompts, per_step, args.seed, self._is_constraint_step,
                           constraint_examples=self._constraint_prompts)

    def _is_constraint_step(self, step: int) -> bool:
        args = self.args
        return bool(self.bounds) and is_constraint_step(args.seed, step, args.objective_step_probability,
                                                        args.step_schedule)

    # Overridden to flip the coin once per optimizer step, and to close each optimizer step (after the last
    # gradient-accumulation micro-batch's backward, before clipping and the optimizer) in _end_optimizer_step.
    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        if self._metric_marks is None:  # the first micro-batch of this optimizer step
            self._metric_marks = {key: len(values) for key, values in self._metrics.items()}
        self._constraint_step = self._is_constraint_step(step)
        return self._guarded_training_step(model, inputs, num_items_in_batch, step)

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
            statistics, bound_statistics = (pooled_statistics(x) for x in zip(*self._pending_estimates))
            self._pending_estimates.clear()
            estimate, terms = self.confidence.update_(statistics)
            self.solver.update_(estimate)
            self.infeasibility.observe(step, self.solver.estimate, self._step_multipliers,
                                       estimates=statistics.mean + terms, bound_statistics=bound_statistics,
                                       confidence_terms=terms)
        self._metric_marks = None
        self._metrics["step/constraint"].append(float(self._constraint_step))
        if self.bounds:
            for key, value in self.solver.step_metrics(step, self.state.max_steps).items():
                self._metrics[key].append(value)
        self._stop_requested()

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
                synced=shards_weights(self.accelerator),
            )
        prompts = [p for p in inputs["prompts"] for _ in range(args.num_generations)]
        texts = self.processing_class.batch_decode(completions.completion_ids, skip_special_tokens=True)
        rewards = compute_rewards(self.constraints, prompts, texts, completions.completion_ids, allow_nonfinite=True,
                                  trainer_state=self.state)
        nonfinite = [name for name, values in rewards.items() if not torch.isfinite(values).all()]
        if nonfinite:  # a numerical event, not a user error: the step is skipped (l3m.training.guards)
            self.guard.flag(f"reward of {', '.join(nonfinite)}")
        device = completions.sequences.device
        # (N, K), each kind's per-sample term against the training target (each bound's margin)
        local_violations = violations(self.bounds, rewards, target=True).to(device)

        # The estimate that drives the multipliers is reduced across processes first: every process holds the same
        # estimate (the mean over all processes' responses, plus for a confidence z standard errors of the running
        # estimate, l3m.confidence), multipliers and EMA.
        statistics = step_statistics(self.accelerator.gather(local_violations), args.num_generations)
        estimate, confidence_terms = self.confidence.estimate(statistics)
        multipliers = self.solver.multipliers(self.state.global_step, self.state.max_steps, estimate)
        self._step_multipliers = multipliers
        bound_statistics = step_statistics(self.accelerator.gather(violations(self.bounds, rewards).to(device)),
                                           args.num_generations)
        self._pending_estimates.append((statistics, bound_statistics))

        # The gradient follows each kind's surrogate (the smoothed indicator for chance constraints).
        advantages = constraint_advantages(surrogate_violations(self.bounds, rewards).to(device),
                                           multipliers.to(device), args.reinforce_baseline,
                                           group_size=args.num_generations,
                                           lengths=completions.completion_mask.sum(dim=1))  # Eq. 12's |y|
        # scored as sampled: at the sampling temperature, dropout off (docs/solver.md, "What the log-prob pass scores")
        loss = reinforce_loss(advantages, completion_logps(model, completions, temperature=args.temperature))

        lengths = torch.tensor([len(ids) for ids in completions.completion_ids], dtype=torch.float32, device=device)
        self._metrics["completions/mean_length"].append(self.accelerator.gather(lengths).mean().item())
        self._metrics["completions/truncated_frac"].append(
            self.accelerator.gather(completions.truncated.float()).mean().item())
        satisfied = self.accelerator.gather(satisfied_mask(self.bounds, rewards).float().to(device))  # (N, K)
        for i, bound in enumerate(self.bounds):
            for key, value in target_metrics(bound, confidence_terms[i].item()).items():
                self._metrics[key].append(value)
            self._metrics[f"constraints/{bound.name}/value"].append((statistics.mean + confidence_terms)[i].item())
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

    def solver_state_extras(self) -> dict:
        """The step schedule's settings, saved with the solver state (a resumed run takes the same kinds of steps)."""
        return {"coin": {"seed": self.args.seed, "objective_step_probability": self.args.objective_step_probability,
                         "schedule": self.args.step_schedule}}
