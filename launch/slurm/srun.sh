#!/usr/bin/env bash
# Inside an interactive allocation (salloc --nodes=N --exclusive): the same as launch/slurm.sbatch.
#   salloc --nodes=2 --exclusive launch/slurm/srun.sh cluster_configs/gpu_2x8.yaml [launch options]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
exec "$repo/.venv/bin/python" "$repo/launch/slurm/job.py" "$@"
