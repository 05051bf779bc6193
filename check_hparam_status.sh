#!/usr/bin/env bash
# check_hparam_status.sh - where a hyperparameter sweep (run_hparam_search.sh) stands, and how to finish it.
#
# Usage:
#   bash check_hparam_status.sh [SWEEP_DIR] [JOB_ID]
#   bash check_hparam_status.sh runs/hparam_search 123456        # right after `sbatch` (no task has started yet)
#   watch -n 60 bash check_hparam_status.sh runs/hparam_search
# Prints the number of pending / running / completed / failed / not started tasks, each failed task with the end of
# its log, and the exact sbatch command that resubmits only the failed and not-started task ids (finished runs would
# skip themselves anyway; unfinished ones resume from their checkpoints).
#
# Arguments and environment variables:
#   SWEEP_DIR   the sweep folder; must exist     (default: $SWEEP_DIR, else runs/hparam_search next to this script)
#   JOB_ID      array job id(s), comma separated, to ask squeue/sacct about, besides those the sweep's tasks recorded
#               in SWEEP_DIR/slurm_jobs (a job none of whose tasks has started yet is known only from this argument)
#   LOG_LINES   log lines shown per failed task                                                       (default 12)
# The state of a task, first match wins: results.json parses and says completed -> completed; squeue lists it ->
# pending or running; sacct's last state means the task ended without a completed run (RERUN_STATES), or its run
# folder holds a run that stopped unfinished (a results.json cut short included) -> failed; else not started.
# squeue and sacct are optional: without accounting (or in the second after sbatch, before sacct has the job), files
# and squeue decide.
#
# Exit codes: 0 the report was printed (whatever the tasks' states); 1 error (no such sweep folder, ...); 2 bad
# arguments.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm_lib.sh
source "$HERE/slurm_lib.sh"
case "${1:-}" in
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
  -*) usage_error "unknown option '$1' (see --help)" ;;
esac
[ $# -le 2 ] || usage_error "too many arguments (see --help)"
SWEEP=${1:-${SWEEP_DIR:-$HERE/runs/hparam_search}}
[ -d "$SWEEP" ] || die "no sweep folder at $SWEEP"
JOB_ARG=${2:-}
LOG_LINES=${LOG_LINES:-12}
# sacct states of a task that ended without a completed run: it is rerun (COMPLETED too: the batch script exited 0,
# but results.json does not say completed)
RERUN_STATES=" FAILED TIMEOUT OUT_OF_MEMORY NODE_FAIL CANCELLED PREEMPTED BOOT_FAIL DEADLINE COMPLETED REQUEUED "

# ---- the sweep's recorded settings (KEY=VALUE lines; read, never sourced)
declare -A SET=()
if [ -f "$SWEEP/sweep.env" ]; then
  while IFS= read -r line; do
    key=${line%%=*}
    for name in "${SETTINGS[@]}"; do if [ "$key" = "$name" ]; then SET[$key]=${line#*=}; fi; done
  done < "$SWEEP/sweep.env"
fi

# ---- the grid, with the sweep's own grid settings (those it did not record were the defaults)
for name in GRID_LR GRID_LORA_R GRID_LORA_ALPHA GRID_MLP_LAYERS; do
  if [ -n "${SET[$name]+x}" ]; then
    export "$name=${SET[$name]}"
  elif [ -f "$SWEEP/sweep.env" ]; then
    unset "$name"
  fi
done
read_grid
declare -A RUN_OF=() RESULT=() ERROR=()
run_dirs=()
for ((t = 0; t < NUM_TASKS; t++)); do
  config "$t"
  RUN_OF[$t]=$RUN_NAME
  run_dirs+=("$SWEEP/$RUN_NAME")
done
t=0
while IFS=$'\t' read -r status _ error; do
  RESULT[$t]=$status
  ERROR[$t]=$error
  t=$((t + 1))
done < <(results_status "${run_dirs[@]}")
[ "$t" = "$NUM_TASKS" ] || die "could not read the runs' results.json files"

# ---- job ids: the argument and what the tasks recorded
declare -A SEEN_JOB=()
JOBS=()
add_job() { if [[ "$1" =~ ^[0-9]+$ ]] && [ -z "${SEEN_JOB[$1]+x}" ]; then SEEN_JOB[$1]=1; JOBS+=("$1"); fi; }
IFS=',' read -r -a arg_jobs <<< "$JOB_ARG"
for j in "${arg_jobs[@]}"; do add_job "${j%%_*}"; done
if [ -f "$SWEEP/slurm_jobs" ]; then while IFS= read -r j; do add_job "$j"; done < "$SWEEP/slurm_jobs"; fi
mapfile -t JOBS < <(printf '%s\n' "${JOBS[@]}" | sort -n | sed '/^$/d')
JOB_LIST=$(IFS=,; echo "${JOBS[*]}")
NOTES=()

# ---- squeue: pending / running tasks of those jobs
declare -A QUEUE=()
if [ -z "$JOB_LIST" ]; then
  NOTES+=("no job id known (none given, none recorded in $SWEEP/slurm_jobs): queue not checked")
elif ! command -v squeue > /dev/null 2>&1; then
  NOTES+=("squeue not found: queue not checked")
elif queue=$(squeue -h -r -j "$JOB_LIST" -o '%F %K %T' 2>&1); then
  while read -r _ task state; do
    [[ "$task" =~ ^[0-9]+$ ]] || continue
    case "$state" in
      RUNNING | COMPLETING | CONFIGURING | SUSPENDED | STOPPED | SIGNALING | STAGE_OUT | RESIZING)
        QUEUE[$task]=running ;;
      *) if [ -z "${QUEUE[$task]+x}" ]; then QUEUE[$task]=pending; fi ;;
    esac
  done <<< "$queue"
elif [[ "$queue" != *"Invalid job id"* ]]; then  # that one only means: none of these jobs is known any more
  NOTES+=("squeue failed ($(echo "$queue" | head -1)): queue not checked")
fi

# ---- sacct: the last state of each task (later jobs override earlier ones), and how the last job was submitted
declare -A ACCT=() ACCT_JOB=()
SUBMIT_LINE=""
WORK_DIR=""
if [ -n "$JOB_LIST" ] && command -v sacct > /dev/null 2>&1; then
  if acct=$(sacct -n -P -X -j "$JOB_LIST" -o JobID,State,ExitCode,WorkDir,SubmitLine 2>&1); then
    while IFS='|' read -r id state code workdir submit; do
      [[ "$id" =~ ^([0-9]+)_([0-9]+)$ ]] || continue
      ACCT[${BASH_REMATCH[2]}]="${state%% *} (exit $code)"
      ACCT_JOB[${BASH_REMATCH[2]}]=$id
      WORK_DIR=$workdir
      SUBMIT_LINE=$submit
    done < <(echo "$acct" | sort -t_ -k1,1n)
  else
    NOTES+=("sacct unavailable ($(echo "$acct" | head -1)): failures are read from the run folders")
  fi
fi

results_note() {  # "results.json: failed (the error)"
  echo "results.json: ${RESULT[$1]}${ERROR[$1]:+ (${ERROR[$1]})}"
}

# ---- classify every task
declare -A STATE=() WHY=()
for ((t = 0; t < NUM_TASKS; t++)); do
  dir="$SWEEP/${RUN_OF[$t]}"
  acct_state=${ACCT[$t]:-}
  acct_state=${acct_state%% *}
  if [ "${RESULT[$t]}" = completed ]; then
    STATE[$t]=completed
  elif [ -n "${QUEUE[$t]+x}" ]; then
    STATE[$t]=${QUEUE[$t]}
  elif [ -n "$acct_state" ] && [[ "$RERUN_STATES" == *" $acct_state "* ]]; then
    STATE[$t]=failed
    WHY[$t]="${ACCT[$t]}, job ${ACCT_JOB[$t]}"
    if [ "${RESULT[$t]}" != missing ]; then WHY[$t]+="; $(results_note "$t")"; fi
  elif [ "$acct_state" = RUNNING ] || [ "$acct_state" = PENDING ]; then  # when squeue could not say
    STATE[$t]=$(echo "$acct_state" | tr '[:upper:]' '[:lower:]')
  elif [ "${RESULT[$t]}" != missing ]; then
    STATE[$t]=failed
    WHY[$t]=$(results_note "$t")
  elif [ -d "$dir" ] && [ -n "$(ls -A "$dir" 2> /dev/null)" ]; then
    STATE[$t]=failed
    WHY[$t]="stopped unfinished (no results.json, not in the queue)"
  else
    STATE[$t]=not_started
  fi
done

count() {
  local n=0 t
  for ((t = 0; t < NUM_TASKS; t++)); do if [ "${STATE[$t]}" = "$1" ]; then n=$((n + 1)); fi; done
  echo "$n"
}
ids_of() {  # ids in the given states, as SLURM ranges: 2,4-7,9
  local out="" start="" prev="" t
  for ((t = 0; t < NUM_TASKS; t++)); do
    [[ " $* " == *" ${STATE[$t]} "* ]] || continue
    if [ -n "$prev" ] && [ "$prev" = $((t - 1)) ]; then prev=$t; continue; fi
    if [ -n "$start" ]; then out+="${out:+,}$start$([ "$prev" = "$start" ] || echo "-$prev")"; fi
    start=$t
    prev=$t
  done
  if [ -n "$start" ]; then out+="${out:+,}$start$([ "$prev" = "$start" ] || echo "-$prev")"; fi
  echo "$out"
}

log_of() {  # log_of TASK: the task's log file, if it can be found
  local t=$1 dir="$SWEEP/${RUN_OF[$1]}" f="" job d
  if [ -f "$dir/slurm_attempts.log" ]; then f=$(sed -n 's/.* log=\(.*\)$/\1/p' "$dir/slurm_attempts.log" | tail -1); fi
  if [ -n "$f" ] && [ -f "$f" ]; then echo "$f"; return; fi
  job=${ACCT_JOB[$t]:-}
  if [ -n "$job" ]; then
    f=$(job_field "$job" StdOut)
    if [ -n "$f" ] && [ -f "$f" ]; then echo "$f"; return; fi
    for d in "$WORK_DIR" "$HERE" "$PWD"; do
      for f in "$d"/logs/*_"$job".out; do if [ -f "$f" ]; then echo "$f"; return; fi; done
    done
  fi
}

quote() {  # a shell word for $1, quoted only when needed
  if [[ "$1" =~ ^[A-Za-z0-9_./:=+,@%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# ---- report
echo "Sweep $SWEEP: $NUM_TASKS configs${JOB_LIST:+, jobs $JOB_LIST}"
for note in "${NOTES[@]}"; do echo "  note: $note"; done
printf '  pending %s | running %s | completed %s | failed %s | not started %s\n' \
  "$(count pending)" "$(count running)" "$(count completed)" "$(count failed)" "$(count not_started)"

if [ "$(count failed)" -gt 0 ]; then
  echo
  echo "Failed tasks:"
  for ((t = 0; t < NUM_TASKS; t++)); do
    [ "${STATE[$t]}" = failed ] || continue
    log=$(log_of "$t")
    echo "  task $t  ${RUN_OF[$t]}  ${WHY[$t]}"
    if [ -n "$log" ]; then
      echo "    log $log:"
      # progress bars redraw with \r: split them off and drop them
      tail -c 20000 "$log" | tr '\r' '\n' | grep -Ev '^[[:space:]]*$|[0-9]+%\|' | tail -n "$LOG_LINES" |
        cut -c1-200 | sed 's/^/    | /'
    else
      echo "    (log not found)"
    fi
  done
fi

todo=$(ids_of failed not_started)
if [ -n "$todo" ]; then
  # the throttle (%N) of the last submission, else the script's default
  throttle=$(sed -n 's/^#SBATCH --array=[^%]*\(%[0-9]*\).*/\1/p' "$HERE/run_hparam_search.sh" | head -1)
  opts=()
  script="$HERE/run_hparam_search.sh"
  if [ -n "$SUBMIT_LINE" ]; then
    read -r -a words <<< "$SUBMIT_LINE"
    skip=0
    for ((i = 1; i < ${#words[@]}; i++)); do
      w=${words[$i]}
      if [ "$skip" = 1 ]; then skip=0; [[ "$w" == *%* ]] && throttle="%${w##*%}"; continue; fi
      case "$w" in
        --array=* | -a?*) [[ "$w" == *%* ]] && throttle="%${w##*%}" ;;
        --array | -a) skip=1 ;;
        --wait | -W | --parsable) ;;
        *) opts+=("$w") ;;
      esac
    done
    script=""  # it is among the options, where it was
  fi
  cmd="cd $(quote "${WORK_DIR:-$PWD}") &&"
  for name in "${SETTINGS[@]}"; do
    if [ -n "${SET[$name]+x}" ]; then cmd+=" $name=$(quote "${SET[$name]}")"; fi
  done
  cmd+=" sbatch --array=$todo$throttle"
  for w in "${opts[@]}"; do cmd+=" $(quote "$w")"; done
  if [ -n "$script" ]; then cmd+=" <your other sbatch options> $(quote "$script")"; fi
  echo
  echo "Resubmit the failed and not-started tasks ($todo):"
  echo "  $cmd"
  if [ -z "$SUBMIT_LINE" ]; then
    echo "  (sacct has no submit line for this sweep: add the options you submitted with)"
  fi
  if [ ${#SET[@]} = 0 ]; then
    echo "  (no task has recorded its settings yet: set the same variables as for the first submission)"
  fi
elif [ "$(count completed)" = "$NUM_TASKS" ]; then
  echo
  echo "All $NUM_TASKS runs completed: python analyze_hparam_results.py --sweep_dir $(quote "$SWEEP")"
fi
