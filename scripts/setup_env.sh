#!/usr/bin/env bash
# Create .venv (if missing) with the CPU build of torch and flowmatch in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # A bare `pip install torch` pulls a multi-GB CUDA build; pin the CPU wheel.
  "$PY" -m pip install -q torch==2.13.0
fi
# Quick when everything is already there; picks up dependencies added since the last set-up.
"$PY" -m pip install -q -e ".[dev,all]"
