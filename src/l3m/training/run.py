"""``l3m train`` as one library call: load the data and the model named by the configs, train, save."""

from __future__ import annotations


def train_from_args(script_args, training_args, model_args) -> str:
    """Train on ``script_args``' data with ``training_args`` (an :class:`l3m.L3MConfig`) from ``model_args``' model
    (with LoRA when ``use_peft``), resuming when ``resume_from_checkpoint`` is set; returns where the model was
    saved. Data errors surface before the slow model load."""
    from trl import get_peft_config

    from l3m.loading import load_model_and_tokenizer, load_splits
    from l3m.training.trainer import L3MTrainer

    splits = load_splits(script_args, training_args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = L3MTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    return training_args.output_dir


def grpo_from_args(script_args, grpo_args, model_args) -> str:
    """``l3m grpo``: GRPO on ``grpo_args.reward`` subject to ``grpo_args.constraints``
    (a :class:`l3m.ConstrainedGRPOConfig`), on the prompts of ``script_args``' data (a ``prompt`` column, or
    ``messages`` cut after their last user turn), from ``model_args``' model (LoRA when ``use_peft``); resumes when
    ``resume_from_checkpoint`` is set; returns where the model was saved."""
    from trl import get_peft_config

    from l3m.loading import load_model_and_tokenizer, load_splits
    from l3m.training.grpo import ConstrainedGRPOTrainer, check_prompt_columns

    splits = load_splits(script_args, grpo_args.seed, check=check_prompt_columns)
    model_args.trust_remote_code = grpo_args.trust_remote_code  # GRPOConfig's field, read by the loader
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = ConstrainedGRPOTrainer(
        model=model,
        args=grpo_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"] if grpo_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=grpo_args.resume_from_checkpoint)
    trainer.save_model(grpo_args.output_dir)
    return grpo_args.output_dir
