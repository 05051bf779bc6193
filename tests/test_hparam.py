"""The sweep tools without SLURM: the grid (--list), one task run locally (--task), the analysis and the status script
on sweep folders with completed, failed, unfinished and corrupt runs. The real-cluster tests are in test_slurm.py."""
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import analyze_hparam_results as ahr

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_hparam_search.sh"
STATUS = ROOT / "check_hparam_status.sh"
PNGS = ["val_loss_vs_lr.png", "rank_alpha_heatmap.png", "mlp_depth.png", "learning_curves_top.png",
        "marginal_means.png"]
TINY_ENV = {"MODEL_NAME": "tiny-random", "DATASET": "synthetic", "EPOCHS": "1", "BATCH_SIZE": "2", "WANDB_MODE": "disabled",
            "EXTRA_ARGS": "--train_iters 3 --val_iters 1 --num_workers 0 --log_every 1 --synthetic_num_train 32 "
                          "--synthetic_num_val 4 --warmup_steps 0"}


def sh(*args, env=None, check=True, timeout=120):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("GRID_", "SLURM_"))}
    full.update(env or {})
    out = subprocess.run(["bash", *map(str, args)], env=full, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise AssertionError(f"{args} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def grid_rows(env=None):
    lines = sh(SCRIPT, "--list", env=env).stdout.splitlines()
    assert lines[0].split("\t") == ["task", "run_name", "lr", "lora_r", "lora_alpha", "mlp_layers"]
    return [line.split("\t") for line in lines[1:]]


def test_list_is_the_72_config_grid_with_fixed_ids():
    rows = grid_rows()
    assert [int(r[0]) for r in rows] == list(range(72))
    configs = [(float(lr), int(r), int(a), int(m)) for _, _, lr, r, a, m in rows]
    assert sorted(configs) == sorted(itertools.product([1e-3, 5e-4, 1e-4, 5e-5], [8, 16, 32], [16, 32], [2, 3, 4]))
    for _, name, lr, r, a, m in rows:  # the run name encodes the config
        assert name == f"lr{lr}_r{r}_a{a}_mlp{m}"
    assert rows[0][1] == "lr1e-3_r8_a16_mlp2" and rows[71][1] == "lr5e-5_r32_a32_mlp4"
    assert rows == grid_rows()  # deterministic


def test_grid_can_be_changed_by_environment_and_bad_ids_are_refused(tmp_path):
    env = {"GRID_LR": "2e-4 1e-4", "GRID_LORA_R": "4", "GRID_LORA_ALPHA": "8", "GRID_MLP_LAYERS": "2 3"}
    assert [r[1] for r in grid_rows(env)] == ["lr2e-4_r4_a8_mlp2", "lr2e-4_r4_a8_mlp3", "lr1e-4_r4_a8_mlp2",
                                              "lr1e-4_r4_a8_mlp3"]
    bad = sh(SCRIPT, "--task", "4", env={**env, "SWEEP_DIR": str(tmp_path)}, check=False)
    assert bad.returncode != 0 and "outside the grid (0-3)" in bad.stderr
    bad = sh(SCRIPT, "--list", env={"GRID_LR": "1e-3;rm"}, check=False)
    assert bad.returncode != 0 and "not a number" in bad.stderr
    bad = sh(SCRIPT, env={}, check=False)  # neither an array task nor --task
    assert bad.returncode != 0 and "--task N" in bad.stderr


def test_task_runs_locally_then_skips_when_completed(tmp_path):
    env = {**TINY_ENV, "SWEEP_DIR": str(tmp_path / "sweep")}
    out = sh(SCRIPT, "--task", "5", env=env, timeout=300)
    run = tmp_path / "sweep" / "lr1e-3_r8_a32_mlp4"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed", out.stdout + out.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["lr"], config["lora_r"], config["lora_alpha"], config["mlp_layers"]) == (1e-3, 8, 32, 4)
    assert config["run_name"] == run.name and config["epochs"] == 1
    assert config.get("train_batches", config.get("train_iters")) == 3  # the new key, or the old one
    settings = (tmp_path / "sweep" / "sweep.env").read_text().splitlines()
    assert f"EXTRA_ARGS={TINY_ENV['EXTRA_ARGS']}" in settings and f"SWEEP_DIR={tmp_path / 'sweep'}" in settings
    assert not any(s.startswith("GRID_") for s in settings)  # only what the user set

    mtime = (run / "results.json").stat().st_mtime_ns
    t0 = time.time()
    again = sh(SCRIPT, "--task", "5", env=env)
    assert "already completed" in again.stdout and time.time() - t0 < 10
    assert (run / "results.json").stat().st_mtime_ns == mtime

    ranked = ahr.main(["--sweep_dir", str(tmp_path / "sweep")])  # a real run reads back
    assert list(ranked.run) == [run.name] and ranked.status[0] == "completed"
    assert ranked.task[0] == 5 and math.isfinite(ranked.pixel_error[0])


# -----------------------------------------------------------------------------
# A sweep folder written by hand: known losses, and every way a run can be broken


def fake_loss(lr, r, a, m):
    """Best at lr 1e-4, r 16, alpha 32, 3 layers; distinct for every config."""
    return round(0.2 + 0.05 * abs(math.log10(lr) + 4) + 0.01 * abs(r - 16) / 8 + 0.004 * (a == 16) + 0.002 * abs(m - 3)
                 + 1e-5 * r * m, 6)


def write_run(sweep, name, lr, r, a, m, epochs=3, results="completed", count_mae=None):
    run = sweep / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"lr": lr, "lora_r": r, "lora_alpha": a, "mlp_layers": m,
                                                 "epochs": epochs, "run_name": name}))
    best = fake_loss(lr, r, a, m)
    with open(run / "metrics.jsonl", "w") as f:
        for e in range(1, epochs + 1):
            val = best + 0.1 * (epochs - e)
            f.write(json.dumps({"epoch": e, "step": 10 * e, "train/loss": val + 0.05}) + "\n")
            f.write(json.dumps({"epoch": e, "step": 10 * e, "epoch_end": True, "train/loss": val + 0.02,
                                "val/loss": val, "val/loss_x": val / 2, "val/loss_y": val / 2,
                                "val/pixel_error": 100 * val}) + "\n")
    if results == "completed":
        res = {"status": "completed", "best_val_loss": best, "best_epoch": epochs, "final_val_loss": best,
               "epochs_completed": epochs, "trainable_params": 1000, "baseline_val_loss": 0.5, "wall_time_s": 60.0}
        if count_mae is not None:
            res["count_eval"] = {"mae": count_mae, "rmse": count_mae * 1.5}
        (run / "results.json").write_text(json.dumps(res, indent=2))
    elif results == "failed":
        (run / "results.json").write_text(json.dumps({"status": "failed", "error": "non-finite loss (nan) at step 7",
                                                      "best_val_loss": None}, indent=2))
    elif results == "preempted":
        (run / "results.json").write_text(json.dumps({"status": "preempted", "step": 20, "best_val_loss": best},
                                                     indent=2))
    return run


@pytest.fixture
def fake_sweep(tmp_path):
    """40 completed runs of the 72-grid, plus: failed (NaN), preempted, unfinished (no results.json), results.json
    cut short after its "completed" status, completed run with a damaged config.json, completed run with a cut-off metrics line, and a
    completed run whose best_val_loss is NaN; the rest not started."""
    sweep = tmp_path / "sweep"
    rows = grid_rows()
    for task, name, lr, r, a, m in rows[:40]:
        write_run(sweep, name, float(lr), int(r), int(a), int(m), count_mae=1.0 + int(task) % 7 / 10)
    broken = {r[1]: (float(r[2]), int(r[3]), int(r[4]), int(r[5])) for r in rows[40:47]}
    names = list(broken)
    write_run(sweep, names[0], *broken[names[0]], results="failed")
    write_run(sweep, names[1], *broken[names[1]], results="preempted")
    write_run(sweep, names[2], *broken[names[2]], results=None)
    run = write_run(sweep, names[3], *broken[names[3]])  # cut short, but still holding '"status": "completed"'
    (run / "results.json").write_text((run / "results.json").read_text()[:60])
    run = write_run(sweep, names[4], *broken[names[4]])
    (run / "config.json").write_text("{not json")
    run = write_run(sweep, names[5], *broken[names[5]])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "step": 4')
    run = write_run(sweep, names[6], *broken[names[6]])
    res = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**res, "best_val_loss": float("nan")}))
    (sweep / "not_a_run").mkdir()
    (sweep / "sweep.env").write_text(f"DATASET=fsc147\nSWEEP_DIR={sweep}\nEXTRA_ARGS=--train_iters 500 --seed 1\n")
    return sweep, names


def test_analysis_ranks_runs_and_lists_broken_ones(fake_sweep, capsys):
    sweep, broken = fake_sweep
    ranked = ahr.main(["--sweep_dir", str(sweep), "--top", "10", "--sort_by", "val_loss"])
    out = capsys.readouterr().out

    done = ranked[ranked.status == "completed"]
    assert len(done) == 42  # 40 + the damaged config.json (placed by its name) + the cut-off metrics line
    assert list(done["rank"]) == list(range(1, 43))
    assert list(done.best_val_loss) == sorted(done.best_val_loss)
    expected_best = min((fake_loss(float(r[2]), int(r[3]), int(r[4]), int(r[5])), r[1]) for r in grid_rows()[:46]
                        if r[1] not in (broken[0], broken[1], broken[2], broken[3]))
    assert done.run.iloc[0] == expected_best[1]
    status = dict(zip(ranked.run, ranked.status))
    assert status[broken[0]] == "failed" and status[broken[1]] == "incomplete" and status[broken[2]] == "incomplete"
    assert status[broken[3]] == "corrupt" and status[broken[6]] == "corrupt"
    assert status[broken[4]] == "completed" and status[broken[5]] == "completed"
    assert "not_a_run" not in status

    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| rank | run | lr | r | alpha | mlp | best val loss") and "count MAE" in table[0]
    assert len(table) == 2 + 10 and f"| 1 | {expected_best[1]} |" in table[2]
    assert "non-finite loss (nan) at step 7" in out and "preempted at step 20" in out
    assert "results.json unreadable" in out and "config.json unreadable" in out
    assert "Not started (25 of 72 grid configs): tasks 47, 48," in out

    files = sorted(os.listdir(sweep / "analysis"))
    assert files == sorted(["summary.csv", "summary.md", *PNGS])  # and no temp files left
    for png in PNGS:
        assert (sweep / "analysis" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pandas as pd

    csv = pd.read_csv(sweep / "analysis" / "summary.csv")
    assert len(csv) == 47 and list(csv.run[:42]) == list(done.run)
    assert set(csv.status[42:]) == {"failed", "incomplete", "corrupt"}
    assert (sweep / "analysis" / "summary.md").read_text().splitlines() == table


def test_default_ranking_is_by_count_mae_where_runs_recorded_one(fake_sweep, capsys):
    """The sweep looks for the best counter: with count evaluations the default ranks by their MAE (loss shown too);
    a sweep without any ranks by the validation loss."""
    sweep, _ = fake_sweep
    ranked = ahr.main(["--sweep_dir", str(sweep), "--out_dir", str(sweep / "a4")])
    assert "ranked by count_mae" in capsys.readouterr().out
    done = ranked[ranked.status == "completed"]
    assert list(done.count_mae[:40]) == sorted(done.count_mae[:40]) and done.best_val_loss.notna().all()
    for res in sweep.glob("*/results.json"):
        try:
            r = json.loads(res.read_text())
        except ValueError:
            continue
        r.pop("count_eval", None)
        res.write_text(json.dumps(r))
    ranked = ahr.main(["--sweep_dir", str(sweep), "--out_dir", str(sweep / "a5")])
    assert "ranked by val_loss" in capsys.readouterr().out
    done = ranked[ranked.status == "completed"]
    assert list(done.best_val_loss) == sorted(done.best_val_loss)


def test_analysis_sort_by_count_mae_and_pixel_error(fake_sweep, capsys):
    sweep, _ = fake_sweep
    by_mae = ahr.main(["--sweep_dir", str(sweep), "--sort_by", "count_mae", "--out_dir", str(sweep / "a2")])
    mae = list(by_mae[by_mae.status == "completed"].count_mae)
    assert mae[:40] == sorted(mae[:40]) and all(math.isnan(x) for x in mae[40:])  # runs without count_eval last
    by_px = ahr.main(["--sweep_dir", str(sweep), "--sort_by", "pixel_error", "--out_dir", str(sweep / "a3")])
    px = by_px[by_px.status == "completed"].pixel_error
    assert list(px) == sorted(px)


def test_analysis_of_an_empty_or_missing_sweep(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    ranked = ahr.main(["--sweep_dir", str(tmp_path / "empty")])
    assert len(ranked) == 0 and "(no completed run yet)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "empty" / "analysis")) == ["summary.csv", "summary.md"]
    out = subprocess.run([sys.executable, str(ROOT / "analyze_hparam_results.py"), "--sweep_dir",
                          str(tmp_path / "nope")], capture_output=True, text=True)
    assert out.returncode != 0 and "no sweep folder" in out.stderr


def test_analysis_reads_runs_from_the_wandb_api(tmp_path, capsys):
    class Run:
        def __init__(self, name, lr, loss, state="finished", status="completed"):
            self.name, self.path, self.state = name, ["me", "proj", name], state
            self.config = {"lr": lr, "lora_r": 16, "lora_alpha": 32, "mlp_layers": 3}
            self.summary = {"status": status, "best_val_loss": loss, "best_epoch": 2, "baseline_val_loss": 0.5,
                            "epochs_completed": 2, "wall_time_s": 10.0}
            self.loss = loss

        def scan_history(self, keys):
            return [{"epoch": e, "train/loss": self.loss + 0.1, "val/loss": self.loss + 0.1 * (2 - e),
                     "val/pixel_error": 50.0 * e} for e in (1, 2) if self.loss is not None]

    class Api:
        def runs(self, path, filters=None):
            assert path == "me/proj" and filters == {"group": "hparam_search"}
            return [Run("lr1e-3_r16_a32_mlp3", 1e-3, 0.3), Run("lr1e-4_r16_a32_mlp3", 1e-4, 0.2),
                    Run("lr5e-5_r16_a32_mlp3", 5e-5, None, state="running", status=None)]

    runs = ahr.load_wandb("proj", "me", "hparam_search", api=Api())
    ranked = ahr.rank_runs(runs)
    assert list(ranked.run) == ["lr1e-4_r16_a32_mlp3", "lr1e-3_r16_a32_mlp3", "lr5e-5_r16_a32_mlp3"]
    assert list(ranked.status) == ["completed", "completed", "incomplete"]
    assert ranked.pixel_error[0] == 100.0
    ahr.write_outputs(runs, ranked, str(tmp_path / "out"), ahr.markdown_table(ranked))
    assert (tmp_path / "out" / "learning_curves_top.png").exists()


def test_status_without_slurm_counts_files_and_prints_resubmit_line(fake_sweep):
    sweep, broken = fake_sweep
    out = sh(STATUS, sweep).stdout
    # completed: what results.json says (40 + damaged config + cut-off metrics + NaN best loss, which only the analysis
    # rejects); failed: NaN loss, preempted, unfinished, truncated results.json
    assert "pending 0 | running 0 | completed 43 | failed 4 | not started 25" in out, out
    assert "no job id known" in out
    for name in broken[:4]:
        assert name in out
    assert "non-finite loss (nan) at step 7" in out and "stopped unfinished" in out
    line = out.split("Resubmit the failed and not-started tasks (40-43,47-71):\n")[1].splitlines()[0]
    assert line == (f"  cd {os.getcwd()} && DATASET=fsc147 SWEEP_DIR={sweep} EXTRA_ARGS='--train_iters 500 --seed 1' "
                    f"sbatch --array=40-43,47-71%10 <your other sbatch options> {SCRIPT}")


# -----------------------------------------------------------------------------
# What counts as completed, and a sweep path that does not exist


def stub_project(tmp_path, mode="complete"):
    """A project folder whose train_vlm_regression.py is tests/stub_training.py; the job scripts' own slurm_lib.sh."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "slurm_lib.sh").symlink_to(ROOT / "slurm_lib.sh")
    (project / "train_vlm_regression.py").symlink_to(ROOT / "tests" / "stub_training.py")
    return {"PROJECT_DIR": str(project), "STUB_MODE": mode}


def test_results_json_cut_short_after_completed_is_not_completed_in_any_tool(tmp_path, capsys):
    """A results.json that holds '"status": "completed"' but does not parse (a job killed while writing it, a full
    disk) is not a completed run: the task trains again, the status script lists it as failed, the analysis does
    not rank it."""
    sweep = tmp_path / "sweep"
    run = write_run(sweep, "lr1e-3_r8_a16_mlp2", 1e-3, 8, 16, 2)
    (run / "results.json").write_text((run / "results.json").read_text()[:60])
    assert '"status": "completed"' in (run / "results.json").read_text()

    out = sh(STATUS, sweep).stdout
    assert "completed 0 | failed 1 | not started 71" in out, out
    assert "lr1e-3_r8_a16_mlp2  results.json: unreadable (JSONDecodeError" in out, out

    ranked = ahr.main(["--sweep_dir", str(sweep)])
    assert list(ranked.status) == ["corrupt"] and "results.json unreadable" in capsys.readouterr().out

    task = sh(SCRIPT, "--task", "0", env={**stub_project(tmp_path), "SWEEP_DIR": str(sweep)})
    assert "already completed" not in task.stdout and "stub training, rank 0" in task.stdout, task.stdout
    assert json.loads((run / "results.json").read_text())["status"] == "completed"
    assert "already completed" in sh(SCRIPT, "--task", "0", env={"SWEEP_DIR": str(sweep)}).stdout


def test_a_sweep_folder_that_does_not_exist_is_a_one_line_error(tmp_path):
    missing = tmp_path / "runs" / "hparam_serach"  # mistyped
    out = sh(STATUS, missing, check=False)
    assert out.returncode == 1 and out.stderr == f"error: no sweep folder at {missing}\n" and out.stdout == ""
    out = subprocess.run([sys.executable, str(ROOT / "analyze_hparam_results.py"), "--sweep_dir", str(missing)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr == f"error: no sweep folder at {missing}\n"
    assert not missing.exists()  # nothing made on the way
    out = sh(STATUS, "--sweep", check=False)
    assert out.returncode == 2 and out.stderr.startswith("error: unknown option '--sweep'")


def test_a_task_stopped_by_a_signal_exits_75_and_asks_to_be_run_again(tmp_path):
    """Without SLURM there is nothing to requeue: exit 75 and the line that says how to resume."""
    env = {**stub_project(tmp_path, "preempt"), "SWEEP_DIR": str(tmp_path / "sweep")}
    full = {k: v for k, v in os.environ.items() if not k.startswith(("GRID_", "SLURM_"))}
    proc = subprocess.Popen(["bash", str(SCRIPT), "--task", "0"], env={**full, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    started = tmp_path / "sweep" / "lr1e-3_r8_a16_mlp2" / "started.0"
    end = time.time() + 60
    while not started.exists():
        assert time.time() < end and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.1)
    proc.send_signal(15)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 75, out
    assert "got SIGTERM: forwarding to training" in out and "stub training: got SIGTERM" in out
    assert "stopped: run the same command again to resume" in out
