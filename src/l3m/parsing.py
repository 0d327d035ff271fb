"""The parser of every ``l3m`` command: TRL's ``TrlParser`` with l3m's one-line errors.

``--config file.yaml`` sets the fields of the command's dataclasses and ``--field value`` flags override the file, as
in TRL's scripts. A YAML value goes through the same conversion as the flag would (``2.5`` for an integer field is
an error, not a silent float); list fields take YAML lists (or several values after one flag); fields that hold
structures (``constraints``, a compare config's ``methods``) take YAML lists and mappings, or a YAML string on the
command line. Every mistake is reported as an :class:`l3m.L3MConfigError` naming the field.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

from trl import TrlParser

from l3m.errors import L3MConfigError, L3MError

_ARGPARSE_MESSAGE = re.compile(r"argument --(\w+)(?:/(--[\w-]+))?: (.*)", re.DOTALL)
_NOT_A_VALID = re.compile(r"(\S+) is not a valid \w+")


class L3MParser(TrlParser):
    """``TrlParser`` over ``dataclass_types`` whose errors are :class:`l3m.L3MConfigError` s naming the field."""

    def __init__(self, dataclass_types, prog: str = "l3m", description: str | None = None):
        super().__init__(dataclass_types, prog=prog, description=description, allow_abbrev=False,  # no typo sets a field
                         usage=f"{prog} [--config FILE.yaml] [--field value ...]")
        for action in self._actions:  # a literal % in a field's help would break argparse's %-formatting
            if action.help:
                action.help = re.sub(r"%(?!\()", "%%", action.help)

    def error(self, message: str):
        """argparse prints its usage block and exits; l3m reports one line naming the field instead."""
        bad = _ARGPARSE_MESSAGE.match(message)
        if bad:
            name, alias, reason = bad.groups()
            message = f"{name} ({alias}): {reason}" if alias else f"{name}: {reason}"
        raise L3MConfigError(message)

    def parse(self, argv: list[str]) -> tuple:
        """The dataclasses of ``argv`` (``--config file.yaml`` plus ``--field value`` flags), one per type."""
        path = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
        if path is None and "--config" in argv:
            raise L3MConfigError("--config: expected the path of a YAML file")
        config = load_yaml_config(path) if path else {}
        unknown = sorted(set(config) - {action.dest for action in self._actions} - {"env"})  # env: TRL's env vars
        if unknown:
            raise L3MConfigError(f"--config: unknown field(s) {unknown} in {path}; see `{self.prog} --help`")
        try:
            *configs, _, remaining = self.parse_args_and_config(argv, return_remaining_strings=True,
                                                                separate_remaining_strings=True)
        except L3MError:
            raise
        except (ValueError, TypeError) as err:  # raised by a dataclass (e.g. transformers.TrainingArguments)
            raise L3MConfigError(_name_the_field(str(err).splitlines()[0], config, argv)) from err
        if remaining:
            raise L3MConfigError(f"unknown argument(s) {remaining}; see `{self.prog} --help`")
        return tuple(configs)

    # Overridden to check and convert the YAML values as argparse does the command line's (TRL sets them as they are).
    def set_defaults_with_config(self, **kwargs) -> list[str]:
        actions = {action.dest: action for action in self._actions}
        return super().set_defaults_with_config(
            **{key: _yaml_value(actions[key], value) if key in actions else value for key, value in kwargs.items()})


def _yaml_value(action: argparse.Action, value: Any) -> Any:
    """A YAML value checked and converted by the field's argparse type, as the same value given as a flag would be."""
    if value is None:
        if action.default is None:
            return None
        raise L3MConfigError(f"{action.dest}: expected a value, got null; remove the key to keep the default "
                             f"{action.default!r}")
    if action.nargs in ("+", "*"):  # a list field: every item converted (argparse leaves list defaults alone)
        return [_converted(action, item) for item in (value if isinstance(value, list) else [value])]
    if isinstance(value, (list, dict)) or action.type is None or isinstance(value, str):
        return value  # structures are checked by their dataclass; strings are converted by argparse itself
    return _converted(action, value)


def _converted(action: argparse.Action, value: Any) -> Any:
    """``value`` converted by the field's argparse type, or a one-line error naming the field."""
    if action.type is None:
        return value
    try:
        return action.type(str(value))
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        expected = {"int": "an integer", "float": "a number", "string_to_bool": "true or false"}.get(
            getattr(action.type, "__name__", ""), "a value of its type")
        raise L3MConfigError(f"{action.dest}: expected {expected}, got {value!r}") from err


def _name_the_field(message: str, config: dict, argv: list[str]) -> str:
    """Prefix a dataclass's ValueError (e.g. ``foo is not a valid OptimizerNames``) with the field that holds ``foo``."""
    bad = _NOT_A_VALID.match(message)
    if bad:
        flags = {argv[i].lstrip("-").replace("-", "_"): argv[i + 1] for i in range(len(argv) - 1)
                 if argv[i].startswith("--")}
        fields = [key for key, value in {**config, **flags}.items() if str(value) == bad.group(1)]
        if fields:
            return f"{fields[0]}: {message}"
    return f"TrainingArguments: {message}"


def load_yaml_config(path: str) -> dict[str, Any]:
    """Read a YAML config into a mapping of field names to values, with a one-line error for an unusable file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError as err:
        raise L3MConfigError(f"--config: no such file {path!r}") from err
    except OSError as err:
        raise L3MConfigError(f"--config: cannot read {path!r} ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise L3MConfigError(f"--config: {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                             f"{err.start}); re-save it as UTF-8") from err
    except yaml.YAMLError as err:
        raise L3MConfigError(f"--config: {path} is not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise L3MConfigError(f"--config: {path} must hold a mapping of field names to values")
    return data


def as_flags(values: dict[str, Any]) -> list[str]:
    """``--field value`` flags for a mapping of field values (lists as several values, structures as YAML strings),
    to layer settings on top of a config as a user's flags would (``l3m compare``'s per-method fields)."""
    import yaml

    flags = []
    for key, value in values.items():
        if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
            flags += [f"--{key}", *map(str, value)]
        elif isinstance(value, (list, dict)):
            flags += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip()]
        elif value is not None:
            flags += [f"--{key}", str(value)]
    return flags


def parse_command(types: tuple, argv: list[str], prog: str, description: str) -> tuple:
    """The dataclasses ``types`` of one command, filled from ``argv`` (``--config`` and flags)."""
    return L3MParser(types, prog=prog, description=description).parse(argv)


def parse_train_args(argv: list[str], *extra_types, prog: str = "", description: str = "", grpo: bool = False) -> tuple:
    """``(script_args, training_args, model_args, *extras)`` of ``l3m train``'s arguments (plus ``extra_types``);
    with ``grpo``, of ``l3m grpo``'s (``training_args`` a :class:`l3m.ConstrainedGRPOConfig`)."""
    from l3m.config import L3MConfig, ModelConfig, ScriptArguments, TrainerModelConfig, TrainScriptArguments
    from l3m.training.grpo_config import ConstrainedGRPOConfig

    configs = (ScriptArguments, ConstrainedGRPOConfig, TrainerModelConfig) if grpo else (
        TrainScriptArguments, L3MConfig, ModelConfig)
    return parse_command((*configs, *extra_types), argv, prog or f"l3m {'grpo' if grpo else 'train'}",
                         description or ("GRPO (TRL's GRPOTrainer) on a reward under reward constraints weighted by "
                                         "an l3m solver." if grpo else "Fine-tune a model under reward constraints "
                                         "(L3M)."))
