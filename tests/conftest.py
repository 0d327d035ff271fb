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


@pytest.fixture(autouse=True)
def blame_module_callers(monkeypatch):
    """Re-attribute warnings that land on torch's ``nn.Module`` call machinery to the code that called the module.

    A deprecated argument of a model's ``forward`` warns with ``stacklevel=2``, which names ``Module.__call__``, not the
    caller, so the ``error::...:l3m`` filters of pyproject.toml would miss l3m's own deprecated ``model(...)`` calls.
    Such a warning is issued again from the first frame outside the call machinery, where the configured filters apply
    as usual (and the warnings summary names the real call site). Returns the function that installs this, to install
    it again where ``warnings.showwarning`` was swapped out (``warnings.catch_warnings(record=True)`` does that).
    """
    import warnings

    import torch.nn.modules.module

    call_machinery = torch.nn.modules.module.__file__

    def install():
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            frame = sys._getframe() if filename == call_machinery else None
            while frame is not None and frame.f_code.co_filename != call_machinery:  # the frame the warning names
                frame = frame.f_back
            while frame is not None and frame.f_code.co_filename == call_machinery:  # and on to the module's caller
                frame = frame.f_back
            if frame is None:
                return show(message, category, filename, lineno, file, line)
            warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno,
                                   module=frame.f_globals.get("__name__"), module_globals=frame.f_globals,
                                   registry=frame.f_globals.setdefault("__warningregistry__", {}))

        monkeypatch.setattr(warnings, "showwarning", showwarning)

    install()
    return install
