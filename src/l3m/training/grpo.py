r"""``ConstrainedGRPOTrainer``: TRL's ``GRPOTrainer`` maximizing a reward subject to l3m's constraints.

The per-sample reward GRPO normalizes and optimizes is :math:`r_0(x, y) - \sum_i \lambda_i c_i(y)`, with
:math:`c_i` a one-sided constraint's per-sample term (:meth:`l3m.constraints.Bound.values`: ``b_i - r_i`` for an
expectation constraint; the smoothed indicator for a chance constraint, :meth:`~l3m.constraints.Bound.surrogate`, as
in :class:`l3m.L3MTrainer`'s constraint steps) and :math:`\lambda` set by an l3m solver every generation batch.

How, with nothing of GRPO rewritten: the trainer hands TRL one reward column per one-sided constraint, whose value is
:math:`-c_i(y)`, after the objective's columns. ``_calculate_rewards`` (TRL's one place that scores a generation
batch) first scores the constraints, then lets TRL score every column and gather them across processes; the
constraint estimate :math:`\hat C = \text{mean}(c)` over all processes' samples then goes to the solver, and the
weights of the constraint columns (``reward_weights``, which TRL reads right after) become :math:`\lambda`.
Generation (vLLM included), advantages, clipping, KL, PEFT and distributed training stay TRL's. The solver's state is
advanced once per optimizer step (:mod:`l3m.training.guards` may skip a non-finite step first), saved beside each
checkpoint (``l3m_state.json``) and restored on resume. docs/grpo.md explains the choice of ``scale_rewards``.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import gather
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from l3m.confidence import RunningConfidence, StepStatistics, pooled_statistics, step_statistics
from l3m.constraints import (Constraint, compute_rewards, parse_constraints, satisfied_mask, surrogate_violations,
                             target_metrics, violations)
from l3m.data import check_prompt_columns
from l3m.errors import L3MConfigError, L3MDataError
from l3m.hardware import warn_slow_bf16
from l3m.rewards import resolve_reward
from l3m.rewards.models import place_reward_models
from l3m.solvers import build_solver
from l3m.training.grpo_config import ConstrainedGRPOConfig
from l3m.training.guards import InfeasibilityMonitor, NonFiniteGuard, drop_gradients, gradients_are_finite
from l3m.training.solver_state import SolverTrainerMixin

logger = logging.getLogger(__name__)


def prompt_dataset(dataset, field: str = "train_dataset"):
    """A dataset GRPO can sample from: a ``prompt`` column as it is (text, or a conversation), or ``messages``
    conversations cut after their last user turn (later assistant turns, e.g. reference answers, are dropped)."""
    check_prompt_columns(dataset, field=field)
    if "prompt" in dataset.column_names:
        return dataset

    def cut(example, idx):
        messages = example["messages"]
        users = [i for i, m in enumerate(messages or []) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise L3MDataError(f"{field}: messages of example {idx} have no user turn to answer")
        return {"prompt": messages[: users[-1] + 1]}

    return dataset.map(cut, with_indices=True, remove_columns=["messages"], desc=f"Prompts of {field}")


class _Batch:
    """What ``_calculate_rewards`` computed for the generation batch being scored, read by the reward columns."""

    text: tuple | None = None  # (prompts, completions, completion_ids) in l3m's reward contract
    columns: torch.Tensor | None = None  # (N, K) -c of every local sample and one-sided constraint


class _L3MReward:
    """An objective given as an l3m reward spec, called with l3m's inputs (text prompts with the chat template,
    text completions, completion ids without the end-of-turn token), as every constraint reward is."""

    def __init__(self, func, batch: _Batch):
        self.func, self.batch = func, batch
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        prompts, completions, completion_ids = self.batch.text
        return self.func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)


class _ConstraintColumn:
    """The reward column ``-c_i`` of one one-sided constraint (TRL logs it as ``rewards/constraint/<name>/...``)."""

    def __init__(self, batch: _Batch, index: int, name: str):
        self.batch, self.index = batch, index
        self.__name__ = f"constraint/{name}"

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        return self.batch.columns[:, self.index].tolist()


class ConstrainedGRPOTrainer(SolverTrainerMixin, GRPOTrainer):
    r"""GRPO on :math:`r_0 - \sum_i \lambda_i c_i` with :math:`\lambda` from an l3m solver.

    Args:
        model, train_dataset, eval_dataset, processing_class, peft_config, callbacks, optimizers, ...: as
            ``trl.GRPOTrainer``. The datasets need a ``prompt`` column or ``messages`` (:func:`prompt_dataset`).
        reward_funcs: the objective :math:`r_0`, one or a list; defaults to ``args.reward``. An l3m reward spec
            (a built-in name, ``module:function``, a reward-model mapping) is called with l3m's text inputs; a
            callable or ``nn.Module`` goes to TRL untouched (TRL's conventions). Several are summed with
            ``args.reward_weights``.
        args: a :class:`ConstrainedGRPOConfig`.
        constraints: :class:`l3m.Constraint` s or records; defaults to ``args.constraints``.
    """

    def __init__(self, model, reward_funcs=None, args: ConstrainedGRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, constraints: list[Constraint | dict] | None = None, **kwargs):
        if not isinstance(args, ConstrainedGRPOConfig):
            raise L3MConfigError("args: expected an l3m ConstrainedGRPOConfig (it carries the constraints and solver)")
        warn_slow_bf16(args)
        self.constraints = parse_constraints(constraints) if constraints is not None else args.parsed_constraints
        self.bounds = [bound for c in self.constraints for bound in c.bounds()]
        self._batch = _Batch()
        objective = self._objective(args.reward if reward_funcs is None else reward_funcs)
        weights = args.reward_weights
        if weights is not None and len(weights) != len(objective):
            raise L3MConfigError(f"reward_weights: {len(weights)} weights for {len(objective)} objective rewards")
        self._objective_weights = torch.tensor(weights if weights is not None else [1.0] * len(objective))
        columns = [_ConstraintColumn(self._batch, i, b.name) for i, b in enumerate(self.bounds)]
        if train_dataset is None:
            raise L3MConfigError("train_dataset: required (a datasets.Dataset of prompts)")
        train_dataset = prompt_dataset(train_dataset)
        if eval_dataset is not None:
            eval_dataset = prompt_dataset(eval_dataset, "eval_dataset")
        args.reward_weights = [*self._objective_weights.tolist(), *[0.0] * len(columns)]  # set each step
        try:
            super().__init__(model, reward_funcs=objective + columns, args=args, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, **kwargs)
        finally:
            args.reward_weights = weights
        self.solver = build_solver(args)
        place_reward_models([c.reward_func for c in self.constraints] + [getattr(f, "func", f) for f in objective],
                            self.accelerator.device)
        self.guard = NonFiniteGuard(args.max_consecutive_skipped_steps)
        self.infeasibility = InfeasibilityMonitor(self.bounds, args.infeasibility_patience,
                                                  self.solver.estimate_smoothing)
        self.confidence = RunningConfidence(self.bounds, self.solver.estimate_smoothing)
        # per scored batch: (statistics against the targets (l3m.confidence), lambda, satisfied fraction, statistics
        # against the user's bounds)
        self._pending: list[tuple[StepStatistics, torch.Tensor, torch.Tensor, StepStatistics]] = []

    def _objective(self, specs) -> list:
        """The objective's reward functions: l3m specs resolved and adapted to l3m's inputs, the rest as given."""
        specs = specs if isinstance(specs, (list, tuple)) else [] if specs is None else [specs]
        if not specs:
            raise L3MConfigError("reward: required, the objective to maximize (e.g. reward: length_tokens, "
                                 "'module:function' or {type: seqcls, path: ...})")
        return [_L3MReward(resolve_reward(spec, field=f"reward[{i}]" if len(specs) > 1 else "reward"), self._batch)
                if isinstance(spec, (str, dict)) else spec for i, spec in enumerate(specs)]

    def _l3m_inputs(self, prompts, completions, completion_ids) -> tuple[list[str], list[str], list[list[int]]]:
        """TRL's batch in l3m's reward contract: prompts as the policy sees them (chat template applied), completion
        texts, and completion ids without the end-of-turn token TRL keeps."""
        if is_conversational({"prompt": prompts[0]}):
            prompts = [self._tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True,
                                                           **self.chat_template_kwargs) for p in prompts]
            completions = ["".join(m.get("content") or "" for m in c if isinstance(m.get("content"), str))
                           for c in completions]
        ids = [list(c[:-1]) if c and c[-1] in self.eos_token_ids else list(c) for c in completion_ids]
        return list(prompts), list(completions), ids

    # Overridden (TRL's one place that scores a generation batch) to score the constraints, add them as reward
    # columns -c_i, and set their weights to the solver's multipliers once the estimate of all processes is known.
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if not self.bounds:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        device = self.accelerator.device
        self._batch.text = self._l3m_inputs(prompts, completions, completion_ids_list)
        extra = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")}
        rewards = compute_rewards(self.constraints, *self._batch.text, allow_nonfinite=True, trainer_state=self.state,
                                  **extra)
        nonfinite = [name for name, values in rewards.items() if not torch.isfinite(values).all()]
        if nonfinite:  # a numerical event, not a user error: the optimizer step is skipped
            self.guard.flag(f"reward of {', '.join(nonfinite)}")
        columns = -surrogate_violations(self.bounds, rewards)
        self._batch.columns = torch.where(torch.isfinite(columns), columns, torch.nan)  # TRL's nansum skips NaN
        try:
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self._batch.text = self._batch.columns = None
        if torch.isinf(rewards_per_func[:, : len(self._objective_weights)]).any():
            self.guard.flag("objective reward")
        # against the training targets; plus z standard errors of the running estimate for a confidence (l3m.confidence)
        group_size = self.num_generations if self.model.training else self.num_generations_eval
        statistics = step_statistics(gather(violations(self.bounds, rewards, target=True).to(device)), group_size)
        estimate, _ = self.confidence.estimate(statistics)
        if torch.isfinite(estimate).all():
            multipliers = self.solver.multipliers(self.state.global_step, self.state.max_steps, estimate).float()
            if self.model.training:
                satisfied = gather(satisfied_mask(self.bounds, rewards).float().to(device)).mean(dim=0).cpu()
                bound_statistics = step_statistics(gather(violations(self.bounds, rewards).to(device)), group_size)
                self._pending.append((statistics, multipliers, satisfied, bound_statistics))
        else:  # keep the last weights; the guard skips the step
            last = self.reward_weights[len(self._objective_weights):]
            multipliers = last if torch.isfinite(last).all() else torch.zeros(len(self.bounds))
        self.reward_weights = torch.cat([self._objective_weights, multipliers])
        return rewards_per_func

    # Overridden to close each optimizer step (after the last micro-batch's backward, before clipping and the
    # optimizer): skip it if anything was non-finite, else fold its constraint estimate into the solver.
    def training_step(self, model, inputs, num_items_in_batch=None):
        return self._guarded_training_step(model, inputs, num_items_in_batch, self.state.global_step)

    def _end_optimizer_step(self, model, step: int) -> None:
        skip = self._on_any_process(self.guard.pending or not gradients_are_finite(model.parameters()))
        metrics = self._metrics["train"]
        if self.guard.end_step(step, skip):
            drop_gradients(model.parameters())
            self._pending.clear()
        elif self._pending:
            statistics, multipliers, satisfied, bound_statistics = zip(*self._pending)
            self._pending.clear()
            statistics, bound_statistics = pooled_statistics(statistics), pooled_statistics(bound_statistics)
            multipliers = multipliers[-1]  # the weights the step's rewards used
            satisfied = torch.stack(satisfied).mean(dim=0)
            estimate, terms = self.confidence.update_(statistics)
            against_target = statistics.mean + terms  # the step's estimate against the training target
            self.solver.update_(estimate)
            self.infeasibility.observe(step, self.solver.estimate, multipliers, estimates=against_target,
                                       bound_statistics=bound_statistics, confidence_terms=terms)
            for i, bound in enumerate(self.bounds):
                for key, value in target_metrics(bound, terms[i].item()).items():
                    metrics[key].append(value)
                metrics[f"constraints/{bound.name}/value"].append(against_target[i].item())
                metrics[f"constraints/{bound.name}/multiplier"].append(multipliers[i].item())
                metrics[f"constraints/{bound.name}/satisfied_frac"].append(satisfied[i].item())
        if self.bounds:
            for key, value in self.solver.step_metrics(step, self.state.max_steps).items():
                metrics[key].append(value)
        self._stop_requested()

    # Overridden to add the solver's smoothed estimates and state to the training logs.
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and not any(key.startswith("eval_") for key in logs):
            if self.bounds and self.solver.estimate is not None:
                for bound, value in zip(self.bounds, self.solver.estimate.tolist()):
                    logs[f"constraints/{bound.name}/ema"] = value
                logs.update(self.solver.log_values())
            logs["train/skipped_steps"] = self.guard.skipped
        super().log(logs, start_time)

    def solver_state_extras(self) -> dict:
        return {"trainer": "grpo"}
