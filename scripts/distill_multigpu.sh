#!/usr/bin/env bash
# Launch ONE training stage (distill, or the search with STAGE=search) on the GPUs of one machine (or
# on CPU processes, or on several machines) with accelerate. One stage per launch: run the
# single-process stages (importance, prune, quantize, evaluate) with plain `python -m elastic.run`.
#
#   scripts/distill_multigpu.sh NUM_PROCESSES [hydra overrides ...]
#
# Examples:
#   scripts/distill_multigpu.sh 8 recipe=nemotron_9b_to_4b run_dir=/runs/4b                # distill, 8 GPUs (parallel.strategy from the recipe: fsdp)
#   STAGE=search scripts/distill_multigpu.sh 8 recipe=nemotron_9b_to_4b run_dir=/runs/4b   # the router search, 8 GPUs
#   scripts/distill_multigpu.sh 8 parallel.strategy=ddp run_dir=...                          # small students: a full replica per GPU
#   CPU=1 scripts/distill_multigpu.sh 2 run_dir=runs/toy tracking.backends=[]                 # 2 CPU processes (gloo), e.g. to try FSDP: parallel.strategy=fsdp
#
# Several machines: scripts/slurm_multinode.sbatch (SLURM), or by hand on every machine (NUM_PROCESSES per machine):
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_IP=10.0.0.1 MAIN_PORT=29500 scripts/distill_multigpu.sh 8 ...   # on node 0
#   NUM_MACHINES=2 MACHINE_RANK=1 MAIN_IP=10.0.0.1 MAIN_PORT=29500 scripts/distill_multigpu.sh 8 ...   # on node 1
# Requirements for more than one machine:
#   - run_dir on a filesystem every node sees (checkpoints are written by all ranks into one folder,
#     the final models by rank 0; resuming reads them back on every rank);
#   - the teacher, the student and the data at the same paths on every node;
#   - the same code and environment everywhere; NCCL able to reach MAIN_IP:MAIN_PORT.
#
# Notes:
#   - Before a GPU run starts, the stage checks the plan (`python -m elastic.run stage=plan ...` prints it)
#     and refuses, naming the term and the key to change, a configuration that does not fit the GPUs.
#   - search: each process draws its own budgets per micro-batch (slot = micro x processes + rank), so the
#     draws and rows match one process with the same global batch.
#   - distill: each phase's batch_size is the GLOBAL batch; accumulation = batch_size / (micro_batch_size x processes).
#   - Logs start with "world size N (DDP|FSDP2 ...)": check it is the number of processes you meant to start.
#   - `accelerate launch --cpu --num_processes 2` silently starts ONE process; CPU=1 below uses
#     ACCELERATE_USE_CPU=true with a multi-process config instead, which really starts N.
#   - Offline clusters: export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 (only the toy recipe sets them itself).
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
    sed -n '2,36p' "$0"
    exit 2
fi
NPROC="$1"; shift
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NUM_MACHINES="${NUM_MACHINES:-1}"
MACHINE_RANK="${MACHINE_RANK:-0}"
MAIN_IP="${MAIN_IP:-127.0.0.1}"
MAIN_PORT="${MAIN_PORT:-29500}"
STAGE="${STAGE:-distill}"
case "$STAGE" in search|distill) ;; *) echo "STAGE must be search or distill (one training stage per launch), got $STAGE" >&2; exit 2;; esac

if [[ "${CPU:-0}" == "1" ]]; then
    export ACCELERATE_USE_CPU=true
    CONFIG="${ACCEL_CONFIG:-$HERE/accelerate/cpu2.yaml}"
    MP=(--mixed_precision no)
else
    CONFIG="${ACCEL_CONFIG:-$HERE/accelerate/gpus.yaml}"
    MP=()
fi
export WANDB_MODE="${WANDB_MODE:-offline}"

REPO="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-$([[ -x "$REPO/.venv/bin/python" ]] && echo "$REPO/.venv/bin/python" || echo python)}"
LAUNCH=("$PY" -m accelerate.commands.launch)
exec "${LAUNCH[@]}" --config_file "$CONFIG" "${MP[@]}" \
    --num_processes "$((NPROC * NUM_MACHINES))" --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
    -m elastic.run stage="$STAGE" "$@"
