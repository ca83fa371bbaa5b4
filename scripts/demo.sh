#!/usr/bin/env bash
# The main job: install the pinned environment, then train and evaluate the embedded demo run on
# 2 CPU ranks under DeepSpeed (or every GPU)
# (real packaged biomedical data, a small model, CPU or GPU). Extra key=value overrides pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PYTHONUNBUFFERED=1
exec bash launchers/local.sh -- "$@"
