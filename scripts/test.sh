#!/usr/bin/env bash
# The test command: install the pinned environment, start the one-machine SLURM test cluster
# (Debian slurm-wlm + munge, installed on first use), run the whole suite, stop the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
if bash tests/slurm/cluster.sh start; then
    trap 'bash tests/slurm/cluster.sh stop >/dev/null 2>&1 || true' EXIT
else
    echo "warning: the SLURM test cluster did not start; its tests will say why they skip" >&2
fi
# Two workers, whole files per worker (module fixtures such as the trained ZeRO runs are built once):
# most of the time goes to rank start-up, file I/O and waits, so two workers overlap well on two cores.
python3 -m pytest tests -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=20 "$@"
