"""Shared test setup: make the tests folder importable so that ``from fixtures.tiny import ...`` works, and the tiny
model and data saved to disk for the command-line tests."""

from __future__ import annotations

import json
import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny model and tokenizer saved as a model folder, and a JSONL file of ``messages`` conversations."""
    from fixtures.tiny import build_model, build_tokenizer, make_examples

    root = tmp_path_factory.mktemp("cli_assets")
    model_dir = root / "tiny-model"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(model_dir)
    build_model(tokenizer).save_pretrained(model_dir)
    data = root / "data.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for example in make_examples(64, 8, 12, seed=0):
            f.write(json.dumps(example) + "\n")
    return {"root": root, "model": str(model_dir), "data": str(data)}
