#!/usr/bin/env bash
# Local launcher: one rank per GPU on this machine, or N CPU processes (DeepSpeed's CPU accelerator, gloo).
#
#   launchers/local.sh [-n RANKS] [-m MODULE] [--] [ARGS...]      (biomedgpt train -n RANKS runs this)
#
# RANKS defaults to the number of GPUs, or 2 without GPUs; MODULE defaults to biomedgpt.tools.train, so
# with no arguments this runs the demo (the README's main job). ARGS go to every rank: --config FILE key=value.
#
# The standard launchers work too (torchrun --nproc-per-node N -m biomedgpt.tools.train ...;
# deepspeed --num_gpus N --module biomedgpt.tools.train ...). This script adds what they lack for
# preemptible checkpointing jobs:
# - SIGUSR1 (SLURM's time-limit warning) is forwarded to every rank, not only SIGTERM/SIGINT;
# - ranks stopping for a resumable reason (exit 75, after a signal) get RESUME_GRACE_S (600 s) to finish
#   writing their checkpoint, where torchrun and deepspeed kill them after 30 s;
# - the job's status is the first non-zero rank status (75 stays 75 for a requeue), where torchrun
#   reports 1; a rank exiting non-zero otherwise gets its peers killed after 5 s;
# - without GPUs it selects DeepSpeed's CPU accelerator and splits the cores between the ranks;
# - a user error (bad setting, path, file) met by every rank is printed once: the ranks de-duplicate their
#   `error:` lines in the file BIOMEDGPT_ERRORS_FILE names (core/user_errors.py), and the job ends with
#   status 1 without a line of its own.
set -u

ranks=""
module="biomedgpt.tools.train"
while getopts "n:m:h" opt; do
    case "$opt" in
        n) ranks="$OPTARG" ;;
        m) module="$OPTARG" ;;
        h) sed -n '2,21p' "$0"; exit 0 ;;
        *) sed -n '2,21p' "$0" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift

PYTHON="${PYTHON:-python}"
gpus=0
# torch's device count costs an import of torch (~3 s of a core): only where a GPU driver is present
if [ -e /dev/nvidiactl ] || [ -e /dev/kfd ]; then
    gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
fi
if [ -z "$ranks" ]; then
    if [ "$gpus" -gt 0 ]; then ranks="$gpus"; else ranks=2; fi
fi
if ! [[ "$ranks" =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: -n must be a positive integer, got '$ranks'" >&2
    exit 2
fi
if [ "$gpus" -eq 0 ]; then
    export DS_ACCELERATOR=cpu
    cores=$(nproc)
    threads=$(( cores / ranks )); [ "$threads" -lt 1 ] && threads=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
elif [ "$ranks" -gt "$gpus" ]; then
    echo "local.sh: $ranks ranks requested but only $gpus GPUs" >&2
    exit 2
fi

export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
export MASTER_PORT="${MASTER_PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
export WORLD_SIZE="$ranks" LOCAL_WORLD_SIZE="$ranks"
export PYTHONUNBUFFERED=1
errors=$(mktemp "${TMPDIR:-/tmp}/biomedgpt-errors.XXXXXX")
export BIOMEDGPT_ERRORS_FILE="$errors"

pids=()
for ((r = 0; r < ranks; r++)); do
    RANK=$r LOCAL_RANK=$r "$PYTHON" -m "$module" "$@" &
    pids+=($!)
done

forward() {
    for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null; done
}
trap 'forward TERM' TERM INT
trap 'forward USR1' USR1

status=0
live=("${pids[@]}")
killer=""
while [ "${#live[@]}" -gt 0 ]; do
    finished=""
    wait -n -p finished "${live[@]}" 2>/dev/null  # bash's "Killed" job notice: the status is reported below
    rc=$?
    if [ -z "${finished:-}" ]; then
        # A forwarded signal interrupted the wait -- or bash (5.2) reaped a rank meanwhile and `wait -n`
        # no longer reports it ("no such job"; it would spin here forever): collect a gone rank directly.
        for pid in "${live[@]}"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid" 2>/dev/null
                rc=$?
                finished=$pid
                break
            fi
        done
        [ -z "${finished:-}" ] && continue
    fi
    still=()
    for pid in "${live[@]}"; do [ "$pid" != "$finished" ] && still+=("$pid"); done
    live=("${still[@]+"${still[@]}"}")
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$rc
        if [ "$rc" -eq 75 ]; then grace="${RESUME_GRACE_S:-600}"; else grace=5; fi
        if ! { [ "$rc" -eq 1 ] && [ -s "$errors" ]; }; then  # a reported user error already said why
            echo "local.sh: rank with pid $finished exited with status $rc; stopping the job (grace ${grace}s)" >&2
        fi
        # (detached from our stdout/stderr, so whoever reads this job's output sees it end with the job)
        ( sleep "$grace"; for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done ) >/dev/null 2>&1 &
        killer=$!
    fi
done
[ -n "$killer" ] && kill "$killer" 2>/dev/null
rm -f "$errors"
exit "$status"
