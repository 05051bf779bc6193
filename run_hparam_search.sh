#!/usr/bin/env bash
#SBATCH --job-name=hparam_search
#SBATCH --array=0-71%10
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x_%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#
# run_hparam_search.sh - the LoRA / regression-head hyperparameter grid as a SLURM job array, one training run per task.
#
# Usage (from the project folder; sbatch needs logs/ to exist before it starts a task):
#   mkdir -p logs && DATASET=fsc147 DATA_ROOT=/data/FSC147 sbatch run_hparam_search.sh
#   sbatch --array=0-3 --gres=none --cpus-per-task=2 --mem=8G --time=1:00:00 run_hparam_search.sh
#         (sbatch options on the command line override the #SBATCH lines above: fewer tasks, no GPU, a partition...)
#   bash run_hparam_search.sh --list      # the configs and their task ids
#   bash run_hparam_search.sh --task 5    # run task 5 here, without SLURM
#   bash check_hparam_status.sh [SWEEP_DIR] [JOB_ID]            # progress, failures, the resubmit command
#   python analyze_hparam_results.py --sweep_dir runs/hparam_search   # ranking, summary.csv, plots
#
# Grid: lr [1e-3 5e-4 1e-4 5e-5] x LoRA r [8 16 32] x LoRA alpha [16 32] x MLP layers [2 3 4] = 72 tasks. Task id ->
# config is fixed (lr varies slowest, MLP layers fastest); a task trains into SWEEP_DIR/<run name>, e.g.
# SWEEP_DIR/lr1e-3_r16_a32_mlp3. A task whose results.json parses and says "completed" exits at once, so
# resubmitting the whole array only runs what is missing; an unfinished run resumes from its last checkpoint
# (--resume). The grid, the settings and the signal handling live in slurm_lib.sh, in the project folder.
# Preemption: USR1 (the --signal warning above) and TERM are forwarded to training, which saves a checkpoint and
# exits with 75; after USR1 the task then requeues itself, after TERM SLURM decides. A task requeues only when
# training exited 75. Details: docs/HPC_DEPLOYMENT_GUIDE.md, section 5.
#
# Exit codes: 0 completed (or already completed); 1 error (training failed, project not found, ...); 2 bad arguments
# or task id; 75 stopped by a signal with a checkpoint saved (requeued after USR1; run again to resume).
#
# Environment variables (all optional; sbatch passes your environment to the tasks):
#   DATASET          synthetic | fsc147 | omnicount                                      (default fsc147)
#   DATA_ROOT        the dataset folder (fsc147, omnicount)
#   CATEGORIES       omnicount category folders, space separated                         (default: all)
#   MODEL_NAME       hub id or local folder of the base model        (default: train_vlm_regression.py's default)
#   EPOCHS           epochs per run                                                      (default 10)
#   BATCH_SIZE       batch size per GPU                                                  (default 4)
#   SWEEP_DIR        folder of the run folders; relative to the submit folder  (default PROJECT_DIR/runs/hparam_search)
#   EXTRA_ARGS       more train_vlm_regression.py arguments, split at spaces, e.g. "--train_iters 500 --num_workers 6"
#   WANDB_PROJECT    W&B project                                               (default vlm-sequential-counting)
#   WANDB_MODE       online | offline | disabled      (default offline: compute nodes often lack internet; wandb sync)
#   VENV             virtual environment to activate                         (default PROJECT_DIR/.venv if it exists)
#   PROJECT_DIR      the checkout holding train_vlm_regression.py  (default: this script's folder, else the folder
#                    sbatch was given the script from, else the submit folder)
#   GRID_LR, GRID_LORA_R, GRID_LORA_ALPHA, GRID_MLP_LAYERS
#                    the grid, space separated values   (defaults: the 72-config grid above; match --array to the size)
# The variables you set are recorded in SWEEP_DIR/sweep.env, so check_hparam_status.sh can print an exact resubmit
# command. W&B runs are grouped by the sweep folder's name (WANDB_RUN_GROUP) and named like the run folders.
set -euo pipefail
# a signal before the traps below is kept for training too (slurm_lib.sh: forward)
trap 'SIGNALLED=USR1' USR1
trap 'SIGNALLED=TERM' TERM

# The project (train_vlm_regression.py, slurm_lib.sh): PROJECT_DIR if set, else this script's folder, else, under
# sbatch, which runs a copy of the script from its spool folder, the folder of the path sbatch was given
project=${PROJECT_DIR:-$(dirname "$0")}
if [ -z "${PROJECT_DIR:-}" ] && [ -n "${SLURM_JOB_ID:-}" ] && [ ! -f "$project/slurm_lib.sh" ]; then
  project=$(dirname "$(scontrol show job "$SLURM_JOB_ID" 2> /dev/null | sed -n 's/^ *Command=//p' | head -1)")
fi
if [ ! -f "$project/slurm_lib.sh" ] || [ ! -f "$project/train_vlm_regression.py" ]; then
  echo "error: no project in '$project': submit the project's own script or set PROJECT_DIR" >&2
  exit 1
fi
# shellcheck source=slurm_lib.sh
source "$project/slurm_lib.sh"

list_configs() {
  local t
  printf 'task\trun_name\tlr\tlora_r\tlora_alpha\tmlp_layers\n'
  for ((t = 0; t < NUM_TASKS; t++)); do
    config "$t"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$RUN_NAME" "$LR" "$LORA_R" "$LORA_ALPHA" "$MLP_LAYERS"
  done
}

# The settings the user set, one KEY=VALUE per line (read back by check_hparam_status.sh without eval).
write_sweep_env() {
  local name tmp file="$SWEEP_DIR/sweep.env"
  tmp=$(mktemp "$SWEEP_DIR/.sweep.env.XXXXXX")
  for name in "${SETTINGS[@]}"; do
    if [ "$name" = SWEEP_DIR ]; then
      echo "SWEEP_DIR=$SWEEP_DIR" >> "$tmp"
    elif [ -n "${USER_SET[$name]+x}" ]; then
      [[ "${USER_SET[$name]}" != *$'\n'* ]] || die "$name contains a newline"
      echo "$name=${USER_SET[$name]}" >> "$tmp"
    fi
  done
  if [ -f "$file" ] && ! cmp -s "$tmp" "$file"; then
    echo "warning: settings differ from the sweep's earlier tasks ($file); now:" >&2
    diff "$file" "$tmp" >&2 || true
  fi
  mv -f "$tmp" "$file"
}

# Where this task ran and its log, for check_hparam_status.sh; and the sweep's array job ids, so that it can ask
# squeue/sacct without being told
record_attempt() {
  local run_dir=$1 job=${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}
  echo "$(date '+%F %T') job=$(job_ref) array_job=$job restart=${SLURM_RESTART_COUNT:-0} host=$(hostname)" \
    "log=$(job_field "$(job_ref)" StdOut)" >> "$run_dir/slurm_attempts.log"
  # the array's tasks start together: check-and-append under a lock on the file, or two tasks both append the id
  { flock 9; grep -qx "$job" "$SWEEP_DIR/slurm_jobs" || echo "$job" >> "$SWEEP_DIR/slurm_jobs"; } 9>> "$SWEEP_DIR/slurm_jobs"
}

run_task() {
  local task=$1 pyexe
  config "$task"
  local run_dir="$SWEEP_DIR/$RUN_NAME"
  echo "[$(date '+%F %T')] task $task: $RUN_NAME (lr $LR, LoRA r $LORA_R alpha $LORA_ALPHA, $MLP_LAYERS MLP layers)" \
    "on $(hostname)${SLURM_JOB_ID:+, job $(job_ref), restart ${SLURM_RESTART_COUNT:-0}}"
  if [ "$(results_status "$run_dir" | cut -f1)" = completed ]; then
    echo "already completed ($run_dir/results.json): nothing to do"
    return 0
  fi
  mkdir -p "$run_dir"
  write_sweep_env
  if [ -n "${SLURM_JOB_ID:-}" ]; then record_attempt "$run_dir"; fi

  if [ -n "${VENV:-}" ]; then
    # shellcheck disable=SC1091  # the user's environment
    source "$VENV/bin/activate"
  fi
  pyexe=$(command -v python || command -v python3) || die "no python found (set VENV)"
  local args=(--dataset "$DATASET" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" --lora_r "$LORA_R"
    --lora_alpha "$LORA_ALPHA" --mlp_layers "$MLP_LAYERS" --output_dir "$run_dir" --run_name "$RUN_NAME" --resume
    --wandb_project "$WANDB_PROJECT" --wandb_mode "$WANDB_MODE")
  if [ -n "${DATA_ROOT:-}" ]; then args+=(--data_root "$DATA_ROOT"); fi
  if [ -n "${MODEL_NAME:-}" ]; then args+=(--model_name "$MODEL_NAME"); fi
  if [ -n "${CATEGORIES:-}" ]; then
    local cats
    read -r -a cats <<< "$CATEGORIES"
    args+=(--categories "${cats[@]}")
  fi
  local extra=()
  if [ -n "${EXTRA_ARGS:-}" ]; then read -r -a extra <<< "$EXTRA_ARGS"; fi

  export PYTHONUNBUFFERED=1 WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-$(basename "$SWEEP_DIR")}"
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}"; fi
  echo "+ $pyexe $PROJECT_DIR/train_vlm_regression.py ${args[*]} ${extra[*]}"
  run_training "$pyexe" "$PROJECT_DIR/train_vlm_regression.py" "${args[@]}" "${extra[@]}"
  # killed by the forwarded signal (128 + USR1/TERM) before it could install its handler: nothing lost, a preemption
  if [ -n "$SIGNALLED" ] && { [ "$TRAIN_RC" = 138 ] || [ "$TRAIN_RC" = 143 ]; }; then TRAIN_RC=$EXIT_PREEMPTED; fi
  after_training "$run_dir/checkpoints/last"
  return "$TRAIN_RC"
}

case "${1:-}" in
  --list)
    read_grid
    list_configs
    exit 0 ;;
  --task)
    [ $# = 2 ] || usage_error "usage: $0 --task N"
    TASK=$2 ;;
  -h | --help)
    sed -n '/^# run_hparam_search.sh/,/^set -euo/p' "$0" | sed '$d'
    exit 0 ;;
  "")
    [ -n "${SLURM_ARRAY_TASK_ID:-}" ] ||
      usage_error "not a SLURM array task: submit with sbatch, or run one config with --task N (--list shows them)"
    TASK=$SLURM_ARRAY_TASK_ID ;;
  *) usage_error "unknown argument '$1' (see --help)" ;;
esac
read_grid
trap_signals

declare -A USER_SET=()  # the settings the user gave, before defaults fill in the rest
for name in "${SETTINGS[@]}"; do if [ -n "${!name+x}" ]; then USER_SET[$name]=${!name}; fi; done

PROJECT_DIR=$(cd "$project" && pwd)
DATASET=${DATASET:-fsc147}
EPOCHS=${EPOCHS:-10}
BATCH_SIZE=${BATCH_SIZE:-4}
WANDB_PROJECT=${WANDB_PROJECT:-vlm-sequential-counting}
WANDB_MODE=${WANDB_MODE:-offline}
SWEEP_DIR=${SWEEP_DIR:-$PROJECT_DIR/runs/hparam_search}
mkdir -p "$SWEEP_DIR"
SWEEP_DIR=$(cd "$SWEEP_DIR" && pwd)
if [ -z "${VENV+x}" ] && [ -f "$PROJECT_DIR/.venv/bin/activate" ]; then VENV=$PROJECT_DIR/.venv; fi

run_task "$TASK"
