"""L3MConfig (a transformers.TrainingArguments): the solver's fields are checked in __post_init__."""

from __future__ import annotations

import pytest

from l3m.cli import main
from l3m.config import L3MConfig
from l3m.errors import L3MConfigError


def make(tmp_path, **kwargs) -> L3MConfig:
    return L3MConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def test_defaults_are_valid_and_follow_the_paper(tmp_path):
    cfg = make(tmp_path)
    assert cfg.parsed_constraints == []
    assert (cfg.mu_init, cfg.mu_final, cfg.ema_smoothing, cfg.top_p) == (1.0, 1e-6, 0.1, 0.9)
    assert cfg.weight_decay == 0.1
    assert cfg.remove_unused_columns is False
    assert cfg.reinforce_baseline == "leave_one_out_per_token"


@pytest.mark.parametrize(
    "field, value",
    [
        ("mu_final", 1.0),  # == mu_init
        ("mu_final", 2.0),  # > mu_init
        ("mu_final", 0.0),
        ("mu_init", 0.0),
        ("learning_rate", -1e-5),
        ("max_completion_length", 0),
        ("max_completion_length", -3),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("reinforce_baseline", "mean"),
        ("reinforce_baseline", "leave-one-out"),
        ("ema_smoothing", 0.0),
        ("ema_smoothing", 1.5),
        ("objective_step_probability", -0.1),
        ("objective_step_probability", 1.01),
        ("step_schedule", "random"),
        ("num_generations", 0),
        ("temperature", 0.0),
        ("top_k", -1),
        ("max_length", 1),
        ("remove_unused_columns", True),
    ],
)
def test_each_bad_field_raises_naming_it(tmp_path, field, value):
    with pytest.raises(L3MConfigError) as err:
        make(tmp_path, **{field: value})
    assert str(err.value).startswith(f"{field}: ")
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "field, value",
    [("mu_final", 0.5), ("learning_rate", 0.0), ("max_completion_length", 1), ("top_p", 1.0),
     ("reinforce_baseline", "none"), ("ema_smoothing", 1.0), ("objective_step_probability", 0.0),
     ("objective_step_probability", 1.0), ("top_k", 0), ("max_length", 2)],
)
def test_values_on_the_edge_are_accepted(tmp_path, field, value):
    assert getattr(make(tmp_path, **{field: value}), field) == value


def test_mu_final_message_mentions_mu_init(tmp_path):
    with pytest.raises(L3MConfigError, match=r"^mu_final: must be in \(0, mu_init=0\.5\)"):
        make(tmp_path, mu_init=0.5, mu_final=0.5)


def test_constraints_as_a_yaml_string_are_parsed(tmp_path):
    cfg = make(tmp_path, constraints="[{name: length, reward: length_words, min: 3, max: 8}]")
    assert cfg.constraints == [{"name": "length", "reward": "length_words", "min": 3, "max": 8}]
    (c,) = cfg.parsed_constraints
    assert (c.name, c.min, c.max) == ("length", 3.0, 8.0)
    assert [b.name for b in c.bounds()] == ["length/min", "length/max"]


def test_constraints_as_a_json_string_and_as_a_list(tmp_path):
    cfg = make(tmp_path, constraints='[{"reward": "length_chars", "max": 100}]')
    assert [b.name for b in cfg.parsed_constraints[0].bounds()] == ["length_chars"]
    cfg = make(tmp_path, constraints=[{"reward": "length_tokens", "min": 5}])
    assert cfg.parsed_constraints[0].min == 5.0


def test_bad_yaml_string(tmp_path):
    with pytest.raises(L3MConfigError) as err:
        make(tmp_path, constraints="[{name: length, reward: length_words, min: 3")
    assert str(err.value).startswith("constraints: not valid YAML/JSON")


def test_yaml_string_of_the_wrong_shape(tmp_path):
    with pytest.raises(L3MConfigError) as err:
        make(tmp_path, constraints="reward: length_words")  # a mapping, not a list of records
    assert str(err.value).startswith("constraints: expected a list")


def test_bad_constraint_record_is_reported_by_the_config(tmp_path):
    with pytest.raises(L3MConfigError) as err:
        make(tmp_path, constraints=[{"name": "len", "reward": "length_words", "min": 9, "max": 1}])
    assert str(err.value).startswith("constraints[len]: min (9) > max (1)")


def test_solver_defaults_to_l3m_with_the_dual_defaults(tmp_path):
    cfg = make(tmp_path)
    assert cfg.solver == "l3m"
    assert (cfg.dual_lr, cfg.multiplier_init, cfg.multiplier_max, cfg.dual_warmup_steps) == (0.05, 0.0, None, 0)
    assert (cfg.dual_log_parametrization, cfg.dual_ema_smoothing, cfg.dual_update_steps, cfg.dual_warm_start) == (
        False, 1.0, 10, False)


@pytest.mark.parametrize("solver", ["l3m", "mm", "lagged_dual", "fixed", "sft"])
def test_every_solver_is_accepted(tmp_path, solver):
    assert make(tmp_path, solver=solver).solver == solver


def test_unknown_solver_lists_the_choices(tmp_path):
    with pytest.raises(L3MConfigError,
                       match=r"^solver: must be one of l3m, mm, lagged_dual, fixed, sft, got 'lagrangian'"):
        make(tmp_path, solver="lagrangian")


RENAMED_DUAL = ("'dual' was renamed 'lagged_dual' (the SFT-objective lagged dual ascent); for CAID, the iterative "
                "dual alignment method of arXiv 2505.19387, use `l3m align`")


def test_the_old_solver_name_dual_says_what_it_became(tmp_path):
    with pytest.raises(L3MConfigError) as err:
        make(tmp_path, solver="dual")
    assert str(err.value) == f"solver: {RENAMED_DUAL}"


@pytest.mark.parametrize("argv, field", [(["train", "--solver", "dual"], "solver"),
                                         (["grpo", "--solver", "dual"], "solver"),
                                         (["reward", "experiment", "--solvers", "dual"], "solvers")])
def test_the_old_solver_name_dual_is_one_line_through_the_cli(tmp_path, capsys, argv, field):
    assert main([*argv, "--output_dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"l3m: error: {field}: {RENAMED_DUAL}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"dual_lr": -0.1}, "dual_lr"),
        ({"multiplier_init": -1.0}, "multiplier_init"),
        ({"multiplier_init": 2.0, "multiplier_max": 1.0}, "multiplier_max"),  # cap below the start
        ({"multiplier_max": -0.5}, "multiplier_max"),  # below the default start of 0
        ({"dual_log_parametrization": True}, "multiplier_init"),  # log(0)
        ({"dual_warmup_steps": -1}, "dual_warmup_steps"),
        ({"dual_ema_smoothing": 0.0}, "dual_ema_smoothing"),
        ({"dual_ema_smoothing": 1.5}, "dual_ema_smoothing"),
        ({"dual_update_steps": 0}, "dual_update_steps"),
        ({"dual_update_steps": -2}, "dual_update_steps"),
    ],
)
def test_bad_dual_fields_raise_naming_them(tmp_path, kwargs, field):
    with pytest.raises(L3MConfigError) as err:
        make(tmp_path, solver="mm", **kwargs)
    assert str(err.value).startswith(f"{field}: ")


def test_multiplier_max_message_mentions_multiplier_init(tmp_path):
    with pytest.raises(L3MConfigError, match=r"^multiplier_max: must be >= multiplier_init=2\.0, got 1\.0"):
        make(tmp_path, multiplier_init=2.0, multiplier_max=1.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"dual_lr": 0.0}, {"multiplier_init": 1.0, "multiplier_max": 1.0}, {"dual_update_steps": 1},
     {"dual_ema_smoothing": 1.0}, {"dual_log_parametrization": True, "multiplier_init": 0.1}],
)
def test_dual_fields_on_the_edge_are_accepted(tmp_path, kwargs):
    cfg = make(tmp_path, solver="mm", **kwargs)
    assert all(getattr(cfg, k) == v for k, v in kwargs.items())
