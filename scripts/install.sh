#!/usr/bin/env bash
# Install the exact pinned environment (idempotent: fast when everything is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore -r requirements.txt
# Only the packaged IU X-ray reports of torchxrayvision are used (real demo/test text): no dependencies.
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps torchxrayvision==1.5.7
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --no-build-isolation -e .
