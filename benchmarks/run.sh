#!/usr/bin/env bash
# The one command: set up benchmarks/.venv (if needed), then run every workload and profile.
# Extra arguments go to run.py, e.g. `bash benchmarks/run.sh --workload gmm --repeats 3`.
# With `--workload ... mnist ...` the MNIST files are fetched first (flowmatch's own fetch
# command, a no-op when they are there) into $FLOWMATCH_MNIST_DIR, default benchmarks/data/mnist.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/setup_env.sh"
for arg in "$@"; do
  if [ "$arg" = mnist ]; then
    "$here/.venv/bin/flowmatch" data fetch mnist --dir "${FLOWMATCH_MNIST_DIR:-$here/data/mnist}"
  fi
done
exec "$here/.venv/bin/python" "$here/run.py" --profile "$@"
