# shellcheck shell=bash
# slurm_lib.sh - what the SLURM scripts share, defined once: the sweep's grid and recorded settings, reading
# results.json (with a JSON parser), SLURM look-ups, and running training under SLURM's signals.
#
# Sourced, not run, by run_hparam_search.sh, check_hparam_status.sh and run_train_distributed.sh. They find it in
# the project folder, not next to $0: sbatch runs a copy of a job script from its spool folder.
#
# Exit codes, the same in every script of the project (train_vlm_regression.py included):
#   0   done (or nothing to do)
#   1   error (training failed, a missing file or folder, ...)
#   2   bad arguments
#   75  stopped by a signal with a checkpoint saved: the same command resumes (EX_TEMPFAIL)
# Preemption and requeue are explained in docs/HPC_DEPLOYMENT_GUIDE.md (section 5).

EXIT_ERROR=1
EXIT_USAGE=2
EXIT_PREEMPTED=75 # train_vlm_regression.py's EXIT_PREEMPTED

die() { echo "error: $*" >&2; exit "$EXIT_ERROR"; }
usage_error() { echo "error: $*" >&2; exit "$EXIT_USAGE"; }

# -----------------------------------------------------------------------------
# The sweep: its settings and its grid

# The environment variables a sweep records in SWEEP_DIR/sweep.env (KEY=VALUE lines, read back without eval)
SETTINGS=(DATASET DATA_ROOT CATEGORIES MODEL_NAME EPOCHS BATCH_SIZE SWEEP_DIR EXTRA_ARGS WANDB_PROJECT WANDB_MODE VENV
  PROJECT_DIR GRID_LR GRID_LORA_R GRID_LORA_ALPHA GRID_MLP_LAYERS)

# read_grid: LRS RANKS ALPHAS MLPS and NUM_TASKS from GRID_* (unset: the 72-config grid); dies on a bad value
read_grid() {
  local v
  read -r -a LRS <<< "${GRID_LR:-1e-3 5e-4 1e-4 5e-5}"
  read -r -a RANKS <<< "${GRID_LORA_R:-8 16 32}"
  read -r -a ALPHAS <<< "${GRID_LORA_ALPHA:-16 32}"
  read -r -a MLPS <<< "${GRID_MLP_LAYERS:-2 3 4}"
  NUM_TASKS=$((${#LRS[@]} * ${#RANKS[@]} * ${#ALPHAS[@]} * ${#MLPS[@]}))
  [ "$NUM_TASKS" -gt 0 ] || die "empty grid"
  for v in "${LRS[@]}"; do [[ "$v" =~ ^[0-9.]+([eE][-+]?[0-9]+)?$ ]] || die "GRID_LR: '$v' is not a number"; done
  for v in "${RANKS[@]}" "${ALPHAS[@]}" "${MLPS[@]}"; do
    [[ "$v" =~ ^[0-9]+$ ]] || die "grid value '$v' is not an integer"
  done
}

# config TASK -> LR LORA_R LORA_ALPHA MLP_LAYERS RUN_NAME (lr varies slowest, MLP layers fastest). The run name is
# the one encoding of a config: run folders, W&B run names and analyze_hparam_results.py (through --list) use it.
config() {
  local t=$1
  if ! [[ "$t" =~ ^[0-9]+$ ]] || [ "$t" -ge "$NUM_TASKS" ]; then
    usage_error "task id '$t' is outside the grid (0-$((NUM_TASKS - 1)))"
  fi
  MLP_LAYERS=${MLPS[t % ${#MLPS[@]}]}; t=$((t / ${#MLPS[@]}))
  LORA_ALPHA=${ALPHAS[t % ${#ALPHAS[@]}]}; t=$((t / ${#ALPHAS[@]}))
  LORA_R=${RANKS[t % ${#RANKS[@]}]}; t=$((t / ${#RANKS[@]}))
  LR=${LRS[t]}
  RUN_NAME="lr${LR}_r${LORA_R}_a${LORA_ALPHA}_mlp${MLP_LAYERS}"
}

# -----------------------------------------------------------------------------
# results.json, read with a JSON parser: a file cut short that still holds '"status": "completed"' is not completed

# results_status RUN_DIR...: one line per folder, "STATUS<TAB>MTIME_NS<TAB>ERROR": results.json's status and error
# when it parses as a JSON object, else "missing" or "unreadable" with the reason. One python for all folders.
results_status() {
  local py
  py=$(command -v python3 || command -v python) || die "no python3 found (needed to read results.json)"
  "$py" - "$@" << 'EOF'
import json, os, sys
for run_dir in sys.argv[1:]:
    path, status, error, mtime = os.path.join(run_dir, "results.json"), "missing", "", 0
    try:
        mtime = os.stat(path).st_mtime_ns
        with open(path) as f:
            results = json.load(f)
        if isinstance(results, dict):
            status, error = str(results.get("status") or "no status"), str(results.get("error") or "")
        else:
            status, error = "unreadable", "not a JSON object"
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        status, error = "unreadable", f"{type(e).__name__}: {e}"
    print(status, mtime, " ".join(error.split())[:300], sep="\t")
EOF
}

# -----------------------------------------------------------------------------
# SLURM look-ups

# job_ref: this job's own id. For an array task "<array job>_<task>", not $SLURM_JOB_ID alone: for the array's last
# task that equals the array job id, and `scontrol requeue <array job id>` would requeue every task of the array.
job_ref() {
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "$SLURM_JOB_ID"
  fi
}

# job_field JOB FIELD: one field of `scontrol show job` (StdOut: the log file; Command: the script sbatch was
# given); empty when SLURM does not know the job (any more)
job_field() {
  scontrol show job "$1" 2> /dev/null | sed -n "s/^ *$2=//p" | head -1 || true
}

# -----------------------------------------------------------------------------
# Running training under SLURM's signals. SLURM warns the batch shell with USR1 (--signal=B:USR1@600) and ends a
# job with TERM. Training runs in the background, so that bash runs the traps while it runs (a foreground child
# would delay them), and each signal is passed on: training checkpoints at its next optimizer step and exits 75.

SIGNALLED=${SIGNALLED:-} # the signal that came (USR1 or TERM), kept for training if it came before training started
TRAIN_PID=""
FORWARD_AS="" # the signal training gets; empty: the one that came

forward() {
  SIGNALLED=$1
  if [ -n "$TRAIN_PID" ]; then
    echo "[$(date +%T)] got SIG$1: forwarding to training (pid $TRAIN_PID)"
    kill -s "${FORWARD_AS:-$1}" "$TRAIN_PID" 2> /dev/null || true
  else
    echo "[$(date +%T)] got SIG$1 before training started: passed on once it has"
  fi
}

# trap_signals: from here on USR1 and TERM no longer kill the script (bash's default): they are kept for training
trap_signals() {
  trap 'forward USR1' USR1
  trap 'forward TERM' TERM
}

# run_training CMD...: run CMD in the background, forward signals to it, wait until it has exited; TRAIN_RC = its
# exit code.
run_training() {
  "$@" &
  TRAIN_PID=$!
  if [ -n "$SIGNALLED" ]; then forward "$SIGNALLED"; fi
  # `wait` also returns (>128) when a trapped signal arrives while training still runs: wait again
  while kill -0 "$TRAIN_PID" 2> /dev/null; do wait "$TRAIN_PID" || true; done
  TRAIN_RC=0
  wait "$TRAIN_PID" || TRAIN_RC=$? # bash keeps the exit code of a child it has reaped
  trap - USR1 TERM
  echo "[$(date +%T)] training exited with $TRAIN_RC"
}

# after_training RESUME_FROM: what a stop means, from TRAIN_RC. Only 75 (checkpoint saved) can requeue, and only
# when the stop was not SLURM's TERM (scancel, preemption, the time limit itself: whether the job comes back is
# SLURM's decision). Any other exit code, a crash after the warning included, ends the job as it is.
after_training() {
  [ "$TRAIN_RC" = "$EXIT_PREEMPTED" ] || return 0
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "stopped: run the same command again to resume from $1"
  elif [ "$SIGNALLED" = TERM ]; then
    echo "stopped by SIGTERM: checkpoint saved; not requeueing (a preempted job is requeued by SLURM itself)"
  else
    echo "preempted: requeueing $(job_ref); it resumes from $1"
    scontrol requeue "$(job_ref)" || echo "requeue failed: resubmit this job (check_hparam_status.sh for a sweep)"
  fi
}
