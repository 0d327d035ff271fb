"""The ``l3m`` command: parse the arguments of a command, then make one library call. Every command reads ``--config
file.yaml`` (the fields of ``l3m <command> --help``) and ``--field value`` overrides through one parser
(:class:`l3m.parsing.L3MParser`); bad input ends with one line naming the field, exit code 2; l3m logs from INFO."""

from __future__ import annotations

import json
import logging
import signal
import sys

from l3m.errors import L3MError, L3MTrainingStopped
from l3m.hardware import tune_process
from l3m.parsing import parse_command, parse_train_args


def cmd_train(argv: list[str], grpo: bool = False) -> int:
    from l3m.training.run import grpo_from_args, train_from_args

    print(f"Saved the model to {(grpo_from_args if grpo else train_from_args)(*parse_train_args(argv, grpo=grpo))}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from l3m.config import EvalArguments
    from l3m.evaluation import evaluate_saved_model, format_summary, is_grpo_config

    *args, eval_args = parse_train_args(argv, EvalArguments, prog="l3m eval", grpo=is_grpo_config(argv), description=(
        "Task log-perplexity and constraint rewards of a saved model on the test split; with a GRPO config (one that "
        "sets reward), the objective reward; with --reference, the KL to a reference model."))
    result, path = evaluate_saved_model(*args, eval_args)
    print(f"{json.dumps(result['summary'], indent=2)}\n{format_summary(result['summary'])}\nWrote {path}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    from l3m.experiments.compare import run_comparison

    run_comparison(argv)
    return 0


def cmd_demo(argv: list[str]) -> int:
    from l3m.experiments.demo import DemoSettings, run_demo

    run_demo(*parse_command((DemoSettings,), argv, "l3m demo", "Fig. 2 of the L3M paper, offline, on CPU."))
    return 0


def cmd_grpo_experiment(argv: list[str]) -> int:
    from l3m.experiments.grpo_budget import BudgetSettings, run_budget_experiment

    run_budget_experiment(*parse_command((BudgetSettings,), argv, "l3m grpo-experiment", (
        "GRPO under a length budget: no budget, fixed penalty weights, the l3m barrier and dual ascent.")))
    return 0


def cmd_align(argv: list[str], experiment: bool = False) -> int:
    from l3m.alignment.command import align_command
    from l3m.experiments.alignment import experiment_command

    return (experiment_command if experiment else align_command)(argv)


def cmd_reward_train(argv: list[str]) -> int:
    from l3m.config import ModelConfig
    from l3m.rewards.training import RewardConfig, RewardScriptArguments, train_reward_model

    script_args, reward_args, model_args = parse_command((RewardScriptArguments, RewardConfig, ModelConfig), argv,
        "l3m reward train", "Learn a reward model from preference pairs with the Bradley-Terry loss (App. A.1).")
    print(json.dumps(train_reward_model(script_args, reward_args, model_args), indent=2))
    print(f"Saved the reward model to {reward_args.output_dir}; constrain it with "
          f"reward: {{path: {reward_args.output_dir}}}")
    return 0


def cmd_reward_build_standin(argv: list[str]) -> int:
    from l3m.rewards.standin import StandinSettings, build_standin

    paths = build_standin(*parse_command((StandinSettings,), argv, "l3m reward build-standin",
                                  "Build the offline helpful/harmless stand-in preference data in the l3m cache."))
    with open(paths["stats"], encoding="utf-8") as f:
        print(f.read())
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


def cmd_reward_experiment(argv: list[str]) -> int:
    from l3m.experiments.hh import ExperimentSettings, run_experiment

    run_experiment(*parse_command((ExperimentSettings,), argv, "l3m reward experiment",
                           "Fig. 3 of the L3M paper on the offline HH stand-in, on CPU."))
    return 0


REWARD_COMMANDS = {"train": cmd_reward_train, "build-standin": cmd_reward_build_standin,
                   "experiment": cmd_reward_experiment}
REWARD_USAGE = """usage: l3m reward {train,build-standin,experiment} [--config FILE.yaml] [--field value ...]

  train          learn a reward model from preference pairs (Bradley-Terry, App. A.1)
  build-standin  build the offline helpful/harmless stand-in preference data (docs/reward_models.md)
  experiment     Fig. 3: initial, SFT, L3Ms and MMs under two learned reward constraints"""


def _dispatch(commands: dict, usage: str, argv: list[str]) -> int:
    if not argv or argv[0] not in commands:
        print(usage)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


COMMANDS = {"train": cmd_train, "grpo": lambda argv: cmd_train(argv, grpo=True), "eval": cmd_eval,
            "compare": cmd_compare, "demo": cmd_demo, "grpo-experiment": cmd_grpo_experiment, "align": cmd_align,
            "align-experiment": lambda argv: cmd_align(argv, experiment=True),
            "reward": lambda argv: _dispatch(REWARD_COMMANDS, REWARD_USAGE, argv)}
USAGE = """usage: l3m <command> [--config FILE.yaml] [--field value ...]

  train            fine-tune a model under reward constraints (L3M); plain SFT without constraints
  grpo             GRPO (TRL's GRPOTrainer) on a reward under reward constraints weighted by an l3m solver
  eval             a saved model on the test split: log-ppl, constraint (and objective) rewards, KL to a reference
  compare          train several methods (SFT, L3M, MM, lagged dual) under one budget, one table
  demo             the offline Fig. 2 demo: SFT and two length-constrained L3Ms on SmolLM2-135M
  grpo-experiment  GRPO under a length budget: no budget, fixed penalty weights, l3m barrier, dual ascent
  align            CAID: a reward minus beta KL under constraints; one-shot dual, then DPO and dual steps
  align-experiment CAID, its one-shot predecessor, l3m barrier, dual ascent on the helpful/harmless stand-in
  reward           train / build-standin / experiment: preference reward models and the offline HH stand-in

`l3m <command> --help` lists every field of a command."""


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("l3m").setLevel(logging.INFO)  # the end-of-training verdicts, CAID's iterations
    tune_process()
    try:
        return _dispatch(COMMANDS, USAGE, list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_request:  # --help
        return exit_request.code if isinstance(exit_request.code, int) else 0
    except L3MError as err:  # L3MTrainingStopped by a signal N exits with 128 + N, the shell's convention
        signum = err.signum if isinstance(err, L3MTrainingStopped) else None
        print(f"l3m: {'' if signum else 'error: '}{err}", file=sys.stderr)
        return 2 if signum is None else 128 + signum
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one outside it: stop at once, quietly
        print("l3m: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
