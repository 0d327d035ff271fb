"""Loading models, tokenizers and task data: the one place where a name becomes a model or a dataset.

``demo`` names the embedded default (:mod:`l3m.assets`) as a model and as a dataset; ``standin-helpful`` and
``standin-harmless`` name the offline preference stand-in (:mod:`l3m.rewards.standin`, built on first use).
Everything else is a hub id or a local path.
"""

from __future__ import annotations

import importlib.util
import os

from l3m.errors import L3MConfigError
from l3m.offline import hub_offline, prepare_hub_name

DTYPES = ("float32", "bfloat16", "float16", "auto")


def resolve_model_name(name: str | None) -> str:
    """A hub id or local folder for ``model_name_or_path``; ``demo`` becomes the converted embedded model."""
    if not name:
        raise L3MConfigError("model_name_or_path: required (a hub id, a local folder, or 'demo')")
    if name == "demo":
        from l3m.assets import demo_model_path

        return demo_model_path()
    return prepare_hub_name(name)


def resolve_dataset_name(name: str | None) -> str:
    """A hub dataset or local path for ``dataset_name``; ``demo`` and ``standin-*`` become their built files."""
    if not name:
        raise L3MConfigError("dataset_name: required (a hub dataset, a local .json/.jsonl/.parquet file, or 'demo')")
    if name == "demo":
        from l3m.assets import demo_data_path

        return demo_data_path()
    if name.startswith("standin-"):
        from l3m.rewards.standin import PREFERENCES, build_standin

        preference = name.removeprefix("standin-")
        if preference not in PREFERENCES:
            raise L3MConfigError(f"dataset_name: the stand-in has {', '.join('standin-' + p for p in PREFERENCES)}, "
                                 f"not {name!r}")
        return build_standin()[preference]
    return prepare_hub_name(name)


def load_tokenizer(name: str, **kwargs):
    """The tokenizer of model ``name`` (resolved), with the EOS token as padding when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(name), **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(model_args, path: str | None = None, auto_class=None, **model_kwargs):
    """Load the policy (or ``auto_class``) and its tokenizer from ``path`` or ``model_args.model_name_or_path``.

    A folder saved with a LoRA adapter (``adapter_config.json``) loads as the base model with the adapter;
    ``load_in_4bit`` / ``load_in_8bit`` load bitsandbytes-quantized weights (TRL's quantization config).
    """
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    name = resolve_model_name(path or model_args.model_name_or_path)
    if model_args.dtype not in DTYPES:
        raise L3MConfigError(f"dtype: unknown dtype {model_args.dtype!r}; use one of {', '.join(DTYPES)}")
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    if auto_class is None and os.path.exists(os.path.join(name, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM as auto_class
    if getattr(model_args, "use_peft", False) and importlib.util.find_spec("peft") is None:
        raise L3MConfigError("use_peft: install peft (pip install 'l3m[peft]') to train a LoRA adapter")
    hub = {"revision": model_args.model_revision, "trust_remote_code": model_args.trust_remote_code}
    quantization = get_quantization_config(model_args)
    if quantization is not None:  # bitsandbytes 4/8-bit weights on this process's GPU (untested here: no GPU)
        from accelerate import PartialState

        model_kwargs = {"quantization_config": quantization, "device_map": {"": PartialState().local_process_index},
                        **model_kwargs}
    try:
        tokenizer = load_tokenizer(name, **hub)
        model = (auto_class or AutoModelForCausalLM).from_pretrained(
            name, dtype=dtype, attn_implementation=model_args.attn_implementation, **hub, **model_kwargs)
    except OSError as err:
        detail = str(err).splitlines()[0].rstrip(".")
        offline = "; the hub is offline: only local folders and cached models load" if hub_offline() else ""
        raise L3MConfigError(f"model_name_or_path: cannot load {name!r} ({detail}{offline})") from err
    return model, tokenizer


def load_splits(script_args, seed: int, check=None):
    """The ``train``/``validation``/``test`` splits of ``script_args.dataset_name`` (:func:`l3m.data.load_task_splits`),
    each checked by ``check(split, split_name, field=...)`` (default: task-data columns), with ``max_train_samples``
    applied to the train split."""
    from l3m.data import check_columns, load_task_splits

    name = resolve_dataset_name(script_args.dataset_name)
    splits = (script_args.dataset_train_split, script_args.dataset_validation_split, script_args.dataset_test_split)
    loaded = load_task_splits(name, script_args.dataset_config, splits, script_args.validation_size,
                              script_args.test_size, seed, data_dir=getattr(script_args, "dataset_data_dir", None))
    for split_name, split in loaded.items():
        (check or check_columns)(split, split_name, field="dataset_name")
    if script_args.max_train_samples:
        loaded["train"] = loaded["train"].select(range(min(script_args.max_train_samples, len(loaded["train"]))))
    return loaded


def load_constraint_prompts(script_args):
    """The constraint steps' prompts of ``script_args.constraint_dataset_name`` (:func:`l3m.data.load_prompt_split`),
    or None when it is not set (the constraint steps then sample the task data's prompts)."""
    from l3m.data import load_prompt_split

    name = getattr(script_args, "constraint_dataset_name", None)
    if not name:
        return None
    return load_prompt_split(resolve_dataset_name(name), script_args.constraint_dataset_config,
                             script_args.constraint_dataset_split)
