#!/usr/bin/env bash
# Install the exact pinned environment (idempotent: fast when everything is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore -r requirements.txt
# Only the packaged IU X-ray reports of torchxrayvision are used (real demo/test text): no dependencies.
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps torchxrayvision==1.5.7
# The distribution was called biomedgpt-scale before it took the package's name: drop that older install.
if $PY -m pip show -q biomedgpt-scale >/dev/null 2>&1; then
    $PY -m pip uninstall -q -y --root-user-action=ignore biomedgpt-scale
fi
$PY -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --no-build-isolation -e .
