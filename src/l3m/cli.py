"""The ``l3m`` command: ``l3m train | eval | compare | demo | reward``.

``train``, ``eval`` and ``compare`` (:mod:`l3m.experiments.compare`) read every field of :class:`l3m.ScriptArguments`, :class:`l3m.L3MConfig` and
:class:`l3m.ModelConfig` from ``--config file.yaml``; ``--field value`` flags override the file (as TRL's CLI).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import signal
import sys

from l3m.errors import L3MConfigError, L3MError, L3MTrainingStopped


def _parser_for_configs(types: tuple | None = None):
    from transformers import HfArgumentParser

    from l3m.config import L3MConfig, ModelConfig, ScriptArguments

    class _Parser(HfArgumentParser):
        # argparse prints its whole usage block and exits; report a wrongly typed value as a one-line l3m error
        def error(self, message):
            raise L3MConfigError(message.replace("argument --", "").replace("/--", " (--", 1).replace(":", "):", 1)
                                 if message.startswith("argument --") else message)

    return _Parser(types or (ScriptArguments, L3MConfig, ModelConfig), allow_abbrev=False)  # a typo must not set a field


def parse_config(argv: list[str], extra_keys: tuple[str, ...] = (), types: tuple | None = None):
    """Parse ``--config file.yaml`` plus ``--field value`` overrides.

    Returns ``(script_args, training_args, model_args, extras)``; ``extras`` holds the values of ``extra_keys``.
    ``types`` replaces the three dataclasses (``l3m reward train`` parses its own).
    """
    values, extras = parse_config_values(argv, extra_keys, types)
    return (*build_configs(values, types), extras)


def parse_config_values(argv: list[str], extra_keys: tuple[str, ...] = (), types: tuple | None = None
                        ) -> tuple[dict, dict]:
    """The field values of ``--config file.yaml`` with the ``--field value`` flags applied, before any dataclass is
    built (so that callers can layer more values on top, as ``l3m compare`` does per method).

    Returns ``(values, extras)``: ``values`` maps every field of the config dataclasses to its value,
    ``extras`` holds the values of ``extra_keys`` (file keys that are no field).
    """
    parser = _parser_for_configs(types)
    for key in extra_keys:
        parser.add_argument(f"--{key}", default=None)
    parser.add_argument("--config", default=None, help="A YAML file whose keys are field names.")
    config_path = _config_path(argv)
    if config_path:
        from l3m.config import load_yaml_config

        values = load_yaml_config(config_path)
        known = {action.dest for action in parser._actions} - {"config"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise L3MConfigError(f"--config: unknown field(s) {unknown} in {config_path}; see `l3m train --help`")
        actions = {action.dest: action for action in parser._actions}
        parser.set_defaults(**{key: _typed_yaml_value(actions[key], value) for key, value in values.items()})
    namespace, remaining = parser.parse_known_args(argv)
    if remaining:
        raise L3MConfigError(f"unknown argument(s) {remaining}; see `l3m train --help`")
    values = vars(namespace)
    values.pop("config")
    extras = {key: values.pop(key) for key in extra_keys}
    return values, extras


def build_configs(values: dict, types: tuple | None = None):
    """``(script_args, training_args, model_args)`` from a mapping of field names to values (validated by each
    dataclass); a key that is no field is an error. ``types`` replaces the three dataclasses."""
    from l3m.config import L3MConfig, ModelConfig, ScriptArguments

    out, used = [], set()
    for dtype in types or (ScriptArguments, L3MConfig, ModelConfig):
        keys = {f.name for f in dataclasses.fields(dtype) if f.init} & set(values)
        used |= keys
        try:
            out.append(dtype(**{k: values[k] for k in keys}))
        except (ValueError, TypeError) as err:
            if isinstance(err, L3MError):
                raise
            raise L3MConfigError(_training_arguments_message(str(err).splitlines()[0], values)) from err
    unknown = sorted(set(values) - used)
    if unknown:
        raise L3MConfigError(f"unknown field(s) {unknown}; see `l3m train --help`")
    return tuple(out)


def _training_arguments_message(message: str, values: dict) -> str:
    """Name the field in a transformers.TrainingArguments ValueError (e.g. ``foo is not a valid OptimizerNames``)."""
    bad = re.match(r"(\S+) is not a valid \w+", message)
    if bad:
        fields = [k for k, v in values.items() if str(v) == bad.group(1)]
        if fields:
            return f"{fields[0]}: {message}"
    return f"TrainingArguments: {message}"


def _typed_yaml_value(action, value):
    """Check a YAML value against its field's type, as argparse checks a command-line string.

    argparse converts (and type-checks) string defaults only; YAML also gives numbers, booleans, lists and null.
    """
    name, kind = action.dest, getattr(action.type, "__name__", "")
    if name == "resume_from_checkpoint" and isinstance(value, bool):
        return "true" if value else None
    if isinstance(value, str) or kind not in ("int", "float", "str", "string_to_bool"):
        return value  # strings are converted by argparse; other field types are checked by their dataclass
    if action.nargs in ("+", "*") and isinstance(value, list):
        return [_typed_yaml_value(argparse.Namespace(dest=name, type=action.type, nargs=None, default=0), v)
                for v in value]
    if value is None:
        if action.default is None:
            return None
        raise L3MConfigError(f"{name}: expected a value, got null; remove the key to keep the default "
                             f"{action.default!r}")
    if kind == "string_to_bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:  # str fields may also hold lists or mappings (constraints, report_to, lr_scheduler_kwargs)
        ok = isinstance(value, (list, dict))
    if not ok:
        expected = {"string_to_bool": "true or false", "int": "an integer", "float": "a number",
                    "str": "a string (quote it)"}[kind]
        raise L3MConfigError(f"{name}: expected {expected}, got {value!r}")
    if kind == "float" and not math.isfinite(value) and name not in ("max_grad_norm",):
        raise L3MConfigError(f"{name}: expected a finite number, got {value!r}")
    return value


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def load_model_and_tokenizer(model_args, path: str | None = None, auto_class=None, **model_kwargs):
    """Load the policy (or ``auto_class``) and its tokenizer; ``demo`` names the embedded SmolLM2-135M-Instruct."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = path or model_args.model_name_or_path
    if not name:
        raise L3MConfigError("model_name_or_path: required (a hub id, a local folder, or 'demo')")
    if name == "demo":
        from l3m.assets import demo_model_path

        name = demo_model_path()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if model_args.dtype not in dtypes:
        raise L3MConfigError(f"dtype: unknown dtype {model_args.dtype!r}; use one of {sorted(dtypes)}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model_args.trust_remote_code)
        model = (auto_class or AutoModelForCausalLM).from_pretrained(
            name, dtype=dtypes[model_args.dtype], trust_remote_code=model_args.trust_remote_code, **model_kwargs)
    except OSError as err:
        raise L3MConfigError(f"model_name_or_path: cannot load {name!r} ({str(err).splitlines()[0]})") from err
    return model, tokenizer


def peft_config_from(model_args):
    """A LoRA config from the model arguments, or None when ``use_peft`` is off."""
    if not model_args.use_peft:
        return None
    try:
        from peft import LoraConfig
    except ImportError as err:
        raise L3MConfigError("use_peft: install peft (pip install 'l3m[peft]')") from err
    targets = model_args.lora_target_modules
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                      task_type="CAUSAL_LM")


def _load_splits(script_args, seed: int):
    from l3m.data import check_columns, load_task_splits

    if not script_args.dataset_name:
        raise L3MConfigError("dataset_name: required (a hub dataset, a local .json/.jsonl/.parquet file, or 'demo')")
    name = script_args.dataset_name
    if name == "demo":
        from l3m.assets import demo_data_path

        name = demo_data_path()
    splits = (script_args.dataset_train_split, script_args.dataset_validation_split, script_args.dataset_test_split)
    loaded = load_task_splits(name, script_args.dataset_config, splits, script_args.validation_size,
                              script_args.test_size, seed)
    for split_name, split in loaded.items():
        check_columns(split, split_name, field="dataset_name")
    return loaded


def cmd_train(argv: list[str]) -> int:
    from l3m.training.trainer import L3MTrainer

    script_args, training_args, model_args, _ = parse_config(argv)
    splits = _load_splits(script_args, training_args.seed)  # data errors surface before a slow model load
    model, tokenizer = load_model_and_tokenizer(model_args)
    train = splits["train"]
    if script_args.max_train_samples:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    trainer = L3MTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=splits["validation"] if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=peft_config_from(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    print(f"Saved the model to {training_args.output_dir}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from l3m.data import prepare_dataset
    from l3m.evaluation import evaluate_model
    from l3m.files import write_json

    script_args, training_args, model_args, extras = parse_config(argv, extra_keys=("model", "output"))
    model_dir = extras["model"]
    if not model_dir:
        raise L3MConfigError("--model: required (the folder of a saved model)")
    splits = _load_splits(script_args, training_args.seed)
    if os.path.exists(os.path.join(model_dir, "adapter_config.json")):
        model, tokenizer = _load_adapter(model_dir)
    else:
        model, tokenizer = load_model_and_tokenizer(model_args, path=model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    test = prepare_dataset(splits["test"], tokenizer, training_args.max_length, training_args.seed, "test")
    result = evaluate_model(model, tokenizer, test, constraints=training_args.parsed_constraints,
                            max_new_tokens=training_args.max_completion_length,
                            temperature=training_args.temperature, top_p=training_args.top_p,
                            batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed)
    print(json.dumps(result["summary"], indent=2))
    output = write_json(extras["output"] or os.path.join(model_dir, "eval_results.json"), result)
    print(f"Wrote {output}")
    return 0


def _load_adapter(model_dir: str):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    return AutoPeftModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def _settings_from_argv(cls, argv: list[str], prog: str, description: str, skip: tuple[str, ...] = ()):
    """A settings dataclass from ``--field value`` flags (a boolean field is a switch); ``skip`` stays default."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    defaults = cls()
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name)
        if f.name in skip:
            continue
        help_text = f.metadata.get("help")
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action="store_true", help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default,
                                help=None if help_text is None else f"{help_text} (default: %(default)s)")
    return cls(**vars(parser.parse_args(argv)))


def cmd_demo(argv: list[str]) -> int:
    from l3m.experiments.demo import DemoSettings, run_demo

    run_demo(_settings_from_argv(DemoSettings, argv, "l3m demo", "Fig. 2 of the L3M paper, offline, on CPU.",
                                 skip=("runs",)))
    return 0


def cmd_compare(argv: list[str]) -> int:
    from l3m.experiments.compare import run_comparison

    if any(arg in ("-h", "--help") for arg in argv):
        print("usage: l3m compare --config compare.yaml [--field value ...]\n\n"
              "Trains every entry of the config's `methods` list (name, solver, field overrides, optional sweep) on\n"
              "the same data, model, constraints and step budget, evaluates each on the test split, and prints one\n"
              "table; --field flags override the shared fields. See docs/compare.md.")
        return 0
    if not _config_path(argv):
        raise L3MConfigError("--config: required (a compare YAML, e.g. examples/configs/compare.yaml)")
    run_comparison(argv)
    return 0


def cmd_reward(argv: list[str]) -> int:
    """``l3m reward train --config rm.yaml`` and ``l3m reward build-standin``."""
    sub = {"train": cmd_reward_train, "build-standin": cmd_reward_build_standin,
           "experiment": cmd_reward_experiment}
    if not argv or argv[0] not in sub:
        print("usage: l3m reward {train,build-standin,experiment} ...\n\n"
              "  train          learn a reward model from preference pairs (Bradley-Terry, App. A.1)\n"
              "  build-standin  build the offline helpful/harmless stand-in preference data (docs/reward_models.md)\n"
              "  experiment     Fig. 3: initial, SFT, L3Ms and MMs under two learned reward constraints")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return sub[argv[0]](argv[1:])


def cmd_reward_train(argv: list[str]) -> int:
    from l3m.config import ModelConfig
    from l3m.rewards.training import RewardConfig, RewardScriptArguments, train_reward_model

    script_args, reward_args, model_args, _ = parse_config(
        argv, types=(RewardScriptArguments, RewardConfig, ModelConfig))
    metrics = train_reward_model(script_args, reward_args, model_args)
    print(json.dumps(metrics, indent=2))
    print(f"Saved the reward model to {reward_args.output_dir}; constrain it with "
          f"reward: {{path: {reward_args.output_dir}}}")
    return 0


def cmd_reward_build_standin(argv: list[str]) -> int:
    from l3m.rewards.standin import StandinSettings, build_standin

    settings = _settings_from_argv(StandinSettings, argv, "l3m reward build-standin",
                                   "Build the offline helpful/harmless stand-in preference data in the l3m cache.")
    paths = build_standin(settings)
    with open(paths["stats"], encoding="utf-8") as f:
        print(f.read())
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


def cmd_reward_experiment(argv: list[str]) -> int:
    from l3m.experiments.hh import ExperimentSettings, run_experiment

    run_experiment(_settings_from_argv(ExperimentSettings, argv, "l3m reward experiment",
                                       "Fig. 3 of the L3M paper on the offline HH stand-in, on CPU."))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "demo": cmd_demo, "compare": cmd_compare, "reward": cmd_reward}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: l3m {train,eval,compare,demo,reward} [--config FILE] [--field value ...]\n\n"
              "  train    fine-tune a model under reward constraints (L3M); plain SFT without constraints\n"
              "  eval     task log-perplexity and constraint rewards of a saved model on the test split\n"
              "  compare  train several methods (SFT, L3M, MM, iterative dual) under one budget, one table\n"
              "  demo     the offline Fig. 2 demo: SFT and two length-constrained L3Ms on SmolLM2-135M\n"
              "  reward   train / build-standin / experiment: preference reward models and the offline HH stand-in\n\n"
              "`l3m train --help` lists every field.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[argv[0]](argv[1:])
    except L3MTrainingStopped as err:
        if err.signum is None:
            print(f"l3m: error: {err}", file=sys.stderr)
            return 2
        print(f"l3m: {err}", file=sys.stderr)
        return 128 + err.signum  # the shell's convention for "ended by signal N"
    except L3MError as err:
        print(f"l3m: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one outside it: stop at once, quietly
        print("l3m: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
