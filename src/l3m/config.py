"""Configuration dataclasses: the trainer's :class:`L3MConfig`, and the CLI's data and model arguments.

YAML keys equal the field names; ``l3m train --config run.yaml --key value`` overrides a file's values.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field

import trl
import yaml
from transformers import TrainingArguments

from l3m.constraints import parse_constraints
from l3m.errors import L3MConfigError
from l3m.solvers import SOLVERS, renamed_solver_message
from l3m.training.coin import STEP_SCHEDULES
from l3m.training.reinforce import BASELINES


@dataclass
class SolverConfig:
    """The constraints and the solver that weights them: the fields :class:`L3MConfig` (SFT objective) and
    :class:`l3m.ConstrainedGRPOConfig` (reward objective) share, with the same names and meanings."""

    solver: str = field(
        default="l3m",
        metadata={"help": "Where the constraint multipliers come from: 'l3m' (log barrier, Sec. 5), 'mm' (minimax "
                          "Lagrangian: projected dual ascent after every constraint step), 'lagged_dual' (lagged dual "
                          "ascent: multipliers fixed for dual_update_steps constraint steps, then one dual step on "
                          "their mean; not CAID, which is `l3m align`), 'fixed' "
                          "(multiplier_init for every constraint, never updated: a hand-weighted penalty) or 'sft' "
                          "(ignore the constraints: plain SFT)."},
    )
    constraints: list[dict] | str | None = field(
        default=None,
        metadata={"help": "Constraint records, e.g. [{name: length, reward: length_tokens, min: 20, max: 40}]. "
                          "On the command line: a YAML/JSON string. Empty means plain SFT."},
    )
    mu_init: float = field(default=1.0, metadata={"help": "Initial log-barrier parameter mu (App. A: 1)."})
    mu_final: float = field(default=1e-6, metadata={"help": "Final log-barrier parameter mu (App. A: 1e-6)."})
    ema_smoothing: float = field(
        default=0.1, metadata={"help": "Weight of the newest estimate in the EMA of each constraint value (Sec. 5.4); "
                                       "a constraint's confidence term is z standard errors of this EMA."}
    )
    dual_lr: float = field(
        default=0.05,
        metadata={"help": "Solvers mm/lagged_dual: dual step size, lambda <- max(0, lambda + dual_lr * C) with C the "
                          "measured constraint value (> 0 violated). MM is sensitive to it (Sec. 6.3)."},
    )
    multiplier_init: float = field(
        default=0.0,
        metadata={"help": "Solvers mm/lagged_dual: initial multipliers (> 0 with dual_log_parametrization)."},
    )
    multiplier_max: float | None = field(
        default=None, metadata={"help": "Solvers mm/lagged_dual: cap on the multipliers; unset means no cap."}
    )
    dual_warmup_steps: int = field(
        default=0, metadata={"help": "Solver mm: no dual update during the first this many constraint steps."}
    )
    dual_log_parametrization: bool = field(
        default=False,
        metadata={"help": "Solver mm: learn log(lambda) instead, log(lambda) <- log(lambda) + dual_lr * C, as "
                          "Safe-RLHF's PPO-Lag does (lambda stays positive without projection; needs "
                          "multiplier_init > 0)."},
    )
    dual_ema_smoothing: float = field(
        default=1.0,
        metadata={"help": "Solver mm: weight of the newest estimate in the EMA of each constraint value that drives "
                          "the dual step; 1.0 uses the step's own estimate."},
    )
    dual_update_steps: int = field(
        default=10,
        metadata={"help": "Solver lagged_dual: constraint steps per outer iteration (multipliers fixed within it; "
                          "one dual step on the iteration's mean estimate at its end)."},
    )
    dual_warm_start: bool = field(
        default=False,
        metadata={"help": "Solver lagged_dual: start from lambda = dual_lr * max(0, C) of the first estimate instead "
                          "of multiplier_init (one projected dual step from lambda = 0 on the first batch)."},
    )
    max_consecutive_skipped_steps: int = field(
        default=5,
        metadata={"help": "Stop training (saving a checkpoint of the last good weights) after this many optimizer "
                          "steps in a row were skipped for a non-finite loss, gradient or reward."},
    )
    infeasibility_patience: int = field(
        default=100,
        metadata={"help": "Warn that a constraint may be infeasible when each step's own estimate of it stays "
                          "violated for this many constraint steps in a row."},
    )

    def _check_solver_fields(self, solvers: tuple[str, ...]) -> None:
        """Parse the constraints and check every solver field, naming the field in the error."""
        if isinstance(self.constraints, str):
            try:
                self.constraints = yaml.safe_load(self.constraints)
            except yaml.YAMLError as err:
                raise L3MConfigError(f"constraints: not valid YAML/JSON ({err})") from err
        self.parsed_constraints = parse_constraints(self.constraints)
        _check_field_types(self, SolverConfig)
        renamed = renamed_solver_message(self.solver)
        _check(renamed is None, "solver", renamed)
        _check(self.solver in solvers, "solver", f"must be one of {', '.join(solvers)}, got {self.solver!r}")
        _check(self.mu_init > 0, "mu_init", f"must be > 0, got {self.mu_init}")
        _check(0 < self.mu_final < self.mu_init, "mu_final",
               f"must be in (0, mu_init={self.mu_init}) so that mu decays, got {self.mu_final}")
        _check(0 < self.ema_smoothing <= 1, "ema_smoothing", f"must be in (0, 1], got {self.ema_smoothing}")
        _check(self.dual_lr >= 0, "dual_lr", f"must be >= 0, got {self.dual_lr}")
        _check(self.multiplier_init >= 0, "multiplier_init", f"must be >= 0, got {self.multiplier_init}")
        _check(not self.dual_log_parametrization or self.multiplier_init > 0, "multiplier_init",
               f"must be > 0 with dual_log_parametrization (log lambda starts at its log), got {self.multiplier_init}")
        _check(self.multiplier_max is None or self.multiplier_max >= self.multiplier_init, "multiplier_max",
               f"must be >= multiplier_init={self.multiplier_init}, got {self.multiplier_max}")
        _check(self.dual_warmup_steps >= 0, "dual_warmup_steps", f"must be >= 0, got {self.dual_warmup_steps}")
        _check(0 < self.dual_ema_smoothing <= 1, "dual_ema_smoothing",
               f"must be in (0, 1], got {self.dual_ema_smoothing}")
        _check(self.dual_update_steps >= 1, "dual_update_steps", f"must be >= 1, got {self.dual_update_steps}")
        _check(self.max_consecutive_skipped_steps >= 1, "max_consecutive_skipped_steps",
               f"must be >= 1, got {self.max_consecutive_skipped_steps}")
        _check(self.infeasibility_patience >= 1, "infeasibility_patience",
               f"must be >= 1, got {self.infeasibility_patience}")


@dataclass
class L3MConfig(SolverConfig, TrainingArguments):
    r"""Configuration of :class:`l3m.L3MTrainer`: `transformers.TrainingArguments` plus the solver's fields.

    > Solver

    solver (`str`, defaults to `"l3m"`): where the weights of the constraint gradients come from (`l3m.solvers`):
        ``"l3m"`` the log barrier (Sec. 5); ``"mm"`` the minimax-Lagrangian baseline, multipliers learned by
        projected dual ascent (Sec. 4.2, 6.3); ``"lagged_dual"`` lagged dual ascent, multipliers fixed for
        ``dual_update_steps`` constraint steps, then one dual step on their mean estimate (formerly ``"dual"``; not
        CAID, the iterative dual alignment method of Zhang et al. 2025, which is ``l3m align``); ``"fixed"`` holds
        ``multiplier_init`` (a hand-weighted penalty); ``"sft"`` ignores the constraints (plain SFT). Everything else
        (sampling, rewards, REINFORCE, objective steps, logging, checkpoints) is shared.

    > Constraints and the log barrier (Sec. 5 of the L3M paper)

    constraints (`list[dict]`, *optional*): records ``{name, reward, min, max}``; a range expands into two
        constraints. Empty means plain SFT.
    mu_init (`float`, defaults to `1.0`) / mu_final (`float`, defaults to `1e-6`): the barrier parameter decays
        exponentially from ``mu_init`` to ``mu_final`` over the planned optimizer steps (App. A).
    ema_smoothing (`float`, defaults to `0.1`): weight of a new estimate in the EMA of each constraint value; a
        constraint's ``confidence`` term is ``z`` standard errors of this EMA (:mod:`l3m.confidence`).
    objective_step_probability (`float`, defaults to `0.5`): probability that an optimizer step is an objective
        step rather than a constraint step (the fair coin of Sec. 5.4).
    step_schedule (`str`, defaults to `"alternate"`): how the two kinds are spread over the steps
        (:mod:`l3m.training.coin`): evenly at a seeded phase, or the paper's independent coin per step (``"coin"``).
    reinforce_baseline (`str`, defaults to `"leave_one_out_per_token"`): control variate of the REINFORCE estimate
        of Eq. 12 (:func:`l3m.training.reinforce.constraint_advantages` states what each one estimates; chosen by
        measurement on the demo, docs/solver.md).

    > Learned multipliers (solvers ``mm`` and ``lagged_dual``)

    dual_lr (`float`, defaults to `0.05`): step size of the dual update ``lambda <- max(0, lambda + dual_lr * C)``.
    multiplier_init (`float`, defaults to `0.0`) / multiplier_max (`float`, *optional*): initial multipliers and an
        optional cap on them.
    dual_warmup_steps (`int`, defaults to `0`): ``mm`` takes no dual step during its first that many constraint steps.
    dual_log_parametrization (`bool`, defaults to `False`): ``mm`` learns ``log lambda`` (Safe-RLHF):
        ``log lambda <- log lambda + dual_lr * C``.
    dual_ema_smoothing (`float`, defaults to `1.0`): weight of a new estimate in ``mm``'s EMA of the constraint values
        (1.0: the step's own estimate).
    dual_update_steps (`int`, defaults to `10`): constraint steps per outer iteration of ``lagged_dual``.
    dual_warm_start (`bool`, defaults to `False`): ``lagged_dual`` starts from ``dual_lr * max(0, C)`` of its first
        estimate.

    > Sampling for constraint steps (App. A: top-p 0.9)

    num_generations, max_completion_length, temperature, top_p, top_k.

    > Reliability (docs/reliability.md)

    max_consecutive_skipped_steps (`int`, defaults to `5`): optimizer steps in a row skipped for a non-finite loss,
        gradient or reward after which training stops (with a checkpoint of the last good weights).
    infeasibility_patience (`int`, defaults to `100`): constraint steps in a row a constraint's per-step estimate may
        stay violated before it is reported as possibly infeasible.

    > Data

    max_length (`int`, defaults to `512`): examples whose prompt plus response exceed it are dropped (App. A).

    NOTE: defaults that differ from `TrainingArguments`: ``learning_rate=1e-5``, ``lr_scheduler_type="cosine"``,
    ``weight_decay=0.1`` (App. A), ``logging_steps=10``, ``remove_unused_columns=False`` (the trainer needs its
    prompt columns), ``save_strategy="no"``.
    """

    objective_step_probability: float = field(
        default=0.5,
        metadata={"help": "Probability that an optimizer step is an objective (SFT) step; otherwise it is a "
                          "constraint step. 0.5 is the paper's fair coin (Sec. 5.4)."},
    )
    step_schedule: str = field(
        default="alternate",
        metadata={"help": "How objective and constraint steps are spread: 'alternate' (every window of steps holds "
                          "its share of each kind to within one step, at a seeded phase: the coin's marginals "
                          "without its streaks) or 'coin' (the paper's independent fair coin per step, Sec. 5.4)."},
    )
    reinforce_baseline: str = field(
        default="leave_one_out_per_token",
        metadata={"help": "Control variate for the REINFORCE estimate of Eq. 12: 'leave_one_out_per_token' (the mean "
                          "per-token violation c/|y| of the other responses to the same prompt, or of the batch when "
                          "num_generations is 1, times |y|: keeps the paper's expectation), 'leave_one_out' (the "
                          "same on c itself: with length-normalized log-likelihoods it shifts the expected gradient "
                          "by a term in the response length) or 'none' (the paper's plain Monte-Carlo average)."},
    )
    num_generations: int = field(default=4, metadata={"help": "Responses sampled per prompt in a constraint step."})
    max_completion_length: int = field(
        default=64, metadata={"help": "Maximum new tokens per sampled response (max_new_tokens)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of constraint steps; the REINFORCE log-prob pass scores "
                                       "the samples at the same temperature (log_softmax(logits / temperature))."}
    )
    top_p: float = field(
        default=0.9, metadata={"help": "Nucleus sampling probability (App. A: 0.9). The log-prob pass scores the full "
                                       "softmax, not the renormalized nucleus: below 1 the REINFORCE estimate is "
                                       "slightly off-policy (docs/solver.md); 1 makes it on-policy."}
    )
    top_k: int = field(default=0, metadata={"help": "Top-k sampling; 0 disables it (the paper uses top-p only). Like "
                                                    "top_p, not renormalized in the log-prob pass."})
    max_length: int = field(
        default=512, metadata={"help": "Examples whose prompt plus response exceed this many tokens are dropped."}
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial learning rate for the optimizer."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (App. A: cosine)."})
    weight_decay: float = field(default=0.1, metadata={"help": "Weight decay (App. A: 0.1)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the trainer reads its own prompt/completion columns."}
    )
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy: 'no', 'steps' or 'epoch'."})

    def __post_init__(self):
        self._check_solver_fields(SOLVERS)
        _check_field_types(self, L3MConfig)
        _check(0 <= self.objective_step_probability <= 1, "objective_step_probability",
               f"must be in [0, 1], got {self.objective_step_probability}")
        _check(self.step_schedule in STEP_SCHEDULES, "step_schedule",
               f"must be one of {', '.join(STEP_SCHEDULES)}, got {self.step_schedule!r}")
        _check(self.reinforce_baseline in BASELINES, "reinforce_baseline",
               f"must be one of {', '.join(BASELINES)}, got {self.reinforce_baseline!r}")
        _check(self.num_generations >= 1, "num_generations", f"must be >= 1, got {self.num_generations}")
        _check(self.max_completion_length >= 1, "max_completion_length",
               f"must be >= 1, got {self.max_completion_length}")
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        _check(self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")
        _check(self.learning_rate >= 0, "learning_rate", f"must be >= 0, got {self.learning_rate}")
        _check(self.per_device_train_batch_size >= 1, "per_device_train_batch_size",
               f"must be >= 1, got {self.per_device_train_batch_size}")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
               f"must be >= 1, got {self.gradient_accumulation_steps}")
        _check(not self.remove_unused_columns, "remove_unused_columns",
               "must be False: the trainer needs its prompt and completion columns")
        super().__post_init__()


# the scalar field types of L3MConfig: accepted Python values, and how an error names them
_SCALAR_TYPES = {str: ((str,), "a string"), int: ((int,), "an integer"), bool: ((bool,), "true or false"),
                 float: ((int, float), "a number")}


def _check_field_types(config, cls) -> None:
    """The scalar fields ``cls`` declares hold values of their type (ints may stand for floats, None for an
    optional field); floats are finite. The types come from the resolved annotations (HfArgumentParser resolves
    a dataclass's field types in place, so ``Field.type`` may be a string or a type)."""
    hints = typing.get_type_hints(cls)
    for name in cls.__annotations__:
        hint, optional = hints[name], False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint, optional = (args[0], len(args) < len(typing.get_args(hint))) if len(args) == 1 else (None, False)
        if hint not in _SCALAR_TYPES:
            continue
        value, (expected, description) = getattr(config, name), _SCALAR_TYPES[hint]
        if value is None and optional:
            continue
        if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
            raise L3MConfigError(f"{name}: expected {description}, got {value!r}")
        if float in expected and not isinstance(value, bool):
            _check(math.isfinite(value), name, f"expected a finite number, got {value!r}")
            setattr(config, name, float(value))



@dataclass
class ScriptArguments:
    """Where the task data comes from (used by ``l3m train`` and ``l3m eval``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A hub dataset name, or a local .json/.jsonl/.parquet file or a folder of them, with "
                          "'messages' or 'prompt'/'completion' columns."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The hub dataset's configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_validation_split: str = field(default="validation", metadata={"help": "Split for validation."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split for `l3m eval`."})
    validation_size: float = field(
        default=0.05,
        metadata={"help": "When the source has no validation split: fraction (< 1) or count of examples held out."},
    )
    test_size: float = field(
        default=0.05, metadata={"help": "When the source has no test split: fraction (< 1) or count held out."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training examples (after splitting)."}
    )


@dataclass
class TrainScriptArguments(ScriptArguments):
    """``l3m train``'s data: the task data, and optionally prompts of the user's own for the constraint steps."""

    constraint_dataset_name: str | None = field(
        default=None,
        metadata={"help": "Prompts the constraint steps sample responses to, e.g. the prompts the model will be deployed "
                          "on: a hub dataset or local .json/.jsonl/.parquet file or folder with a 'prompt' column (or "
                          "task data, whose answers are not used). Default: the task data's prompts. The constraints "
                          "are estimated, and met, on these prompts (docs/solver.md)."},
    )
    constraint_dataset_config: str | None = field(
        default=None, metadata={"help": "The constraint prompts' hub configuration name."})
    constraint_dataset_split: str = field(default="train", metadata={"help": "The split of constraint prompts."})


@dataclass
class EvalArguments:
    """What ``l3m eval`` evaluates, and where the result goes."""

    model: str | None = field(default=None, metadata={"help": "The folder of a saved model (or LoRA adapter)."})
    output: str | None = field(
        default=None, metadata={"help": "Where to write the result JSON; default: eval_results.json in the model's folder."}
    )
    reference: str | None = field(
        default=None,
        metadata={"help": "Also report the KL(model || reference) in nats per response on the held-out prompts: a "
                          "model folder or hub id with the model's tokenizer, 'demo', or 'base' (the base model of a "
                          "LoRA adapter: the same weights with the adapter disabled, no second copy)."},
    )
    prompts: str | None = field(
        default=None,
        metadata={"help": "Evaluate on these prompts instead of the data's test split, e.g. held-out prompts of the "
                          "kind the model will be deployed on: a hub dataset or local .json/.jsonl/.parquet file or "
                          "folder with a 'prompt' column (or task data, whose answers are not used). Reports "
                          "constraints, lengths and rewards; no task log-ppl (there are no answers)."},
    )
    prompts_split: str = field(default="train", metadata={"help": "The split of --prompts."})

    def __post_init__(self):
        _check(bool(self.model), "--model", "required (the folder of a saved model)")


@dataclass
class ModelConfig(trl.ModelConfig):
    """Which model to fine-tune, and how: TRL's model arguments (dtype, LoRA through peft, quantization).

    ``model_name_or_path: demo`` names the embedded SmolLM2-135M-Instruct. Unlike TRL's, LoRA adapts every linear
    layer unless ``lora_target_modules`` says otherwise, and ``trust_remote_code`` is a model argument (TRL 1.x moved
    it into each trainer's config).
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A hub model id or a local folder; 'demo' for the embedded SmolLM2-135M."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the hub."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules LoRA adapts: 'all-linear' (every linear layer but the output head) or names, "
                          "e.g. q_proj v_proj."},
    )


@dataclass
class TrainerModelConfig(trl.ModelConfig):
    """The model arguments of ``l3m grpo`` and ``l3m align``: :class:`ModelConfig`'s, except ``trust_remote_code``,
    which their trainer configs (TRL's ``GRPOConfig``, ``DPOConfig``) already have (the loader reads it there)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A hub model id or a local folder; 'demo' for the embedded SmolLM2-135M."}
    )
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules LoRA adapts: 'all-linear' (every linear layer but the output head) or names, "
                          "e.g. q_proj v_proj."},
    )


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise L3MConfigError(f"{name}: {message}")
