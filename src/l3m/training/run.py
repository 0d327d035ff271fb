"""``l3m train`` and ``l3m grpo`` as one library call each: load the data and the model the configs name, train,
save."""

from __future__ import annotations


def train_from_args(script_args, training_args, model_args) -> str:
    """``l3m train``: train on ``script_args``' data with ``training_args`` (an :class:`l3m.L3MConfig`) from
    ``model_args``' model (with LoRA when ``use_peft``), the constraint steps on ``constraint_dataset_name``'s prompts
    when given, resuming when ``resume_from_checkpoint`` is set; returns where the model was saved. Data errors
    surface before the slow model load."""
    from l3m.loading import load_constraint_prompts
    from l3m.training.trainer import L3MTrainer

    prompts = load_constraint_prompts(script_args)
    extra = {} if prompts is None else {"constraint_dataset": prompts}
    return _train_and_save(L3MTrainer, script_args, training_args, model_args, **extra)


def grpo_from_args(script_args, grpo_args, model_args) -> str:
    """``l3m grpo``: GRPO on ``grpo_args.reward`` subject to ``grpo_args.constraints``
    (a :class:`l3m.ConstrainedGRPOConfig`), on the prompts of ``script_args``' data (a ``prompt`` column, or
    ``messages`` cut after their last user turn), from ``model_args``' model (LoRA when ``use_peft``); resumes when
    ``resume_from_checkpoint`` is set; returns where the model was saved."""
    from l3m.data import check_prompt_columns
    from l3m.training.grpo import ConstrainedGRPOTrainer

    model_args.trust_remote_code = grpo_args.trust_remote_code  # GRPOConfig's field, read by the loader
    return _train_and_save(ConstrainedGRPOTrainer, script_args, grpo_args, model_args, check=check_prompt_columns)


def _train_and_save(trainer_class, script_args, args, model_args, check=None, **trainer_kwargs) -> str:
    from trl import get_peft_config

    from l3m.loading import load_model_and_tokenizer, load_splits

    splits = load_splits(script_args, args.seed, check=check)
    model, tokenizer = load_model_and_tokenizer(model_args)
    trainer = trainer_class(model=model, args=args, train_dataset=splits["train"],
                            eval_dataset=splits["validation"] if args.eval_strategy != "no" else None,
                            processing_class=tokenizer, peft_config=get_peft_config(model_args), **trainer_kwargs)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    return args.output_dir
