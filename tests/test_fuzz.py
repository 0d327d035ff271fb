"""Fuzzing (hypothesis) of the config and constraint parsers: whatever the input, they either succeed or raise the
library's own error type, :class:`l3m.L3MError` — never a bare Python exception with a traceback."""

from __future__ import annotations

import math
import os
import tempfile

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l3m.cli import parse_train_args
from l3m.config import L3MConfig
from l3m.parsing import load_yaml_config
from l3m.constraints import Constraint, parse_constraints
from l3m.errors import L3MError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Reward references: never arbitrary module names (importing one runs its code), but every shape of a bad one.
REWARDS = st.sampled_from(["length_tokens", "length_words", "length_chars", "lenght", "", " ", "a:b", ":f", "x:",
                           ".relative:f", "..:f", "no_such_module_l3m:f", "os:sep", "os:getcwd", "a b:c", "\x00:f",
                           "l3m.rewards:length_words", "l3m.rewards:REWARD_REGISTRY", "l3m.rewards:"])
SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=8) | REWARDS)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                           max_size=3), max_leaves=6)
RECORD_KEYS = st.sampled_from(["name", "reward", "min", "max", "kind"]) | st.text(max_size=4)
RECORDS = st.dictionaries(RECORD_KEYS, SCALARS | VALUES, max_size=6)
SPECS = st.none() | VALUES | st.lists(RECORDS | VALUES, max_size=4)


@FUZZ
@given(SPECS)
def test_parse_constraints_raises_only_l3m_errors(specs):
    try:
        constraints = parse_constraints(specs)
    except L3MError:
        return
    assert all(isinstance(c, Constraint) for c in constraints)
    for c in constraints:
        assert c.min is None or math.isfinite(c.min)
        assert c.max is None or math.isfinite(c.max)


YAML_TEXT = st.text(alphabet=st.sampled_from(list("abc01:-_ []{},.!&*|>'\"#\n\t%@`~") + ["\u00e9", "\x00", "\ufeff"]),
                    max_size=60)


@FUZZ
@given(st.one_of(YAML_TEXT, st.binary(max_size=40)))
def test_load_yaml_config_raises_only_l3m_errors(content):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.yaml")
        with open(path, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        try:
            values = load_yaml_config(path)
        except L3MError:
            return
        assert isinstance(values, dict)


FIELDS = st.sampled_from([
    "solver", "constraints", "mu_init", "mu_final", "ema_smoothing", "objective_step_probability",
    "reinforce_baseline", "dual_lr", "multiplier_init", "multiplier_max", "dual_update_steps", "num_generations",
    "max_completion_length", "temperature", "top_p", "top_k", "max_length", "max_consecutive_skipped_steps",
    "infeasibility_patience", "learning_rate", "lr_scheduler_type", "max_steps", "logging_steps", "save_strategy",
    "save_steps", "per_device_train_batch_size", "seed", "optim", "report_to", "resume_from_checkpoint",
    "dataset_name", "validation_size", "max_train_samples", "model_name_or_path", "dtype", "use_peft", "lora_r",
    "not_a_field",
])


@FUZZ
@given(st.dictionaries(FIELDS, SCALARS | VALUES | st.lists(RECORDS, max_size=2), max_size=4))
def test_parse_train_args_raises_only_l3m_errors(values):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.yaml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump({"output_dir": folder, "use_cpu": True, "report_to": "none", **values}, f,
                           allow_unicode=True)
        try:
            _, training_args, _ = parse_train_args(["--config", path])
        except L3MError:
            return
        assert isinstance(training_args, L3MConfig)
