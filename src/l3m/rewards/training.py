r"""``l3m reward train``: learn a preference reward model with the Bradley-Terry loss (App. A.1 of the L3M paper).

The model's probability of preferring ``y+`` over ``y-`` is :math:`\sigma(r_\phi(y_+|x) - r_\phi(y_-|x))`, and
training minimizes :math:`-\log\sigma(r_\phi(y_+|x) - r_\phi(y_-|x))` over pairs. The reward
(:func:`l3m.rewards.models.sequence_rewards`) is, for ``reward_type: lm``, the length-normalized log-likelihood of the
response under a causal LM (the paper's choice, after DPO), or, for ``reward_type: seqcls``, the logit of a
one-output sequence-classification head. As in the paper, the held-out pairwise accuracy is measured every 10% of an
epoch and the best model is kept; the saved folder is a Hugging Face checkpoint plus ``l3m_reward.json``, which says
how to score with it (``reward: {path: <folder>}`` in a constraint).

Shapes: B pairs per batch, scored as one batch of 2B sequences (chosen first).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from l3m.config import ScriptArguments, _check
from l3m.errors import L3MConfigError
from l3m.files import write_json
from l3m.rewards.preference import PairCollator, prepare_preference_dataset
from l3m.rewards.models import REWARD_INFO_NAME, REWARD_MODEL_TYPES, sequence_rewards


@dataclass
class RewardConfig(TrainingArguments):
    r"""Configuration of :class:`RewardModelTrainer`: `transformers.TrainingArguments` plus the reward's fields.

    reward_type (`str`, defaults to `"lm"`): ``"lm"`` (length-normalized log-likelihood of a causal LM, App. A.1) or
        ``"seqcls"`` (a one-logit sequence-classification head on the same backbone).
    max_length (`int`, defaults to `512`): pairs whose prompt plus longer response exceed it are dropped.
    evals_per_epoch (`int`, defaults to `10`): held-out evaluations (and checkpoints) per epoch; the best by pairwise
        accuracy is loaded at the end (App. A.1: every 10% of the epoch).

    NOTE: defaults that differ from `TrainingArguments` (App. A.1 where it applies): ``num_train_epochs=2``,
    ``learning_rate=1e-5`` (the paper's 1e-6 is for LLaMA-7B), ``lr_scheduler_type="cosine"``,
    ``warmup_steps=0.1`` (10% of training), ``weight_decay=0.1``, ``eval_strategy``/``save_strategy="steps"`` with
    ``load_best_model_at_end=True`` on ``metric_for_best_model="accuracy"``, ``save_total_limit=1``,
    ``save_only_model=True``, ``logging_steps=10``, ``remove_unused_columns=False``.
    """

    reward_type: str = field(
        default="lm",
        metadata={"help": "'lm': the reward is the length-normalized log-likelihood of the response under a causal "
                          "LM (App. A.1); 'seqcls': the logit of a one-output sequence-classification head."},
    )
    max_length: int = field(
        default=512, metadata={"help": "Pairs whose prompt plus longer response exceed this many tokens are dropped."}
    )
    evals_per_epoch: int = field(
        default=10,
        metadata={"help": "Held-out evaluations and checkpoints per epoch; the one with the best pairwise accuracy "
                          "is kept (App. A.1: every 10% of the epoch)."},
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs over the preference pairs (App. A.1: 2)."})
    learning_rate: float = field(default=1e-5, metadata={"help": "Initial learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (App. A.1: cosine)."})
    warmup_steps: float = field(default=0.1, metadata={"help": "Warmup steps, or a fraction (< 1) of training."})
    weight_decay: float = field(default=0.1, metadata={"help": "Weight decay (App. A.1: 0.1)."})
    eval_strategy: str = field(default="steps", metadata={"help": "Keep 'steps': evals_per_epoch sets the steps."})
    save_strategy: str = field(default="steps", metadata={"help": "Keep 'steps': checkpoints follow evaluations."})
    load_best_model_at_end: bool = field(
        default=True, metadata={"help": "Load the checkpoint with the best held-out pairwise accuracy at the end."}
    )
    metric_for_best_model: str = field(default="accuracy", metadata={"help": "Held-out metric that picks the best."})
    save_total_limit: int = field(default=1, metadata={"help": "Checkpoints kept besides the best."})
    save_only_model: bool = field(
        default=True, metadata={"help": "Checkpoints hold only the weights (no optimizer state): cannot be resumed."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the trainer reads its own token-id columns."}
    )

    def __post_init__(self):
        _check(self.reward_type in REWARD_MODEL_TYPES, "reward_type",
               f"must be one of {', '.join(REWARD_MODEL_TYPES)}, got {self.reward_type!r}")
        _check(self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")
        _check(self.evals_per_epoch >= 1, "evals_per_epoch", f"must be >= 1, got {self.evals_per_epoch}")
        _check(not self.remove_unused_columns, "remove_unused_columns",
               "must be False: the trainer needs its chosen and rejected token ids")
        super().__post_init__()


@dataclass
class RewardScriptArguments(ScriptArguments):
    """Where the preference data comes from (``l3m reward train``): the task data's fields plus ``dataset_data_dir``.

    ``dataset_name`` takes a hub dataset (e.g. ``Anthropic/hh-rlhf``), local files with ``prompt``/``chosen``/
    ``rejected`` or HH ``chosen``/``rejected`` transcripts, or ``standin-helpful`` / ``standin-harmless``.
    """

    dataset_data_dir: str | None = field(
        default=None, metadata={"help": "The hub dataset's subfolder, e.g. harmless-base of Anthropic/hh-rlhf."}
    )


def pairwise_metrics(eval_prediction) -> dict[str, float]:
    """Held-out pairwise accuracy (fraction of pairs with ``r(y+) > r(y-)``; ties count half) and mean margin."""
    rewards = np.asarray(eval_prediction.predictions)  # (num_pairs, 2): chosen, rejected
    margin = rewards[:, 0] - rewards[:, 1]
    return {"accuracy": float(np.mean((margin > 0) + 0.5 * (margin == 0))), "margin": float(np.mean(margin))}


class RewardModelTrainer(Trainer):
    """Train a reward model on preference pairs with the Bradley-Terry loss.

    Args:
        model: a causal LM (``reward_type="lm"``) or a one-logit sequence-classification model (``"seqcls"``).
        args: a :class:`RewardConfig`.
        train_dataset / eval_dataset: preference data in any format of :mod:`l3m.rewards.preference`.
        processing_class: the model's tokenizer.
    """

    def __init__(self, model, args: RewardConfig, train_dataset, eval_dataset, processing_class, callbacks=None):
        if not isinstance(args, RewardConfig):
            raise L3MConfigError("args: expected an l3m.RewardConfig")
        if processing_class.pad_token_id is None:
            processing_class.pad_token = processing_class.eos_token
        if args.reward_type == "seqcls" and model.config.pad_token_id is None:
            model.config.pad_token_id = processing_class.pad_token_id
        train_dataset = prepare_preference_dataset(train_dataset, processing_class, args.max_length, "train")
        eval_dataset = prepare_preference_dataset(eval_dataset, processing_class, args.max_length, "validation")
        pairs_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        steps_per_epoch = math.ceil(len(train_dataset) / pairs_per_step)
        # App. A.1: validate after every 10% of the epoch; checkpoints follow, so the best one can be reloaded
        args.eval_steps = args.save_steps = max(1, steps_per_epoch // args.evals_per_epoch)
        super().__init__(model=model, args=args, data_collator=PairCollator(processing_class.pad_token_id),
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=pairwise_metrics, callbacks=callbacks)
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def pair_rewards(self, model, inputs) -> torch.Tensor:
        """Rewards ``(B, 2)`` of the chosen and rejected responses of a batch of pairs."""
        rewards = sequence_rewards(model, self.args.reward_type, inputs)
        return torch.stack(rewards.chunk(2), dim=1)

    # Overridden: the Bradley-Terry loss -log sigmoid(r(y+|x) - r(y-|x)) (App. A.1) replaces the model's own loss.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = self.pair_rewards(model, inputs)
        margin = rewards[:, 0] - rewards[:, 1]
        loss = -F.logsigmoid(margin).mean()
        if model.training:
            self._metrics["accuracy"].append((margin.detach() > 0).float().mean().item())
            self._metrics["margin"].append(margin.detach().mean().item())
        return (loss, rewards) if return_outputs else loss

    # Overridden: predictions are the pair rewards; the labels are a placeholder (the chosen side is always first).
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, rewards = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), rewards.detach(), torch.zeros(rewards.shape[0], device=rewards.device)

    # Overridden to add the training pairwise accuracy and margin (averaged over the logging interval).
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not any(key.startswith("eval_") for key in logs):
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items() if v}}
            self._metrics.clear()
        super().log(logs, start_time)


def save_reward_model(trainer: RewardModelTrainer, output_dir: str, metrics: dict | None = None) -> str:
    """Save the model and tokenizer in the Hugging Face layout plus ``l3m_reward.json`` (how to score with it)."""
    trainer.save_model(output_dir)
    if trainer.args.reward_type == "lm":
        scoring = ("mean log-likelihood per response token, the end-of-turn token included, of the response given "
                   "the prompt (prompt rendered with the tokenizer's chat template)")
    else:
        scoring = "the single logit of the sequence-classification head on prompt + response"
    info = {"type": trainer.args.reward_type, "normalization": "length" if trainer.args.reward_type == "lm" else None,
            "reward": scoring, "loss": "bradley-terry", "metrics": metrics or {}}
    return write_json(os.path.join(output_dir, REWARD_INFO_NAME), info)


def train_reward_model(script_args: RewardScriptArguments, args: RewardConfig, model_args) -> dict[str, float]:
    """What ``l3m reward train`` does: load pairs and the base model, train, keep the best, report held-out
    pairwise accuracy before and after on the test split, and save with ``l3m_reward.json``."""
    from transformers import AutoModelForSequenceClassification

    from l3m.loading import load_model_and_tokenizer, load_splits
    from l3m.rewards.preference import check_preference_columns

    splits = load_splits(script_args, args.seed, check=check_preference_columns)  # before a slow model load
    extra = {"num_labels": 1} if args.reward_type == "seqcls" else {}
    model, tokenizer = load_model_and_tokenizer(
        model_args, auto_class=AutoModelForSequenceClassification if args.reward_type == "seqcls" else None, **extra)
    trainer = RewardModelTrainer(model=model, args=args, train_dataset=splits["train"],
                                 eval_dataset=splits["validation"], processing_class=tokenizer)
    test = prepare_preference_dataset(splits["test"], tokenizer, args.max_length, "test")
    before = trainer.evaluate(test, metric_key_prefix="test")
    trainer.train()
    after = trainer.evaluate(test, metric_key_prefix="test")
    metrics = {"test_accuracy_before": before["test_accuracy"], "test_accuracy": after["test_accuracy"],
               "test_loss_before": before["test_loss"], "test_loss": after["test_loss"],
               "best_validation_accuracy": trainer.state.best_metric,
               "num_pairs": {"train": len(trainer.train_dataset), "validation": len(trainer.eval_dataset),
                             "test": len(test)}}
    save_reward_model(trainer, args.output_dir, metrics)
    return metrics
