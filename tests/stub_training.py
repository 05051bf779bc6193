"""A stand-in for train_vlm_regression.py that the job-script tests put into a project folder of their own
(PROJECT_DIR), so that they can make training crash, or stop on a signal, on cue and within a second.

It honours train_vlm_regression.py's contract with the job scripts: --output_dir, results.json written by rank 0,
exit 0 when completed and 75 (with results.json "preempted") when stopped by SIGUSR1 or SIGTERM. STUB_MODE:
  complete  write results.json "completed" and exit 0 at once
  preempt   wait for a signal (after writing started.<rank>), then "preempted" and exit 75; a restarted SLURM job
            (SLURM_RESTART_COUNT > 0) completes at once
  crash     wait for a signal (after writing started.<rank>), then exit 1 without writing results.json
"""
import json
import os
import signal
import sys
import time

args = sys.argv[1:]
out = args[args.index("--output_dir") + 1]
os.makedirs(out, exist_ok=True)
mode = os.environ.get("STUB_MODE", "complete")
rank = os.environ.get("RANK", "0")
print(f"stub training, rank {rank}, mode {mode}: {' '.join(args)}", flush=True)


def finish(status, code):
    if rank == "0" and status:
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"status": status, "best_val_loss": 0.5, "step": 1}, f)
    print(f"stub training: exit {code}", flush=True)
    sys.exit(code)


def on_signal(sig, frame):
    print(f"stub training: got {signal.Signals(sig).name}", flush=True)
    if mode == "crash":
        finish(None, 1)
    finish("preempted", 75)


signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
if mode == "complete" or os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
    finish("completed", 0)
open(os.path.join(out, f"started.{rank}"), "w").close()
while True:
    time.sleep(0.1)
