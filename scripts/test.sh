#!/usr/bin/env bash
# The test command: install the pinned environment, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
exec python3 -m pytest tests "$@"
