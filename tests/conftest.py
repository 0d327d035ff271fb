"""Shared test setup: make the tests folder importable so that ``from fixtures.tiny import ...`` works, and the tiny
model and data saved to disk for the command-line tests."""

from __future__ import annotations

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """The tiny model and tokenizer saved as a model folder, and a JSONL file of ``messages`` conversations."""
    from fixtures.tiny import save_model_and_data

    root = tmp_path_factory.mktemp("cli_assets")
    model_dir, data = save_model_and_data(root, 64, model_dir="tiny-model")
    return {"root": root, "model": model_dir, "data": data}
