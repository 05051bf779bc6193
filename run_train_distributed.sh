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
#   PROJECT_DIR    the project folder, holding slurm_lib.sh   (default: the submit folder)
#   VENV           environment to activate (default: PROJECT_DIR/.venv when it exists)
#
# The effective batch is --batch_size x GPUS_PER_NODE x nodes x --grad_accum (config.json records it).
# Preemption: 10 minutes before the time limit SLURM sends USR1 to this script, which passes it on to every rank;
# they checkpoint at the next optimizer step and exit 75, and the job requeues itself and resumes (--resume). It
# requeues only when training stopped that way: a crash after the warning ends the job. TERM is passed on as USR1
# too (srun kills the job step at once on TERM; it forwards USR1, and torchrun is told to wait for its ranks on it).
# Details: docs/HPC_DEPLOYMENT_GUIDE.md, section 5.
#
# Exit codes: 0 completed; 2 bad arguments (no --output_dir); 75 stopped by a signal with a checkpoint saved
# (requeued after USR1); any other: training failed (srun's exit code: 1, or 128 + the signal torchrun died of).
set -euo pipefail

PROJECT_DIR=${PROJECT_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
[ -f "$PROJECT_DIR/slurm_lib.sh" ] || { echo "error: no slurm_lib.sh in '$PROJECT_DIR': set PROJECT_DIR" >&2; exit 1; }
# shellcheck source=slurm_lib.sh
source "$PROJECT_DIR/slurm_lib.sh"
trap_signals
FORWARD_AS=USR1
# torchrun's agent: on USR1 pass it to the ranks and wait for them (up to 30 s), like on TERM, instead of dying of it
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
cd "$PROJECT_DIR"

output_dir=""  # where training writes results.json: to tell a preemption (75) from a crash
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --output_dir) output_dir=${args[$((i + 1))]:-} ;;
    --output_dir=*) output_dir=${args[$i]#--output_dir=} ;;
  esac
done
[ -n "$output_dir" ] || usage_error "--output_dir is required, so that a requeued job resumes the same run"

VENV=${VENV:-$PROJECT_DIR/.venv}
# shellcheck disable=SC1091
if [ -f "$VENV/bin/activate" ]; then source "$VENV/bin/activate"; fi
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  [ "$GPUS_PER_NODE" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=1
fi
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
NNODES=${SLURM_NNODES:-1}
echo "[run_train_distributed] job $SLURM_JOB_ID: $NNODES node(s) x $GPUS_PER_NODE process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"

before=$(results_status "$output_dir" | cut -f2)  # results.json's mtime now: a later "preempted" is this attempt's
# One torchrun per node (srun --ntasks-per-node=1); c10d rendezvous on the first node.
run_training srun --kill-on-bad-exit=1 python -m torch.distributed.run \
  --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
  train_vlm_regression.py --resume "$@"
# torchrun exits 1 (or dies of the signal) whatever its ranks exit with: 75 is rank 0's results.json "preempted",
# written by this attempt
status="" mtime=""
IFS=$'\t' read -r status mtime _ < <(results_status "$output_dir") || true
if [ "$TRAIN_RC" != 0 ] && [ "$status" = preempted ] && [ "$mtime" != "$before" ]; then TRAIN_RC=$EXIT_PREEMPTED; fi
after_training "$output_dir/checkpoints/last"
exit "$TRAIN_RC"
