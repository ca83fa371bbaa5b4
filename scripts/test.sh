#!/usr/bin/env bash
# The test command: install the pinned environment, start the one-machine SLURM test cluster
# (Debian slurm-wlm + munge, installed on first use), run the whole suite, stop the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# wandb: off unless a test asks for it (the tests of its offline files and fallbacks set their own mode).
# One torch thread per process: two workers already keep both cores busy, and a second thread per worker only
# spins on a core the other worker needs (measured: 10% less wall time on the in-process files); a test that
# runs a command as a user would (two threads) sets its own.
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled OMP_NUM_THREADS=1
if bash tests/slurm/cluster.sh start; then
    trap 'bash tests/slurm/cluster.sh stop >/dev/null 2>&1 || true' EXIT
else
    echo "warning: the SLURM test cluster did not start; its tests will say why they skip" >&2
fi
# Two workers, whole files per worker (module fixtures such as the trained ZeRO runs are built once):
# most of the time goes to rank start-up, file I/O and waits, so two workers overlap well on two cores.
# The slowest files go first (longest first: neither worker is left with a long file at the end); the
# rest follow in pytest's order. xdist keeps that order with --no-loadscope-reorder (its default puts
# the files with the most tests first). Paths given on the command line replace the file list.
SLOWEST_FIRST=(
    tests/test_engine_distributed.py tests/test_slurm_cluster.py tests/test_readme_commands.py
    tests/test_downstream_e2e.py tests/test_reliability.py tests/test_zero3_eval.py tests/test_default_path.py
    tests/test_checkpoint_background.py tests/test_packaging.py tests/test_run_trust.py tests/test_lora.py
    tests/test_train_features.py tests/test_text_only.py tests/test_cpu_memory.py tests/test_shared_memory.py
)
files=()
for arg in "$@"; do
    [[ $arg != -* && -e ${arg%%::*} ]] && files=("$@") && break
done
if [[ ${#files[@]} == 0 ]]; then
    for f in "${SLOWEST_FIRST[@]}"; do [[ -f $f ]] && files+=("$f"); done
    for f in tests/test_*.py; do [[ " ${SLOWEST_FIRST[*]} " == *" $f "* ]] || files+=("$f"); done
    files+=("$@")
fi
python3 -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=20 "${files[@]}"
