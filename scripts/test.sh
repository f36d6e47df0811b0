#!/usr/bin/env bash
# Set up a virtual environment from scratch (if absent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: this CPU build is found locally; the project itself keeps a range
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all,dev]"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
