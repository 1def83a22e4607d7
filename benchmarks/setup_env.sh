#!/usr/bin/env bash
# Create benchmarks/.venv: CPU torch, the libraries compared, and flowmatch (editable, no deps).
#
# torchcfm and flow_matching are installed with --no-deps: their metadata pulls torchdyn ->
# pytorch-lightning, torchvision, pandas, scikit-learn, absl-py, which the code paths measured
# here never import. What those paths do import is listed explicitly below:
#   torchcfm.conditional_flow_matching / optimal_transport: numpy, POT (ot), torch
#   flow_matching.path / solver / utils: torch, torchdiffeq, tqdm
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
venv="$here/.venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
PY="$venv/bin/python"
pip_install() { "$PY" -m pip install -q -c "$here/constraints.txt" "$@"; }
if ! "$PY" -c "import torch, numpy, scipy, matplotlib, ot, torchdiffeq, tqdm" >/dev/null 2>&1; then
  pip_install torch==2.13.0 numpy scipy matplotlib POT torchdiffeq tqdm safetensors
fi
if ! "$PY" -c "import torchcfm, flow_matching" >/dev/null 2>&1; then
  pip_install --no-deps torchcfm==1.0.7 flow_matching==1.0.10
fi
if ! "$PY" -c "import flowmatch" >/dev/null 2>&1; then
  pip_install --no-deps -e "$repo"
fi
# Fail here, not halfway through a run, if a code path needs a module that is missing.
"$PY" -c "
import torchcfm.conditional_flow_matching, torchcfm.optimal_transport
import flow_matching.path, flow_matching.solver, flow_matching.utils
import flowmatch.solvers, flowmatch.couplings, flowmatch.metrics
"
