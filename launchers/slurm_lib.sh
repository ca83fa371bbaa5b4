# Shared by the sbatch scripts (sourced from the repository root): run one training job step.
#
# biomedgpt_train TRAIN_ARGS...   (TRAIN_ARGS: what `python -m biomedgpt.tools.train` takes)
#   1. `biomedgpt.launchers.slurm_env action=prepare` validates the config, captures config / command /
#      environment / hostfile under <output_dir>/slurm/job<ID>-attempt<N>/ and picks MASTER_ADDR
#      (the first node) and a free MASTER_PORT;
#   2. starts the ranks: BIOMEDGPT_LAUNCHER=srun (default) runs one srun task per rank (the rank
#      environment comes from SLURM's variables); BIOMEDGPT_LAUNCHER=deepspeed runs one task per node
#      that starts that node's ranks with the deepspeed launcher (hostfile, --no_ssh, --node_rank);
#      logs: <output_dir>/slurm/logs/rank-<R>.log (srun) or node-<N>.log + one file per rank (deepspeed);
#   3. on SIGUSR1 (`#SBATCH --signal=B:USR1@SECONDS`: the time limit or pre-emption is near) forwards it
#      to every rank; the trainer checkpoints and exits 75, and the job requeues itself, to resume from
#      that checkpoint. SIGTERM (scancel, the hard limit) reaches the ranks from SLURM directly; the
#      job then ends without requeueing.

_biomedgpt_on_usr1() {
    _biomedgpt_preempted=1
    echo "[biomedgpt] $(date +%T) SIGUSR1: asking the ranks to checkpoint and stop" >&2
    if [[ -n ${_biomedgpt_step:-} ]]; then
        kill -USR1 "$_biomedgpt_step" 2>/dev/null || true
    fi
}

_biomedgpt_on_term() {
    echo "[biomedgpt] $(date +%T) SIGTERM: the ranks got it from SLURM; waiting for them" >&2
}

_biomedgpt_requeue() {
    echo "[biomedgpt] $(date +%T) requeueing job $SLURM_JOB_ID to resume from its checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID"
}

biomedgpt_train() {
    local launcher=${BIOMEDGPT_LAUNCHER:-srun} exports rc=0
    _biomedgpt_preempted=0
    _biomedgpt_step=
    trap _biomedgpt_on_usr1 USR1
    trap _biomedgpt_on_term TERM
    exports=$(python -m biomedgpt.launchers.slurm_env action=prepare -- "$@") || return $?
    eval "$exports"
    echo "[biomedgpt] $(date +%T) job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0}: launcher $launcher," \
        "nodes $SLURM_JOB_NODELIST (tasks per node $SLURM_TASKS_PER_NODE), master $MASTER_ADDR:$MASTER_PORT," \
        "run dir $BIOMEDGPT_RUN_DIR" >&2
    if ((_biomedgpt_preempted)); then
        _biomedgpt_requeue
        return 75
    fi
    case $launcher in
        srun)
            srun --kill-on-bad-exit=0 --open-mode=append --output="$BIOMEDGPT_LOG_DIR/rank-%t.log" \
                python -m biomedgpt.launchers.slurm_env action=rank-exec -- "$@" &
            ;;
        deepspeed)
            srun --kill-on-bad-exit=0 --open-mode=append --output="$BIOMEDGPT_LOG_DIR/node-%n.log" \
                --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
                --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
                python -m biomedgpt.launchers.slurm_env action=node-exec hostfile="$BIOMEDGPT_HOSTFILE" \
                log_dir="$BIOMEDGPT_LOG_DIR" -- "$@" &
            ;;
        *)
            echo "[biomedgpt] BIOMEDGPT_LAUNCHER must be srun or deepspeed, got '$launcher'" >&2
            return 2
            ;;
    esac
    _biomedgpt_step=$!
    # `wait` returns early (status > 128) whenever a trapped signal arrives; wait again until the
    # step is really gone, then its own status is what `wait` reports.
    while :; do
        wait "$_biomedgpt_step" && rc=0 || rc=$?
        kill -0 "$_biomedgpt_step" 2>/dev/null || break
    done
    wait "$_biomedgpt_step" && rc=0 || rc=$?
    echo "[biomedgpt] $(date +%T) ranks exited with status $rc" >&2
    if ((_biomedgpt_preempted)) && [[ $rc == 75 ]]; then
        _biomedgpt_requeue
    fi
    return "$rc"
}

