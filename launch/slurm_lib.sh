# Shared by the sbatch scripts in launch/ (sourced from $SLURM_SUBMIT_DIR/launch, so submit from the repository root).
#
# Environment knobs (all optional; sbatch exports the submitting shell's environment):
#   ACCELERATE_CONFIG   accelerate config file (default: the script's own choice)
#   PROCESSES_PER_NODE  training processes per node (default: the node's GPUs, else the config's num_processes)
#   RUNS_DIR            parent of the per-job run directories (default: runs)
#   MAIN_PORT           rendezvous port (default: 20000 + job id % 20000, so jobs sharing a node do not collide)
#   MAX_REQUEUES        give up requeueing after this many restarts (default: 20)
#   ACCELERATE          the accelerate executable (default: accelerate on PATH, e.g. from an activated venv)

# The run directory of this job: the same after a requeue (same job id), one per array element.
job_run_dir() {
    local id=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
    echo "${RUNS_DIR:-runs}/${SLURM_JOB_NAME:-signmaml}-${id:-$SLURM_JOB_ID}"
}

# One `accelerate launch` per node via srun; every launch after the first resumes from the newest checkpoint.
# Returns the exit status of srun.
train_on_allocation() {
    local run=$1; shift
    local config=${ACCELERATE_CONFIG:?set ACCELERATE_CONFIG}
    local per_node=${PROCESSES_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    local total=${per_node:+$((per_node * SLURM_NNODES))}
    local main_ip
    main_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    local port=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    mkdir -p "$run"
    local shown_total=${total:-"the config file's"}
    echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: run dir $run," \
        "config $config, $shown_total processes, main $main_ip:$port"
    srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        "$SLURM_SUBMIT_DIR/launch/node_launch.sh" "$config" "$total" "$main_ip" "$port" \
        --out "$run" --resume "$@"
}

# After the training step: requeue when the trainer stopped on a signal and left its PREEMPTED marker
# (checkpoint written; `accelerate launch` turns the workers' exit code 75 into 1, hence the marker).
finish_or_requeue() {
    local run=$1 status=$2
    if [ -f "$run/PREEMPTED" ]; then
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MAX_REQUEUES:-20}" ]; then
            echo "[$(date -Is)] stopped on a signal, but restart ${SLURM_RESTART_COUNT} reached MAX_REQUEUES: not requeued"
            exit 1
        fi
        echo "[$(date -Is)] stopped on a signal after a checkpoint ($(cat "$run/PREEMPTED")): requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "[$(date -Is)] training step finished with status $status"
    exit "$status"
}
