#!/usr/bin/env bash
# The README's second command: install the test dependencies, then run the default (fast) test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow` for the tests on the demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
python -m pytest "$@"
