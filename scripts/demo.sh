#!/usr/bin/env bash
# The main job: install the pinned environment, then `biomedgpt demo`: build the demo shards from real
# packaged biomedical data, train and evaluate a small model on 2 CPU ranks under DeepSpeed (or on every
# GPU). Writes under ./runs/ of the current directory. Extra key=value overrides pass through.
set -euo pipefail
bash "$(dirname "$0")/install.sh"
export PYTHONUNBUFFERED=1
exec biomedgpt demo "$@"
