"""The sweep on a real SLURM: a single-node cluster on localhost (tests/slurm_cluster.sh: slurmctld, slurmd, and
slurmdbd + MariaDB for sacct), started here and stopped afterwards. Needs root (CI runs as root) and, when SLURM is not
installed yet, apt-get; skipped with the reason otherwise.

The tests share the cluster and one sweep and run in file order, each starting from the state the previous one left
(a 4-task array serves the completion, status, analysis and resubmission checks), to stay within a few minutes:
  1. an array of 4 tiny runs through the real run_hparam_search.sh, with command-line overrides, one task broken on
     purpose (a corrupt checkpoint), runs to the end;
  2. check_hparam_status.sh counts it (3 completed, 1 failed), shows the failure's log and the resubmit line;
  3. analyze_hparam_results.py ranks the 3 runs and lists the broken one;
  4. the printed resubmit line, run as printed in a clean environment, runs only the failed task;
  5. resubmitting the whole array skips the finished tasks;
  6. a task warned like before its time limit (USR1 to the batch shell) checkpoints, requeues itself and resumes;
     cancelled (TERM) it checkpoints and stays cancelled; the resubmit line resumes it to the end.
Then the distributed template trains 2 processes, and both job scripts, running a stand-in training
(tests/stub_training.py) that crashes or stops on cue, requeue only on exit 75.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import analyze_hparam_results as ahr

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_hparam_search.sh"
STATUS = ROOT / "check_hparam_status.sh"
# a 4-config grid of tiny runs; --time leaves room before the USR1 warning (--signal=B:USR1@600)
OVERRIDES = ["--array=0-3", "--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=30"]
SETTINGS = {"MODEL_NAME": "tiny-random", "DATASET": "synthetic", "EPOCHS": "1", "BATCH_SIZE": "2", "WANDB_MODE": "disabled",
            "EXTRA_ARGS": "--train_iters 4 --val_iters 1 --num_workers 0 --log_every 1 --synthetic_num_train 32 "
                          "--synthetic_num_val 4 --warmup_steps 0",
            "GRID_LR": "1e-3 1e-4", "GRID_LORA_R": "8 16", "GRID_LORA_ALPHA": "16", "GRID_MLP_LAYERS": "2"}
RUNS = ["lr1e-3_r8_a16_mlp2", "lr1e-3_r16_a16_mlp2", "lr1e-4_r8_a16_mlp2", "lr1e-4_r16_a16_mlp2"]
BROKEN = 2  # the task made to fail


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def clean_env(**extra):
    """This process's environment without sweep settings (so a command must bring its own), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in SETTINGS and k not in ("SWEEP_DIR", "PROJECT_DIR", "VENV") and not k.startswith("SLURM_")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: installs SLURM with apt-get and runs slurmctld/slurmd as root (CI runs as root)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install it")
    # not under pytest's private (0700) temp folder: MariaDB runs as user mysql and must reach its data folder
    local = Path(tempfile.mkdtemp(prefix="vlm-regression-slurm-"))
    local.chmod(0o755)
    ctld, slurmd, dbd, db = free_ports(4)  # a cluster of our own, even if another one runs on this machine
    env = clean_env(SLURM_LOCAL_DIR=str(local), SLURM_CTLD_PORT=str(ctld), SLURMD_PORT=str(slurmd),
                    SLURMDBD_PORT=str(dbd), SLURM_DB_PORT=str(db))
    t0 = time.time()
    install = subprocess.run(["bash", str(ROOT / "tests" / "slurm_cluster.sh"), "install"], env=env,
                             capture_output=True, text=True, timeout=900)
    if install.returncode:  # e.g. no route to the package mirrors
        shutil.rmtree(local, ignore_errors=True)
        pytest.skip(f"could not install the SLURM packages with apt-get:\n{install.stderr[-2000:]}")
    start = subprocess.run(["bash", str(ROOT / "tests" / "slurm_cluster.sh"), "start"], env=env, capture_output=True,
                           text=True, timeout=900)
    if start.returncode:
        subprocess.run(["bash", str(ROOT / "tests" / "slurm_cluster.sh"), "stop"], env=env, timeout=120)
        shutil.rmtree(local, ignore_errors=True)
        pytest.fail(f"could not start the test cluster:\n{start.stdout}\n{start.stderr}")
    print(f"\ncluster up in {time.time() - t0:.0f} s")
    env["SLURM_CONF"] = str(local / "etc" / "slurm.conf")
    yield env
    subprocess.run(["bash", str(ROOT / "tests" / "slurm_cluster.sh"), "stop"], env=env, timeout=120)
    shutil.rmtree(local, ignore_errors=True)


@pytest.fixture(scope="module")
def sweep(cluster, tmp_path_factory):
    """Submit folder (with logs/) and sweep folder shared by tests 1-5, which record their progress in it."""
    base = tmp_path_factory.mktemp("sweep")
    (base / "submit" / "logs").mkdir(parents=True)
    return {"submit": base / "submit", "dir": base / "sweep", "env": {**cluster, **SETTINGS,
                                                                       "SWEEP_DIR": str(base / "sweep")}}


def run(args, env, cwd=None, check=True, timeout=60):
    out = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise AssertionError(f"{args} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def submit(args, env, cwd):
    out = run(["sbatch", "--parsable", *args], env, cwd=cwd)
    return out.stdout.strip().split(";")[0]


def queued(job, env):
    """{task id: state} of the job's tasks still in squeue."""
    out = run(["squeue", "-h", "-r", "-j", job, "-o", "%K %T"], env, check=False)
    return dict(line.split() for line in out.stdout.splitlines()) if out.returncode == 0 else {}


def wait_done(job, env, timeout=420):
    end = time.time() + timeout
    while queued(job, env):
        assert time.time() < end, f"job {job} still queued after {timeout} s: {queued(job, env)}"
        time.sleep(1)


def status(sweep, *args, until=None, timeout=20):
    """check_hparam_status.sh output; with `until`, repeated (sacct lags a second or two) until it matches."""
    end = time.time() + timeout
    while True:
        out = run(["bash", str(STATUS), str(sweep["dir"]), *args], sweep["env"]).stdout
        if until is None or re.search(until, out) or time.time() > end:
            return out
        time.sleep(1)


def completed(run_dir):
    try:
        return json.loads((run_dir / "results.json").read_text())["status"] == "completed"
    except (OSError, ValueError):
        return False


def needs(sweep, key):
    if key not in sweep:
        pytest.skip("runs after the tests above it in this file (they build the sweep it checks)")


def test_array_of_four_runs_to_completion_through_the_real_script(sweep):
    # break one task the way a crash mid-save would: checkpoints/last points at an empty folder
    broken = sweep["dir"] / RUNS[BROKEN] / "checkpoints"
    (broken / "step-0000009").mkdir(parents=True)
    (broken / "last").symlink_to("step-0000009")

    t0 = time.time()
    job = submit([*OVERRIDES, str(SCRIPT)], sweep["env"], cwd=sweep["submit"])
    sweep["job"] = job
    # at once, before sacct knows the job and before any task has recorded anything: squeue must carry it
    out = status(sweep, job)
    counts = re.search(r"pending (\d+) \| running (\d+) \| completed (\d+) \| failed (\d+) \| not started (\d+)", out)
    assert counts and int(counts[1]) + int(counts[2]) == 4 and counts.group(3, 4, 5) == ("0", "0", "0"), out

    wait_done(job, sweep["env"])
    print(f"array of 4 done in {time.time() - t0:.0f} s")
    for task, name in enumerate(RUNS):
        run_dir = sweep["dir"] / name
        log = sweep["submit"] / "logs" / f"hparam_search_{job}_{task}.out"
        assert log.exists(), f"no log for task {task}: {os.listdir(sweep['submit'] / 'logs')}"
        if task == BROKEN:
            assert not completed(run_dir)
            continue
        assert completed(run_dir), log.read_text()[-3000:]
        config = json.loads((run_dir / "config.json").read_text())
        lr, r = name.split("_")[:2]
        assert (config["lr"], config["lora_r"], config["lora_alpha"], config["mlp_layers"]) == \
            (float(lr[2:]), int(r[1:]), 16, 2)
        assert config["model_name"] == "tiny-random" and config["epochs"] == 1
        assert config.get("train_batches", config.get("train_iters")) == 4  # the new key, or the old one
        attempts = (run_dir / "slurm_attempts.log").read_text()
        assert f"job={job}_{task}" in attempts and f"log={log}" in attempts  # the log the status script shows
    assert (sweep["dir"] / "slurm_jobs").read_text().split() == [job]
    sweep["array_done"] = True


def test_status_counts_shows_the_failed_task_and_the_resubmit_line(sweep):
    needs(sweep, "array_done")
    job = sweep["job"]
    out = status(sweep, until=rf"FAILED \(exit 2:0\), job {job}_{BROKEN}")  # no JOB_ID: the tasks recorded it
    assert "pending 0 | running 0 | completed 3 | failed 1 | not started 0" in out, out
    # training refuses to resume from a checkpoint that is not intact: one line, exit 2, nothing written
    assert f"task {BROKEN}  {RUNS[BROKEN]}  FAILED (exit 2:0), job {job}_{BROKEN}" in out, out
    assert f"log {sweep['submit']}/logs/hparam_search_{job}_{BROKEN}.out:" in out
    assert "training exited with 2" in out and "no intact checkpoint to resume" in out  # the end of its log
    line = out.split(f"Resubmit the failed and not-started tasks ({BROKEN}):\n")[1].splitlines()[0].strip()
    assert line.startswith(f"cd {sweep['submit']} && ")
    assert line.endswith(f" sbatch --array={BROKEN}%10 --gres=none --cpus-per-task=1 --mem=2G --time=30 {SCRIPT}")
    for key, value in SETTINGS.items():
        assert f"{key}={value}" in line or f"{key}='{value}'" in line
    sweep["resubmit"] = line


def test_analysis_of_the_cluster_sweep(sweep, capsys):
    needs(sweep, "array_done")
    ranked = ahr.main(["--sweep_dir", str(sweep["dir"])])
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out)  # the table, for the record
    done = ranked[ranked.status == "completed"]
    assert sorted(done.run) == sorted(RUNS[:BROKEN] + RUNS[BROKEN + 1:])
    assert list(done.best_val_loss) == sorted(done.best_val_loss) and list(done["rank"]) == [1, 2, 3]
    assert sorted(done.task) == [0, 1, 3] and done.pixel_error.notna().all()
    # the broken task's training refused its cut checkpoint before writing anything: listed, not ranked
    assert re.search(rf"incomplete\s+{RUNS[BROKEN]}: config.json missing", out), out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 4 and table[1].startswith(f"| 1 | {done.run.iloc[0]} |")
    for png in ("val_loss_vs_lr.png", "rank_alpha_heatmap.png", "mlp_depth.png", "learning_curves_top.png",
                "marginal_means.png", "summary.csv"):
        assert (sweep["dir"] / "analysis" / png).stat().st_size > 0


def results_mtimes(sweep):
    return {name: (sweep["dir"] / name / "results.json").stat().st_mtime_ns for name in RUNS
            if (sweep["dir"] / name / "results.json").exists()}


def test_the_printed_resubmit_line_runs_only_the_failed_task(sweep):
    needs(sweep, "resubmit")
    shutil.rmtree(sweep["dir"] / RUNS[BROKEN] / "checkpoints")  # the user's fix
    before = results_mtimes(sweep)  # the broken run has none: its refused start wrote nothing
    # as a user would paste it: no sweep settings in the environment, only the cluster's address
    out = run(["bash", "-c", sweep["resubmit"]], clean_env(SLURM_CONF=sweep["env"]["SLURM_CONF"]))
    job = re.search(r"Submitted batch job (\d+)", out.stdout)[1]
    wait_done(job, sweep["env"])
    assert completed(sweep["dir"] / RUNS[BROKEN])
    assert sorted(os.listdir(sweep["submit"] / "logs")) == sorted(
        [f"hparam_search_{sweep['job']}_{t}.out" for t in range(4)] + [f"hparam_search_{job}_{BROKEN}.out"])
    assert results_mtimes(sweep).items() >= before.items()  # the others untouched
    out = status(sweep, until="completed 4")
    assert "pending 0 | running 0 | completed 4 | failed 0 | not started 0" in out, out
    assert "All 4 runs completed" in out and "Resubmit" not in out
    sweep["all_done"] = True


def test_resubmitting_the_whole_array_skips_finished_tasks(sweep):
    needs(sweep, "all_done")
    before = results_mtimes(sweep)
    t0 = time.time()
    job = submit([*OVERRIDES, str(SCRIPT)], sweep["env"], cwd=sweep["submit"])
    wait_done(job, sweep["env"])
    for task in range(4):
        log = (sweep["submit"] / "logs" / f"hparam_search_{job}_{task}.out").read_text()
        assert "already completed" in log and "train_vlm_regression.py" not in log, log
    assert results_mtimes(sweep) == before
    print(f"resubmitted array of 4 finished tasks: {time.time() - t0:.0f} s")


def metrics_steps(run_dir):
    """Steps of the train log lines; [] while training (re)writes the file (a resume truncates it in place)."""
    try:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return []
    return [r["step"] for r in rows if not r.get("epoch_end")]


def wait_for(predicate, what, log, env, timeout=180):
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            jobs = run(["scontrol", "show", "job"], env, check=False).stdout
            text = log.read_text() if log.exists() else "no log"
            raise AssertionError(f"timed out waiting for {what}:\n{text}\n{jobs}")
        time.sleep(0.2)


def test_signalled_task_requeues_and_resumes_and_a_cancelled_one_resumes_on_resubmission(cluster, tmp_path):
    iters = 80
    env = {**cluster, **SETTINGS, "SWEEP_DIR": str(tmp_path / "sweep"), "GRID_LR": "1e-3", "GRID_LORA_R": "8",
           "EXTRA_ARGS": SETTINGS["EXTRA_ARGS"].replace("--train_iters 4", f"--train_iters {iters}")}
    (tmp_path / "logs").mkdir()
    run_dir = tmp_path / "sweep" / "lr1e-3_r8_a16_mlp2"
    job = submit([*OVERRIDES[1:], "--array=0", str(SCRIPT)], env, cwd=tmp_path)
    task = f"{job}_0"
    log = tmp_path / "logs" / f"hparam_search_{job}_0.out"

    # 1. what --signal=B:USR1@600 does before the time limit: USR1 to the batch shell only
    wait_for(lambda: metrics_steps(run_dir), "training to start", log, env)
    run(["scancel", "--signal=USR1", "--batch", task], env)
    wait_for(lambda: queued(job, env).get("0") == "PENDING", "the task to requeue itself", log, env, timeout=120)
    assert "Restarts=1" in run(["scontrol", "show", "job", task], env).stdout
    text = log.read_text()
    saved = int(re.search(r"SIGUSR1: checkpoint saved at step (\d+); exiting", text)[1])
    assert "got SIGUSR1: forwarding to training" in text and f"preempted: requeueing {task}" in text, text
    # SLURM holds a requeued job for cred_expire + 1 s (120 s by default, 10 s on the test cluster)
    wait_for(lambda: "restart 1" in log.read_text() and max(metrics_steps(run_dir), default=0) > saved + 2,
             "the requeued task to resume and train", log, env)
    text = log.read_text()
    assert re.search(rf"resumed from .*step-{saved:07d}: epoch 0, batch {saved}, step {saved}", text), text

    # 2. scancel (TERM to the whole job): checkpoint saved, but cancelled means cancelled: no requeue
    run(["scancel", job], env)
    wait_done(job, env)
    text = log.read_text()
    assert "got SIGTERM" in text and "not requeueing" in text, text
    second = int(re.findall(r"SIGTERM: checkpoint saved at step (\d+)", text)[-1])
    assert saved < second < iters
    sweep = {"dir": tmp_path / "sweep", "env": env}
    out = status(sweep, until=rf"CANCELLED \(exit [0-9:]+\), job {task}")
    assert "pending 0 | running 0 | completed 0 | failed 1 | not started 0" in out, out
    assert "results.json: preempted" in out

    # 3. the resubmit line resumes it from the second checkpoint, to the end
    line = out.split("Resubmit the failed and not-started tasks (0):\n")[1].splitlines()[0]
    new_job = re.search(r"Submitted batch job (\d+)", run(["bash", "-c", line], env).stdout)[1]
    wait_done(new_job, env)
    text = (tmp_path / "logs" / f"hparam_search_{new_job}_0.out").read_text()
    assert re.search(rf"resumed from .*step-{second:07d}: epoch 0, batch {second}, step {second}", text), text
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["step"] == iters
    assert metrics_steps(run_dir) == list(range(1, iters + 1))  # each step logged once across three attempts
    attempts = (run_dir / "slurm_attempts.log").read_text()
    assert f"job={task} array_job={job} restart=0" in attempts and f"job={task} array_job={job} restart=1" in attempts
    assert f"job={new_job}_0 array_job={new_job} restart=0" in attempts


def test_distributed_template_trains_two_processes_on_the_cluster(cluster, tmp_path):
    """run_train_distributed.sh: srun + torchrun, rendezvous on the allocation's first node, 2 CPU processes."""
    submit_dir = tmp_path / "submit"
    (submit_dir / "logs").mkdir(parents=True)
    out = tmp_path / "ddp_run"
    env = {**cluster, "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1", "PROJECT_DIR": str(ROOT)}
    job = submit(["--gres=none", "--cpus-per-task=2", "--mem=4G", "--time=30", str(ROOT / "run_train_distributed.sh"),
                  "--model_name", "tiny-random", "--dataset", "synthetic", "--synthetic_num_train", "32",
                  "--synthetic_num_val", "8", "--epochs", "1", "--train_iters", "3", "--val_iters", "1",
                  "--batch_size", "2", "--num_workers", "0", "--wandb_mode", "disabled", "--output_dir", str(out)],
                 env, submit_dir)
    wait_done(job, env, timeout=300)
    log = (submit_dir / "logs" / f"vlm-ddp_{job}.out").read_text()
    assert "1 node(s) x 2 process(es)" in log, log[-3000:]
    res = json.loads((out / "results.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert res["status"] == "completed" and res["step"] == 3, log[-3000:]
    assert cfg["world_size"] == 2 and cfg["effective_batch_size"] == 4


def stub_job(cluster, tmp_path, script, mode):
    """(sbatch arguments, environment, output folder, log file name pattern) for `script` running a project whose
    train_vlm_regression.py is tests/stub_training.py, on one CPU."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "slurm_lib.sh").symlink_to(ROOT / "slurm_lib.sh")
    (project / "train_vlm_regression.py").symlink_to(ROOT / "tests" / "stub_training.py")
    (tmp_path / "logs").mkdir()
    env = {**cluster, "PROJECT_DIR": str(project), "STUB_MODE": mode, "OMP_NUM_THREADS": "1"}
    opts = ["--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=30"]
    if script == "run_hparam_search.sh":
        env.update(SWEEP_DIR=str(tmp_path / "sweep"), GRID_LR="1e-3", GRID_LORA_R="8", GRID_LORA_ALPHA="16",
                   GRID_MLP_LAYERS="2", WANDB_MODE="disabled")
        return [*opts, "--array=0", str(ROOT / script)], env, tmp_path / "sweep" / "lr1e-3_r8_a16_mlp2", \
            "hparam_search_{job}_0.out"
    out = tmp_path / "ddp_run"
    env.update(VENV=str(ROOT / ".venv"), GPUS_PER_NODE="1")
    return [*opts, str(ROOT / script), "--output_dir", str(out)], env, out, "vlm-ddp_{job}.out"


@pytest.mark.parametrize("script,mode", [("run_hparam_search.sh", "crash"), ("run_train_distributed.sh", "crash"),
                                         ("run_train_distributed.sh", "preempt")])
def test_job_scripts_requeue_only_when_training_exits_75(cluster, tmp_path, script, mode):
    """Warned with USR1, a job requeues itself only when training stopped with a checkpoint (exit 75). A training that
    crashes after the warning ends the job as failed, even with a results.json "preempted" left by an earlier attempt
    (torchrun exits 1 whatever its processes exit with: the distributed script reads 75 from this attempt's
    results.json)."""
    args, env, out, log_name = stub_job(cluster, tmp_path, script, mode)
    out.mkdir(parents=True)
    if mode == "crash":
        (out / "results.json").write_text('{"status": "preempted"}')
    job = submit(args, env, cwd=tmp_path)
    ref = f"{job}_0" if script == "run_hparam_search.sh" else job
    log = tmp_path / "logs" / log_name.format(job=job)
    wait_for((out / "started.0").exists, "training to start", log, env, timeout=120)
    run(["scancel", "--signal=USR1", "--batch", ref], env)
    wait_done(job, env, timeout=180)
    text = log.read_text()
    info = run(["scontrol", "show", "job", ref], env).stdout
    assert "got SIGUSR1: forwarding to training" in text and "stub training: got SIG" in text, text
    if mode == "crash":
        assert "training exited with 1" in text and "requeueing" not in text, text
        assert "Restarts=0" in info and "JobState=FAILED" in info, info
        assert json.loads((out / "results.json").read_text()) == {"status": "preempted"}  # not this attempt's
    else:
        assert f"preempted: requeueing {ref}" in text and "restart 1" in text, text
        assert "Restarts=1" in info and "JobState=COMPLETED" in info, info
        assert json.loads((out / "results.json").read_text())["status"] == "completed"
