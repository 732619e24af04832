#!/usr/bin/env bash
# The GPU suite in one call (bench/gpu_suite.py says what it runs and writes):
#
#   bash bench/gpu_suite.sh [--dry-run] [--out DIR] [--budget-s S] [--only STEP]
#
# With this checkout's .venv (a GPU machine set up with a CUDA torch, or a CPU one for --dry-run) it
# runs there. Without one (the lent device machines: a python3 with CUDA torch, no network) it
# installs the wheels of .whl/ first, which bench/gpu_wheels.sh prepares on a machine with network;
# carry .whl with the call.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
    exec .venv/bin/python bench/gpu_suite.py "$@"
fi
if ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "gpu_suite.sh: no .venv and no .whl/ here: run 'bash bench/gpu_wheels.sh' on a machine with network and carry .whl" >&2
    exit 2
fi
site=$(mktemp -d /tmp/gpu-suite-site.XXXXXX)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 bench/gpu_suite.py "$@"
