#!/usr/bin/env bash
# Set up .venv if needed, then train a flow on the 2-D checkerboard, sample it and evaluate it.
# Everything lands in runs/checkerboard (config, checkpoints, loss curve, samples, metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUN=${1:-runs/checkerboard}
FM=.venv/bin/flowmatch
if [ -d "$RUN/checkpoints" ]; then
  "$FM" train --resume "$RUN"  # a finished run has nothing left to do; an interrupted one goes on
else
  "$FM" train --preset checkerboard --out "$RUN"
fi
"$FM" sample "$RUN" --n 4000 --solver rk4 --steps 16 --trajectories
"$FM" eval "$RUN" --steps 1,2,4,8,16 --solver euler --no-nll
"$FM" eval "$RUN" --solver dopri5
echo "Done: see $RUN (samples.png, trajectories.png, loss.png, eval-*.json)"
