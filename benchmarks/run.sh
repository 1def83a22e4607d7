#!/usr/bin/env bash
# The one command: set up benchmarks/.venv (if needed), then run every workload and profile.
# Extra arguments go to run.py, e.g. `bash benchmarks/run.sh --workload gmm --repeats 3`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bash "$here/setup_env.sh"
exec "$here/.venv/bin/python" "$here/run.py" --profile "$@"
