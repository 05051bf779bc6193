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
# SWEEP_DIR/lr1e-3_r16_a32_mlp3. A task whose run has a completed results.json exits at once, so resubmitting the
# whole array only runs what is missing; an unfinished run resumes from its last checkpoint (--resume).
# Preemption: USR1 (the --signal warning above, 10 min before the time limit) and TERM are forwarded to training, which
# saves a checkpoint and exits with 75. After USR1 the task requeues itself (SLURM holds a requeued task ~2 min before
# it restarts); after TERM (scancel, preemption, time limit) it does not: SLURM decides, and a preempted job is
# requeued by SLURM when the cluster's PreemptMode says so. Ask a running task to checkpoint and requeue:
#   scancel --signal=USR1 --batch JOBID_TASK
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

# The grid: one place, read by --list, by each task, by check_hparam_status.sh and analyze_hparam_results.py
# (both call --list).
read -r -a LRS <<< "${GRID_LR:-1e-3 5e-4 1e-4 5e-5}"
read -r -a RANKS <<< "${GRID_LORA_R:-8 16 32}"
read -r -a ALPHAS <<< "${GRID_LORA_ALPHA:-16 32}"
read -r -a MLPS <<< "${GRID_MLP_LAYERS:-2 3 4}"
NUM_TASKS=$(( ${#LRS[@]} * ${#RANKS[@]} * ${#ALPHAS[@]} * ${#MLPS[@]} ))
SETTINGS=(DATASET DATA_ROOT CATEGORIES MODEL_NAME EPOCHS BATCH_SIZE SWEEP_DIR EXTRA_ARGS WANDB_PROJECT WANDB_MODE VENV
  PROJECT_DIR GRID_LR GRID_LORA_R GRID_LORA_ALPHA GRID_MLP_LAYERS)
EXIT_PREEMPTED=75  # train_vlm_regression.py: checkpoint saved, resume me

die() { echo "error: $*" >&2; exit 1; }

check_grid() {
  local v
  [ "$NUM_TASKS" -gt 0 ] || die "empty grid"
  for v in "${LRS[@]}"; do [[ "$v" =~ ^[0-9.]+([eE][-+]?[0-9]+)?$ ]] || die "GRID_LR: '$v' is not a number"; done
  for v in "${RANKS[@]}" "${ALPHAS[@]}" "${MLPS[@]}"; do
    [[ "$v" =~ ^[0-9]+$ ]] || die "grid value '$v' is not an integer"
  done
}

# config TASK -> sets LR LORA_R LORA_ALPHA MLP_LAYERS RUN_NAME (lr varies slowest, MLP layers fastest)
config() {
  local t=$1
  if ! [[ "$t" =~ ^[0-9]+$ ]] || [ "$t" -ge "$NUM_TASKS" ]; then
    die "task id '$t' is outside the grid (0-$((NUM_TASKS - 1)))"
  fi
  MLP_LAYERS=${MLPS[t % ${#MLPS[@]}]}; t=$((t / ${#MLPS[@]}))
  LORA_ALPHA=${ALPHAS[t % ${#ALPHAS[@]}]}; t=$((t / ${#ALPHAS[@]}))
  LORA_R=${RANKS[t % ${#RANKS[@]}]}; t=$((t / ${#RANKS[@]}))
  LR=${LRS[t]}
  RUN_NAME="lr${LR}_r${LORA_R}_a${LORA_ALPHA}_mlp${MLP_LAYERS}"
}

list_configs() {
  local t
  printf 'task\trun_name\tlr\tlora_r\tlora_alpha\tmlp_layers\n'
  for ((t = 0; t < NUM_TASKS; t++)); do
    config "$t"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$RUN_NAME" "$LR" "$LORA_R" "$LORA_ALPHA" "$MLP_LAYERS"
  done
}

find_project_dir() {
  local here cmd
  if [ -n "${PROJECT_DIR:-}" ]; then
    echo "$PROJECT_DIR"; return
  fi
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)  # under sbatch: a copy in the spool folder
  if [ -f "$here/train_vlm_regression.py" ]; then echo "$here"; return; fi
  if [ -n "${SLURM_JOB_ID:-}" ]; then  # the path sbatch was given
    cmd=$(scontrol show job "$(slurm_task_ref)" 2> /dev/null | sed -n 's/^ *Command=//p' | head -1 || true)
    if [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/train_vlm_regression.py" ]; then
      (cd "$(dirname "$cmd")" && pwd); return
    fi
  fi
  echo "${SLURM_SUBMIT_DIR:-$PWD}"
}

# An array task's own id: "<array job>_<task>". Not $SLURM_JOB_ID alone: for the array's last task that equals the
# array job id, and `scontrol requeue <array job id>` would requeue every task of the array.
slurm_task_ref() {
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "$SLURM_JOB_ID"
  fi
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

FORWARDED=""
TRAIN_PID=""
forward() {  # trap handler: pass SLURM's warning on to training, which checkpoints at its next optimizer step
  FORWARDED=$1
  if [ -n "$TRAIN_PID" ]; then
    echo "[$(date +%T)] got SIG$1: forwarding to training (pid $TRAIN_PID)"
    kill -s "$1" "$TRAIN_PID" 2> /dev/null || true
  else
    echo "[$(date +%T)] got SIG$1 before training started: passed on once it has"
  fi
}

run_task() {
  local task=$1 rc=0 pyexe
  config "$task"
  local run_dir="$SWEEP_DIR/$RUN_NAME"
  echo "[$(date '+%F %T')] task $task: $RUN_NAME (lr $LR, LoRA r $LORA_R alpha $LORA_ALPHA, $MLP_LAYERS MLP layers)" \
    "on $(hostname)${SLURM_JOB_ID:+, job $(slurm_task_ref), restart ${SLURM_RESTART_COUNT:-0}}"
  if grep -Eqs '"status"[[:space:]]*:[[:space:]]*"completed"' "$run_dir/results.json"; then
    echo "already completed ($run_dir/results.json): nothing to do"
    return 0
  fi
  mkdir -p "$run_dir"
  write_sweep_env
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    local stdout
    stdout=$(scontrol show job "$(slurm_task_ref)" 2> /dev/null | sed -n 's/^ *StdOut=//p' | head -1 || true)
    echo "$(date '+%F %T') job=$(slurm_task_ref) array_job=${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}" \
      "restart=${SLURM_RESTART_COUNT:-0} host=$(hostname) log=$stdout" >> "$run_dir/slurm_attempts.log"
    # the array job ids this sweep ran under, so check_hparam_status.sh can ask squeue/sacct without being told
    grep -qx "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}" "$SWEEP_DIR/slurm_jobs" 2> /dev/null ||
      echo "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}" >> "$SWEEP_DIR/slurm_jobs"
  fi

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
  # In the background, so that bash runs the traps while training runs (a foreground child would delay them)
  "$pyexe" "$PROJECT_DIR/train_vlm_regression.py" "${args[@]}" "${extra[@]}" &
  TRAIN_PID=$!
  if [ -n "$FORWARDED" ]; then forward "$FORWARDED"; fi  # a signal that came before training started
  while :; do
    rc=0
    wait "$TRAIN_PID" || rc=$?
    # `wait` also returns (>128) when a trapped signal arrives; training is then still running
    kill -0 "$TRAIN_PID" 2> /dev/null || break
  done
  trap - USR1 TERM
  echo "[$(date +%T)] training exited with $rc"

  # killed by the forwarded signal before it could install its handler: nothing lost, resume like a preemption
  if [ -n "$FORWARDED" ] && { [ "$rc" = 138 ] || [ "$rc" = 143 ]; }; then rc=$EXIT_PREEMPTED; fi
  if [ "$rc" = "$EXIT_PREEMPTED" ]; then
    if [ -z "${SLURM_JOB_ID:-}" ]; then
      echo "stopped: run the same command again to resume from $run_dir/checkpoints/last"
    elif [ "$FORWARDED" = TERM ]; then
      # TERM is SLURM ending the job (scancel, time limit, preemption): its decision whether it comes back
      echo "stopped by SIGTERM: checkpoint saved; not requeueing (a preempted job is requeued by SLURM itself)"
    else
      echo "preempted: requeueing $(slurm_task_ref); it resumes from $run_dir/checkpoints/last"
      scontrol requeue "$(slurm_task_ref)" || echo "requeue failed: resubmit this task (check_hparam_status.sh)"
    fi
  fi
  return "$rc"
}

case "${1:-}" in
  --list)
    check_grid
    list_configs
    exit 0 ;;
  --task)
    [ $# = 2 ] || die "usage: $0 --task N"
    TASK=$2 ;;
  -h | --help)
    sed -n '/^# run_hparam_search.sh/,/^set -euo/p' "$0" | sed '$d'
    exit 0 ;;
  "")
    [ -n "${SLURM_ARRAY_TASK_ID:-}" ] ||
      die "not a SLURM array task: submit with sbatch, or run one config with --task N (--list shows them)"
    TASK=$SLURM_ARRAY_TASK_ID ;;
  *) die "unknown argument '$1' (see --help)" ;;
esac
check_grid
# from here on a signal must not kill the script (bash's default for USR1): it is kept for training
trap 'forward USR1' USR1
trap 'forward TERM' TERM

declare -A USER_SET=()  # the settings the user gave, before defaults fill in the rest
for name in "${SETTINGS[@]}"; do if [ -n "${!name+x}" ]; then USER_SET[$name]=${!name}; fi; done

PROJECT_DIR=$(find_project_dir)
[ -f "$PROJECT_DIR/train_vlm_regression.py" ] ||
  die "train_vlm_regression.py not found in '$PROJECT_DIR': submit from the project folder or set PROJECT_DIR"
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
