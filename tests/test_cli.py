"""The ``l3m`` command in-process (``l3m.cli.main``) on the tiny model saved to disk: train, eval, overrides, and
one-line errors (exit code 2, nothing written) for bad inputs. The shipped example configs must parse."""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import yaml

from l3m.cli import main, parse_train_args
from l3m.errors import L3MConfigError
from l3m.files import write_jsonl
from l3m.experiments.compare import plan_comparison

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "examples", "configs", "*.yaml")))
LENGTH = {"name": "length", "reward": "length_tokens", "min": 2, "max": 5}


def _values(assets, output_dir, **overrides) -> dict:
    values = dict(model_name_or_path=assets["model"], dataset_name=assets["data"], constraints=[dict(LENGTH)],
                  max_steps=4, per_device_train_batch_size=4, num_generations=2, max_completion_length=16,
                  max_length=128, logging_steps=1, seed=0, use_cpu=True, report_to="none", disable_tqdm=True,
                  output_dir=str(output_dir))
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def _write_yaml(path, values: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return str(path)


@pytest.fixture(scope="module")
def trained(assets):
    """One ``l3m train --config tiny.yaml`` run, shared by the tests that need a trained model folder."""
    output_dir = assets["root"] / "trained"
    config = _write_yaml(assets["root"] / "tiny.yaml", _values(assets, output_dir))
    code = main(["train", "--config", config])
    return {"code": code, "config": config, "output_dir": output_dir}


def test_train_from_a_yaml_config_saves_the_model(trained):
    assert trained["code"] == 0
    assert (trained["output_dir"] / "model.safetensors").is_file()
    assert (trained["output_dir"] / "config.json").is_file()


def test_train_samples_the_constraint_steps_from_constraint_dataset_name(assets, tmp_path, monkeypatch):
    from l3m.training.trainer import L3MTrainer

    sampled_for = []
    constraint_loss = L3MTrainer._constraint_loss

    def record(self, model, inputs):
        sampled_for.extend(inputs["prompts"])
        return constraint_loss(self, model, inputs)

    monkeypatch.setattr(L3MTrainer, "_constraint_loss", record)
    prompts = write_jsonl(tmp_path / "deployed.jsonl", [{"prompt": [{"role": "user", "content": "tell me more"}]}])
    output_dir = tmp_path / "run"
    config = _write_yaml(tmp_path / "tiny.yaml", _values(assets, output_dir, constraint_dataset_name=prompts))
    assert main(["train", "--config", config]) == 0
    assert (output_dir / "model.safetensors").is_file()
    assert sampled_for and all("tell me more" in prompt for prompt in sampled_for)


def test_command_line_flags_override_the_yaml_file(assets, tmp_path):
    output_dir = tmp_path / "run"
    config = _write_yaml(tmp_path / "tiny.yaml", _values(assets, output_dir, max_steps=4, mu_final=1e-4,
                                                          save_strategy="steps", save_steps=2))
    assert main(["train", "--config", config, "--max_steps", "2", "--mu_final", "1e-3"]) == 0
    assert (output_dir / "checkpoint-2").is_dir()
    assert not (output_dir / "checkpoint-4").exists()
    with open(output_dir / "checkpoint-2" / "trainer_state.json", encoding="utf-8") as f:
        state = json.load(f)
    assert state["global_step"] == 2 and state["max_steps"] == 2
    # mu decays from mu_init to mu_final over the planned steps: the last step's mu is the flag's mu_final.
    mus = [log["barrier/mu"] for log in state["log_history"] if "barrier/mu" in log]
    assert mus and mus[-1] == pytest.approx(1e-3)


def test_flags_override_the_file_in_parse_train_args(assets, tmp_path):
    config = _write_yaml(tmp_path / "tiny.yaml", _values(assets, tmp_path / "run", mu_final=1e-4))
    script_args, training_args, model_args = parse_train_args(["--config", config, "--max_steps", "2",
                                                              "--mu_final", "1e-3"])
    assert (training_args.max_steps, training_args.mu_final) == (2, 1e-3)
    assert training_args.mu_init == 1.0  # untouched fields keep their defaults
    assert script_args.dataset_name == assets["data"] and model_args.model_name_or_path == assets["model"]


def test_constraints_as_a_json_string_on_the_command_line(assets, tmp_path):
    output_dir = tmp_path / "run"
    config = _write_yaml(tmp_path / "tiny.yaml", _values(assets, output_dir))
    flag = ["--constraints", '[{"reward": "length_tokens", "max": 5}]']
    _, training_args, _ = parse_train_args(["--config", config, *flag])
    (constraint,) = training_args.parsed_constraints
    assert (constraint.name, constraint.min, constraint.max) == ("length_tokens", None, 5.0)
    assert main(["train", "--config", config, "--max_steps", "1", *flag]) == 0
    assert (output_dir / "model.safetensors").is_file()


def test_eval_writes_a_summary_with_the_constraints(trained, tmp_path, capsys):
    assert trained["code"] == 0
    output = tmp_path / "out.json"
    code = main(["eval", "--model", str(trained["output_dir"]), "--config", trained["config"],
                 "--output", str(output)])
    assert code == 0
    with open(output, encoding="utf-8") as f:
        result = json.load(f)
    summary = result["summary"]
    for key in ("log_ppl_mean", "length_mean", "length/satisfied"):
        assert key in summary, key
    assert summary["num_examples"] > 0 and summary["log_ppl_mean"] > 0
    assert isinstance(summary["length/satisfied"], bool)
    out = capsys.readouterr().out
    assert json.JSONDecoder().raw_decode(out)[0] == summary  # the summary is printed too, then for people:
    assert f"constraint length: {summary['length/mean']:.4g} ± {summary['length/se']:.2g}" in out


# ---- bad inputs: exit code 2, one line `l3m: error: <field>: ...` on stderr, the output folder untouched ----

SENTINEL = "sentinel.txt"
PROGRESS_BAR = re.compile(r"\d+%\||\[\d+:\d+.*/s\]$")  # tqdm: "12%|##  |" or "[00:01, 9.5 it/s]"


def test_eval_on_prompts_without_answers(trained, tmp_path, capsys):
    """`l3m eval --prompts FILE`: the model answers those prompts (not the test split), constraints and lengths are
    reported, and the task log-ppl is None (there are no answers to score)."""
    questions = [f"tell me {word}" for word in ("yes", "no", "maybe")]
    prompts = write_jsonl(tmp_path / "deployed.jsonl", [{"prompt": [{"role": "user", "content": q}]} for q in questions])
    output = tmp_path / "out.json"
    assert main(["eval", "--model", str(trained["output_dir"]), "--config", trained["config"], "--prompts", prompts,
                 "--output", str(output)]) == 0
    with open(output, encoding="utf-8") as f:
        result = json.load(f)
    summary = result["summary"]
    assert summary["num_examples"] == 3 and summary["log_ppl_mean"] is None and result["log_ppl"] == []
    assert [q in sample["prompt"] for q, sample in zip(questions, result["samples"])] == [True] * 3
    assert len(result["rewards"]["length"]) == 3 and isinstance(summary["length/satisfied"], bool)
    assert "3 held-out prompts" in capsys.readouterr().out


def test_eval_names_bad_prompts_in_one_line(trained, tmp_path, capsys):
    text_only = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    for prompts, message in ((str(tmp_path / "nope.jsonl"), "prompts: "), (text_only, "prompts: the train split has "
                                                                            "columns ['text']; expected 'prompt'")):
        code = main(["eval", "--model", str(trained["output_dir"]), "--config", trained["config"], "--prompts", prompts])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("l3m")]  # not datasets' progress bars
        assert code == 2 and "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(f"l3m: error: {message}"), lines[0]


def test_lora_run_saves_an_adapter_that_eval_loads(assets, tmp_path, capsys):
    pytest.importorskip("peft")
    output_dir = tmp_path / "lora"
    config = _write_yaml(tmp_path / "lora.yaml", _values(assets, output_dir, use_peft=True, lora_r=4, lora_alpha=8,
                                                          learning_rate=1e-3))
    assert main(["train", "--config", config]) == 0
    assert (output_dir / "adapter_config.json").is_file()
    assert (output_dir / "adapter_model.safetensors").is_file()
    assert not (output_dir / "model.safetensors").exists()  # only the adapter is saved
    capsys.readouterr()
    out = tmp_path / "lora_eval.json"
    assert main(["eval", "--model", str(output_dir), "--config", config, "--output", str(out)]) == 0
    with open(out, encoding="utf-8") as f:
        assert "log_ppl_mean" in json.load(f)["summary"]


def _output_dir_with_sentinel(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / SENTINEL).write_text("keep me\n")
    return output_dir


def _assert_one_line_error(capsys, output_dir, code, prefix, *fragments):
    captured = capsys.readouterr()
    # Progress bars (tqdm, e.g. transformers' "Loading weights") are transient terminal output, not messages.
    lines = [line for line in captured.err.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]
    assert "Traceback" not in captured.err, captured.err
    assert code == 2, captured.err
    assert sorted(os.listdir(output_dir)) == [SENTINEL]  # nothing written, nothing removed
    assert (output_dir / SENTINEL).read_text() == "keep me\n"
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"l3m: error: {prefix}"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "case, prefix, fragments",
    [
        ("unknown_yaml_key", "--config: unknown field(s)", ["learning_rat"]),
        ("unknown_reward", "constraints[length].reward: ", ["no_such_reward"]),
        ("min_above_max", "constraints[length]: min (9) > max (3)", []),
        ("mu_final_not_below_mu_init", "mu_final: ", []),
        ("empty_dataset", "dataset_name: ", ["empty"]),
        ("dataset_without_columns", "dataset_name: ", ["messages"]),
        ("model_folder_missing", "model_name_or_path: ", ["no-such-model"]),
        ("constraint_prompts_missing", "constraint_dataset_name: ", ["no-such-prompts.jsonl"]),
        ("constraint_prompts_without_columns", "constraint_dataset_name: ", ["['text']", "expected 'prompt'"]),
    ],
)
def test_bad_config_is_one_line_error_and_writes_nothing(assets, tmp_path, capsys, case, prefix, fragments):
    output_dir = _output_dir_with_sentinel(tmp_path)
    overrides = {
        "unknown_yaml_key": {"learning_rat": 1e-5},
        "unknown_reward": {"constraints": [{"name": "length", "reward": "no_such_reward", "max": 5}]},
        "min_above_max": {"constraints": [{"name": "length", "reward": "length_tokens", "min": 9, "max": 3}]},
        "mu_final_not_below_mu_init": {"mu_init": 0.5, "mu_final": 0.5},
        "empty_dataset": {"dataset_name": write_jsonl(tmp_path / "nothing.jsonl", [])},
        "dataset_without_columns": {
            "dataset_name": write_jsonl(tmp_path / "text.jsonl", [{"text": f"w{i} w{i + 1}"} for i in range(40)])},
        "model_folder_missing": {"model_name_or_path": str(tmp_path / "no-such-model")},
        "constraint_prompts_missing": {"constraint_dataset_name": str(tmp_path / "no-such-prompts.jsonl")},
        "constraint_prompts_without_columns": {
            "constraint_dataset_name": write_jsonl(tmp_path / "prompts.jsonl", [{"text": "hello"}])},
    }[case]
    config = _write_yaml(tmp_path / "bad.yaml", _values(assets, output_dir, **overrides))
    code = main(["train", "--config", config])
    _assert_one_line_error(capsys, output_dir, code, prefix, *fragments)


def test_missing_config_file_is_one_line_error(tmp_path, capsys):
    output_dir = _output_dir_with_sentinel(tmp_path)
    code = main(["train", "--config", str(tmp_path / "nope.yaml"), "--output_dir", str(output_dir)])
    _assert_one_line_error(capsys, output_dir, code, "--config: no such file", "nope.yaml")


# ---- the command itself ----

def test_help_returns_0(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


@pytest.mark.parametrize("command, settings", [
    (["demo"], "l3m.experiments.demo:DemoSettings"), (["reward", "build-standin"], "l3m.rewards.standin:StandinSettings"),
    (["reward", "experiment"], "l3m.experiments.hh:ExperimentSettings")])
def test_settings_commands_explain_every_flag(command, settings, capsys):
    import dataclasses
    import importlib

    module, name = settings.split(":")
    fields = dataclasses.fields(getattr(importlib.import_module(module), name))
    assert main([*command, "--help"]) == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for f in fields:
        assert f"--{f.name}" in text and f.metadata.get("help"), f"--{f.name} has no help text"
        assert "".join(f.metadata["help"].split()) in text


def test_the_cli_shows_l3ms_info_lines(capsys):
    """The end-of-training verdicts that are not alarms (satisfied, at its bound) are INFO lines of the l3m logger."""
    import logging

    logging.getLogger("l3m").setLevel(logging.WARNING)
    main(["--help"])
    assert logging.getLogger("l3m").getEffectiveLevel() == logging.INFO


def test_unknown_command_returns_2(capsys):
    assert main(["nosuchcommand"]) == 2


# ---- the shipped configs ----

def test_there_are_example_configs():
    names = {os.path.basename(path) for path in EXAMPLE_CONFIGS}
    assert {"length_range.yaml", "sft.yaml", "lora_length.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLE_CONFIGS, ids=os.path.basename)
def test_example_config_parses(path):
    if os.path.basename(path).startswith("compare"):  # a compare config: shared fields plus its methods
        plans, (script_args, training_args, model_args), _ = plan_comparison(["--config", path])
        assert {args.solver for _, args, _ in plans} == {"sft", "l3m", "mm", "lagged_dual"}
        assert training_args.max_steps > 0
    else:
        with open(path, encoding="utf-8") as f:
            command = f.readline().split()[3]  # "# Launch:  l3m grpo ..."
        if command == "align":
            from l3m.alignment import CAIDConfig
            from l3m.config import ScriptArguments, TrainerModelConfig
            from l3m.parsing import parse_command

            script_args, training_args, model_args = parse_command(
                (ScriptArguments, CAIDConfig, TrainerModelConfig), ["--config", path], "l3m align", "")
            assert training_args.outer_iterations > 0 and training_args.num_train_epochs > 0
        else:
            script_args, training_args, model_args = parse_train_args(["--config", path], grpo=command == "grpo")
            assert training_args.max_steps > 0
    assert model_args.model_name_or_path and script_args.dataset_name and training_args.output_dir
    with open(path, encoding="utf-8") as f:
        assert f.readline().startswith("# Launch:")  # the launch command comes first


@pytest.mark.parametrize("settings", ["l3m.experiments.demo:DemoSettings", "l3m.rewards.standin:StandinSettings",
                                      "l3m.experiments.hh:ExperimentSettings"])
def test_settings_commands_take_a_yaml_config_and_flags(settings, tmp_path):
    """The settings of demo, build-standin and the reward experiment come from --config YAML and --field flags
    through the same parser as `l3m train`: flags win, lists are YAML lists."""
    import importlib

    from l3m.parsing import L3MParser

    module, name = settings.split(":")
    cls = getattr(importlib.import_module(module), name)
    values = {"seed": 3, "max_new_tokens" if name == "StandinSettings" else "max_steps": 7}
    if name == "ExperimentSettings":
        values.update(solvers=["mm", "lagged_dual"], helpful_offsets=[0.5], harmless_offsets=[0.25])
    config = _write_yaml(tmp_path / "settings.yaml", values)
    (parsed,) = L3MParser((cls,)).parse(["--config", config, "--seed", "5"])
    assert parsed.seed == 5  # the flag overrides the file
    assert {k: getattr(parsed, k) for k in values if k != "seed"} == {k: v for k, v in values.items() if k != "seed"}
    with pytest.raises(L3MConfigError, match="seed: expected an integer, got 1.5"):
        L3MParser((cls,)).parse(["--config", _write_yaml(tmp_path / "bad.yaml", {"seed": 1.5})])


def test_demo_training_cap_follows_the_evaluation_cap():
    """The demo samples in training up to the length evaluation counts, unless told otherwise."""
    from l3m.experiments.demo import DemoSettings
    from l3m.parsing import L3MParser

    (parsed,) = L3MParser((DemoSettings,)).parse(["--eval_max_new_tokens", "32"])
    assert parsed.max_completion_length == 32 and parsed.training_args("L3M", 2).max_completion_length == 32
    (parsed,) = L3MParser((DemoSettings,)).parse(["--eval_max_new_tokens", "32", "--max_completion_length", "16"])
    assert parsed.max_completion_length == 16
    assert DemoSettings().max_completion_length == 64


def test_the_demos_constraint_kind_reaches_training_and_a_bad_one_fails_before_any_run():
    """--kind chance trains each L3M on P[length in range] >= 1 - epsilon while evaluation still judges the mean;
    a chance kind without epsilon is refused when the settings are parsed, naming the option."""
    from l3m.experiments.demo import DEMO_RUNS, DemoSettings
    from l3m.parsing import L3MParser

    (parsed,) = L3MParser((DemoSettings,)).parse(["--kind", "chance", "--epsilon", "0.1", "--confidence", "none"])
    (training,) = DEMO_RUNS[2].constraints(**parsed.constraint_options())
    assert (training.kind, training.epsilon, training.confidence) == ("chance", 0.1, None)
    assert DEMO_RUNS[2].constraints()[0].kind == "expectation"  # what the demo evaluates with
    (parsed,) = L3MParser((DemoSettings,)).parse(["--kind", "uniform", "--delta", "1"])
    (training,) = DEMO_RUNS[2].constraints(**parsed.constraint_options())
    assert (training.kind, training.delta, training.confidence) == ("uniform", 1.0, 0.975)
    assert training.heldout_size == parsed.test_size == 48  # the target covers the table's held-out mean
    (parsed,) = L3MParser((DemoSettings,)).parse(["--target_heldout", "false"])
    assert DEMO_RUNS[2].constraints(**parsed.constraint_options())[0].heldout_size is None
    with pytest.raises(L3MConfigError, match=r"epsilon: required for kind: chance"):
        L3MParser((DemoSettings,)).parse(["--kind", "chance"])
    with pytest.raises(L3MConfigError, match=r"delta: must be >= 0"):
        L3MParser((DemoSettings,)).parse(["--kind", "uniform", "--delta", "-1"])
    with pytest.raises(L3MConfigError, match=r"^confidence: expected a probability in \[0\.5, 1\)"):
        L3MParser((DemoSettings,)).parse(["--confidence", "0.3"])
    with pytest.raises(L3MConfigError, match=r"^num_proc: expected at least 1 \(1 runs one run after another\), "
                                             r"got 0$"):
        L3MParser((DemoSettings,)).parse(["--num_proc", "0"])
