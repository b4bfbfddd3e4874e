#!/usr/bin/env bash
# Run by srun once per node (see slurm_lib.sh): one `accelerate launch` with this node's machine rank.
#   node_launch.sh CONFIG TOTAL_PROCESSES|'' MAIN_IP PORT TRAIN_OPTIONS...
set -euo pipefail
config=$1 total=$2 main_ip=$3 port=$4
shift 4
# SLURM delivers its USR1 warning (--signal=USR1@...) to every process of the step. The launcher (torchrun's agent)
# would die of it, so it ignores USR1; the workers inherit that and install their own handler (checkpoint, exit 75).
trap '' USR1
exec "${ACCELERATE:-accelerate}" launch --config_file "$config" ${total:+--num_processes "$total"} \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$main_ip" --main_process_port "$port" \
    -m dist_signmaml.train "$@"
