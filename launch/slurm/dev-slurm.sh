#!/usr/bin/env bash
# A real Slurm on this machine, one node per network namespace: see launch/slurm/dev_slurm.py.
#   launch/slurm/dev-slurm.sh up --nodes 2     then: export SLURM_CONF=... (printed)
#   launch/slurm/dev-slurm.sh down [NAME]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
exec "$repo/.venv/bin/python" "$repo/launch/slurm/dev_slurm.py" "$@"
