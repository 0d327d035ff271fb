#!/usr/bin/env bash
# The README's first command: install what the demo needs, then run `l3m demo` (Fig. 2 of the paper, offline).
# Extra arguments go to `l3m demo` (see `l3m demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
. .venv/bin/activate
l3m demo "$@"
