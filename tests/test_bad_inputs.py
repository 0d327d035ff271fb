"""Bad inputs to ``l3m train``: each is one line ``l3m: error: <field>: ...`` (exit code 2, no traceback), and the
output folder — here one holding an earlier run's checkpoint and a notes file — is left byte for byte as it was.

Config, data, reward and resume errors; docs/errors.md lists them all.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest
import yaml

from fixtures.tiny import make_examples, save_model_and_data
from l3m.cli import main
from l3m.files import write_jsonl

LENGTH = {"name": "length", "reward": "length_tokens", "min": 2, "max": 5}
REWARDS_MODULE = "l3m_test_bad_rewards"
REWARDS_SOURCE = '''
import math

def returns_none(completions, **kwargs):
    return None

def one_too_few(completions, **kwargs):
    return [1.0] * (len(completions) - 1)

def strings(completions, **kwargs):
    return ["long"] * len(completions)

def always_nan(completions, **kwargs):
    return [math.nan] * len(completions)
'''


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    save_model_and_data(root, 32)
    (root / f"{REWARDS_MODULE}.py").write_text(REWARDS_SOURCE)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    sys.modules.pop(REWARDS_MODULE, None)


def _data(tmp_path, name: str):
    """Bad data files, built on demand."""
    path = tmp_path / f"{name}.jsonl"
    good = make_examples(16, 8, 12, seed=0)
    if name == "text_only":
        return write_jsonl(path, [{"text": "w1 w2"}] * 16)
    if name == "empty":
        path.write_text("")
        return str(path)
    if name == "no_assistant":
        return write_jsonl(path, good[:5] + [{"messages": [{"role": "user", "content": "w1"}]}] + good[5:])
    if name == "malformed":
        path.write_text(json.dumps(good[0]) + "\n{\"messages\": [\n")
        return str(path)
    if name == "latin1":
        path.write_bytes("".join(json.dumps({"prompt": "caf\u00e9", "completion": "w1"}, ensure_ascii=False) + "\n"
                                 for _ in range(16)).encode("latin-1"))
        return str(path)
    if name == "null_prompt":
        return write_jsonl(path, [{"prompt": None, "completion": "w1 w2"}] * 16)
    raise KeyError(name)


def _output_dir(tmp_path):
    """An output folder with an earlier run's (partial) checkpoint and a notes file."""
    run = tmp_path / "run"
    (run / "checkpoint-100").mkdir(parents=True)
    (run / "checkpoint-100" / "model.safetensors").write_bytes(os.urandom(256))
    (run / "checkpoint-100" / "trainer_state.json").write_text('{"global_step": 100}')
    (run / "notes.txt").write_text("keep me\n")
    return run


def _snapshot(folder) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


# (case id, YAML overrides or a callable of tmp_path giving them, extra flags, expected message start, fragments)
CASES = [
    # config
    ("unknown_field", {"learning_rat": 1e-5}, [], "--config: unknown field(s) ['learning_rat']", []),
    ("unknown_flag", {}, ["--learning_rat", "1"], "unknown argument(s) ['--learning_rat', '1']", []),
    ("float_for_int", {"num_generations": 2.5}, [], "num_generations: expected an integer, got 2.5", []),
    ("word_for_float", {"learning_rate": "fast"}, [], "learning_rate (--learning-rate): invalid float value", []),
    ("word_for_bool", {"use_peft": "maybe"}, [], "use_peft (--use-peft): ", ["true/false"]),
    ("null_for_number", {"top_p": None}, [], "top_p: expected a value, got null", ["default 0.9"]),
    ("infinite_mu", {"mu_init": float("inf")}, [], "mu_init: expected a finite number, got inf", []),
    ("min_above_max", {"constraints": [dict(LENGTH, min=9, max=3)]}, [],
     "constraints[length]: min (9) > max (3); swap them", []),
    ("mu_final_not_below_mu_init", {"mu_init": 0.5, "mu_final": 0.5}, [], "mu_final: must be in (0, mu_init=0.5)", []),
    ("negative_learning_rate", {"learning_rate": -1e-5}, [], "learning_rate: must be >= 0, got -1e-05", []),
    ("zero_max_completion_length", {"max_completion_length": 0}, [], "max_completion_length: must be >= 1", []),
    ("zero_batch_size", {"per_device_train_batch_size": 0}, [], "per_device_train_batch_size: must be >= 1", []),
    ("zero_skip_limit", {"max_consecutive_skipped_steps": 0}, [], "max_consecutive_skipped_steps: must be >= 1", []),
    ("unknown_solver", {"solver": "ppo"}, [], "solver: must be one of l3m, mm, lagged_dual, fixed, sft, got 'ppo'",
     []),
    ("renamed_solver", {"solver": "dual"}, [], "solver: 'dual' was renamed 'lagged_dual'", ["`l3m align`"]),
    ("unknown_scheduler", {"lr_scheduler_type": "sometimes"}, [], "lr_scheduler_type: sometimes is not a valid", []),
    ("duplicated_constraint_names", {"constraints": [LENGTH, dict(LENGTH, reward="length_words")]}, [],
     "constraints: duplicated name(s) ['length']", []),
    ("unknown_constraint_key", {"constraints": [dict(LENGTH, maximum=3)]}, [],
     "constraints[0]: unknown key(s) ['maximum']", []),
    ("unknown_reward", {"constraints": [dict(LENGTH, reward="lenght")]}, [],
     "constraints[length].reward: unknown reward 'lenght'", ["module:function"]),
    ("reward_module_missing", {"constraints": [dict(LENGTH, reward="no_such_module_l3m:f")]}, [],
     "constraints[length].reward: cannot import module 'no_such_module_l3m'", []),
    ("model_missing", lambda tmp: {"model_name_or_path": str(tmp / "no-such-model")}, [],
     "model_name_or_path: cannot load", ["no-such-model"]),
    # data
    ("dataset_missing", lambda tmp: {"dataset_name": str(tmp / "nope.jsonl")}, [],
     "dataset_name: ", ["nope.jsonl", "neither a local file"]),
    ("no_task_columns", lambda tmp: {"dataset_name": _data(tmp, "text_only")}, [], "dataset_name: the ", ["'messages'"]),
    ("empty_file", lambda tmp: {"dataset_name": _data(tmp, "empty")}, [], "dataset_name: ", ["is empty"]),
    ("malformed_jsonl", lambda tmp: {"dataset_name": _data(tmp, "malformed")}, [], "dataset_name: cannot read", []),
    ("not_utf8", lambda tmp: {"dataset_name": _data(tmp, "latin1")}, [], "dataset_name: ",
     ["is not UTF-8 text (byte 0xe9 at offset", "re-save it as UTF-8"]),
    ("no_assistant_turn", lambda tmp: {"dataset_name": _data(tmp, "no_assistant"), "test_size": 1,
                                       "validation_size": 1}, [],
     "messages: a conversation has no assistant turn", ["(in train example"]),
    ("null_prompt", lambda tmp: {"dataset_name": _data(tmp, "null_prompt")}, [],
     "prompt: expected a string or a list of messages, got None", ["(in train example 0)"]),
    ("everything_too_long", {"max_length": 4}, [], "max_length: all ", ["exceed 4 tokens; raise it"]),
    # rewards: the first step is a constraint step
    ("reward_returns_none", {"constraints": [dict(LENGTH, reward=f"{REWARDS_MODULE}:returns_none")]}, [],
     "constraints[length].reward: the reward function returned NoneType; expected a list of 8 numbers", []),
    ("reward_wrong_length", {"constraints": [dict(LENGTH, reward=f"{REWARDS_MODULE}:one_too_few")]}, [],
     "constraints[length].reward: the reward function returned 7 values; expected a list of 8 numbers", []),
    ("reward_not_numbers", {"constraints": [dict(LENGTH, reward=f"{REWARDS_MODULE}:strings")]}, [],
     "constraints[length].reward: the reward function returned a non-number ('long')", []),
    ("reward_always_nan", {"constraints": [dict(LENGTH, reward=f"{REWARDS_MODULE}:always_nan")],
                           "max_consecutive_skipped_steps": 2}, [],
     "max_consecutive_skipped_steps: 2 optimizer steps in a row had a non-finite loss, gradient or reward "
     "(last: reward of length at step 1)", ["checkpoint-2"]),
    # resume
    ("resume_incomplete", lambda tmp: {"resume_from_checkpoint": str(tmp / "run" / "checkpoint-100")}, [],
     "resume_from_checkpoint: ", ["checkpoint-100 is incomplete", "no l3m_state.json"]),
    ("resume_nothing_complete", {"resume_from_checkpoint": True}, [],
     "resume_from_checkpoint: no complete checkpoint found in ", []),
    ("resume_missing", lambda tmp: {"resume_from_checkpoint": str(tmp / "elsewhere")}, [],
     "resume_from_checkpoint: no such folder", []),
]


@pytest.mark.parametrize("case, overrides, flags, prefix, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error_and_damages_nothing(assets, tmp_path, capsys, case, overrides, flags, prefix,
                                                         fragments):
    output_dir = _output_dir(tmp_path)
    before = _snapshot(output_dir)
    values = dict(model_name_or_path=str(assets / "model"), dataset_name=str(assets / "data.jsonl"),
                  constraints=[dict(LENGTH)], max_steps=4, per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=8, max_length=128, objective_step_probability=0.0, seed=0, use_cpu=True,
                  report_to="none", disable_tqdm=True, save_strategy="no", output_dir=str(output_dir))
    values.update(overrides(tmp_path) if callable(overrides) else overrides)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(values))

    code = main(["train", "--config", str(config), *flags])

    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("l3m: ")]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"l3m: error: {prefix}"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    after = _snapshot(output_dir)
    assert {k: after[k] for k in before} == before  # the earlier checkpoint and notes are byte for byte the same
    new = sorted(set(after) - set(before))
    if case == "reward_always_nan":  # stopped with a checkpoint of the last good (here: the initial) weights
        assert "checkpoint-2/model.safetensors" in new
    else:
        assert new == []  # nothing written
