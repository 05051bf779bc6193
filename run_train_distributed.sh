#!/usr/bin/env bash
#SBATCH --job-name=vlm-ddp
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=200G
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x_%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#
# run_train_distributed.sh - one data-parallel training run on one or more GPU nodes: srun starts one torchrun per
# node, torchrun starts one training process per GPU, the nodes meet at the first node of the allocation.
#
# Usage (arguments after the script go to train_vlm_regression.py; --output_dir is required so a requeued job
# resumes the same run):
#   mkdir -p logs
#   sbatch run_train_distributed.sh --dataset fsc147 --data_root /data/FSC147 --output_dir runs/fsc_ddp --epochs 10
#   sbatch --nodes=2 --gres=gpu:8 run_train_distributed.sh --output_dir runs/fsc_2x8 ...     # two nodes of 8 GPUs
#
# Environment:
#   GPUS_PER_NODE  processes per node    (default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 1)
#   MASTER_PORT    rendezvous port       (default: 29500 + job id % 1000, so jobs sharing a node do not collide)
#   PROJECT_DIR    the project folder    (default: the submit folder)
#   VENV           environment to activate (default: PROJECT_DIR/.venv when it exists)
#
# The effective batch is --batch_size x GPUS_PER_NODE x nodes x --grad_accum (config.json records it).
# Preemption: SLURM sends USR1 to this script 10 minutes before the time limit; it sends TERM to srun, which passes
# it to torchrun and on to every training process; they save a checkpoint at the next optimizer step and exit, and
# the job requeues itself and resumes (--resume) from OUTPUT_DIR/checkpoints/last.
set -euo pipefail

PROJECT_DIR=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$PROJECT_DIR"
VENV=${VENV:-$PROJECT_DIR/.venv}
# shellcheck disable=SC1091
[ -f "$VENV/bin/activate" ] && source "$VENV/bin/activate"
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  [ "$GPUS_PER_NODE" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=1
fi
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
NNODES=${SLURM_NNODES:-1}
echo "[run_train_distributed] job $SLURM_JOB_ID: $NNODES node(s) x $GPUS_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"

warned=0
on_usr1() { warned=1; [ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null || true; }
on_term() { [ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null || true; }
trap on_usr1 USR1
trap on_term TERM

# One torchrun per node (srun --ntasks-per-node=1); c10d rendezvous on the first node.
srun --kill-on-bad-exit=1 python -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
  train_vlm_regression.py --resume "$@" &
pid=$!
status=0
# `wait` returns early when a trapped signal arrives; wait again until the launcher has really exited
while :; do
  wait "$pid" && status=0 || status=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [ "$warned" = 1 ]; then
  echo "[run_train_distributed] time limit near: checkpoint saved, requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
