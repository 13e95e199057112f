#!/usr/bin/env bash
# Distill (or search: STAGE=search) on several GPUs (or CPU processes, or machines) with accelerate.
#
#   scripts/distill_multigpu.sh NUM_PROCESSES [hydra overrides ...]
#
# Examples:
#   scripts/distill_multigpu.sh 8 recipe=nemotron_9b_to_4b run_dir=/runs/4b          # DDP, 8 GPUs
#   ACCEL_CONFIG=scripts/accelerate/fsdp.yaml \
#     scripts/distill_multigpu.sh 8 recipe=nemotron_9b_to_4b run_dir=/runs/4b        # FSDP2, 8 GPUs
#   CPU=1 scripts/distill_multigpu.sh 2 run_dir=runs/toy tracking.backends=[]          # 2 CPU processes (gloo)
#   STAGE=search scripts/distill_multigpu.sh 8 recipe=nemotron_9b_to_4b run_dir=/runs/4b   # the router search instead
#
# Multi-node (run the same command on every machine; NUM_PROCESSES is per machine):
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_IP=10.0.0.1 MAIN_PORT=29500 scripts/distill_multigpu.sh 8 ...   # on node 0
#   NUM_MACHINES=2 MACHINE_RANK=1 MAIN_IP=10.0.0.1 MAIN_PORT=29500 scripts/distill_multigpu.sh 8 ...   # on node 1
# Under SLURM, one task per node: MACHINE_RANK=$SLURM_NODEID MAIN_IP=$(scontrol show hostnames
# "$SLURM_JOB_NODELIST" | head -n1) srun --ntasks-per-node=1 scripts/distill_multigpu.sh 8 ...
# Requirements for more than one machine:
#   - run_dir on a filesystem every node sees (checkpoints are written by all ranks into one folder,
#     the final models by rank 0; resuming reads them back on every rank);
#   - the teacher, the student and the data at the same paths on every node;
#   - the same code and environment everywhere; NCCL able to reach MAIN_IP:MAIN_PORT.
#
# Notes:
#   - Only one training stage is launched: distill, or search with STAGE=search. Run importance
#     (and prune, before distill) in a single process first.
#   - search: each process draws its own budgets per micro-batch, so a step blends processes x
#     accumulation draws; a resume is exact only with the same number of processes.
#   - distill: the curve does not depend on the number of processes: each phase's batch_size is the GLOBAL
#     batch, and gradient accumulation = batch_size / (micro_batch_size x processes) (must divide).
#   - Logs start with "world size N": check it is the number of processes you meant to start.
#   - `accelerate launch --cpu --num_processes 2` silently starts ONE process; CPU=1 below uses
#     ACCELERATE_USE_CPU=true with a multi-process config instead, which really starts N.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
    sed -n '2,33p' "$0"
    exit 2
fi
NPROC="$1"; shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NUM_MACHINES="${NUM_MACHINES:-1}"
MACHINE_RANK="${MACHINE_RANK:-0}"
MAIN_IP="${MAIN_IP:-127.0.0.1}"
MAIN_PORT="${MAIN_PORT:-29500}"

if [[ "${CPU:-0}" == "1" ]]; then
    export ACCELERATE_USE_CPU=true
    CONFIG="${ACCEL_CONFIG:-$HERE/accelerate/cpu2.yaml}"
    MP=(--mixed_precision no)
else
    CONFIG="${ACCEL_CONFIG:-$HERE/accelerate/ddp.yaml}"
    MP=()
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" WANDB_MODE="${WANDB_MODE:-offline}"

if command -v accelerate >/dev/null; then LAUNCH=(accelerate launch); else LAUNCH=("${PYTHON:-python}" -m accelerate.commands.launch); fi
exec "${LAUNCH[@]}" --config_file "$CONFIG" "${MP[@]}" \
    --num_processes "$((NPROC * NUM_MACHINES))" --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
    -m elastic.run stage="${STAGE:-distill}" "$@"
