"""Training: learning, output files, resume after SIGKILL, --max_minutes, SIGTERM checkpoint, W&B offline files,
safety checks, the arguments' old spellings."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dataset as data
import model_vlm_regression as mvr
import train_vlm_regression as tr
from conftest import ROOT
from synthetic_data import SyntheticConfig

SMALL = ["--model_name", "tiny-random", "--dataset", "synthetic", "--synthetic_num_train", "64", "--synthetic_num_val", "16",
         "--batch_size", "2", "--num_workers", "0", "--wandb_mode", "disabled", "--log_every", "1",
         "--lora_r", "8", "--head_hidden_dim", "64", "--warmup_steps", "2", "--num_val_images", "2"]


def train_cmd(out, *extra):
    return [sys.executable, "train_vlm_regression.py", *SMALL, "--output_dir", str(out), *extra]


def run_train(out, *extra, env=None, check=True):
    proc = subprocess.run(train_cmd(out, *extra), cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def epoch_rows(out):
    with open(out / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r.get("epoch_end")]


def test_overfits_one_batch():
    """Model, loss and optimizer can fit one fixed batch exactly: nothing in the path blocks learning."""
    torch.manual_seed(0)
    model, processor = mvr.build_model("tiny-random", lora_r=8, mlp_layers=2, head_hidden_dim=64)
    records, _ = data.load_records("synthetic", split="train", synthetic=SyntheticConfig(num_train=4))
    ds = data.CountingDataset(records[:4], seed=0)
    batch = data.make_collate_fn(processor)([ds[i] for i in range(4)])
    opt = tr.build_optimizer(model, lr=1e-3, mlp_lr=5e-3, weight_decay=0.0)
    model.eval()  # no LoRA dropout: one fixed batch should be fit exactly
    for step in range(300):
        loss = mvr.regression_loss(model(**batch), batch["targets"])[0]
        if loss.item() < 1e-3:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-3, f"loss {loss.item():.5f} after {step} steps"


def test_gradient_flow_check_fires_when_a_group_is_frozen():
    """The first-step check passes when every group learns and names the group that got no gradient otherwise."""
    model, processor = mvr.build_model("tiny-random", lora_r=8, mlp_layers=2, head_hidden_dim=64)
    records, _ = data.load_records("synthetic", split="val", synthetic=SyntheticConfig(num_val=2))
    ds = data.CountingDataset(records, seed=0)
    batch = data.make_collate_fn(processor)([ds[0], ds[1]])
    mvr.regression_loss(model(**batch), batch["targets"])[0].backward()
    norms = tr.gradient_flow(model)
    assert all(norms[g] > 0 for g in mvr.GROUPS)
    model.zero_grad(set_to_none=True)
    for p in model.y_head.parameters():  # the classic mistake: a head left out of training
        p.requires_grad_(False)
    mvr.regression_loss(model(**batch), batch["targets"])[0].backward()
    with pytest.raises(RuntimeError, match="gradient-flow check failed: y_head received no gradient"):
        tr.gradient_flow(model)


def test_output_files_and_checkpoints(tmp_path):
    """A run writes config.json, one metrics row per epoch, results.json that agrees with them, and loadable
    `last` and `best` checkpoints with no temp folders left."""
    out = tmp_path / "run"
    proc = run_train(out, "--epochs", "2", "--train_batches", "4", "--val_batches", "2")
    assert "gradient flow on the first step" in proc.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == 1e-3 and cfg["mlp_lr_effective"] == pytest.approx(5e-3) and cfg["world_size"] == 1
    assert cfg["effective_batch_size"] == 2 and "transformers" in cfg["versions"]
    rows = epoch_rows(out)
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [4, 8]
    for key in ("train/loss", "train/loss_x", "train/loss_y", "val/loss", "val/loss_x", "val/loss_y",
                "val/pixel_error"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(abs(r["val/loss"] - r["val/loss_x"] - r["val/loss_y"] - r["val/loss_done"]) < 1e-5 for r in rows)
    assert all(0 <= r[f"val/stop_{k}"] <= 1 for r in rows for k in ("accuracy", "precision", "recall"))
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["epochs_completed"] == 2
    assert res["best_val_loss"] == min(r["val/loss"] for r in rows)
    assert res["best_epoch"] == 1 + int(np.argmin([r["val/loss"] for r in rows]))
    assert res["final_val_loss"] == rows[-1]["val/loss"] and res["baseline_val_loss"] > 0
    assert res["trainable_params"] == cfg["trainable_params"] > 0
    last, best = out / "checkpoints/last", out / "checkpoints/best"
    assert json.loads((last / "state.json").read_text())["step"] == 8
    assert json.loads((best / "state.json").read_text())["epoch"] == res["best_epoch"]
    assert not glob.glob(str(out / "checkpoints/.tmp-*"))
    model, processor = mvr.VLMRegressionModel.from_pretrained(str(best))
    assert model.config["ordering"] == "reading_order"


def kill_after_checkpoint(out, args, step, timeout=180):
    """Start a training into `out`, SIGKILL it once its last checkpoint has reached `step`; returns state.json's path."""
    proc = subprocess.Popen(train_cmd(out, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints/last/state.json"
    deadline = time.time() + timeout
    while not (state.exists() and json.loads(state.read_text())["step"] >= step):
        assert proc.poll() is None and time.time() < deadline, "run ended before the first mid-epoch checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return state


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """A run killed mid-epoch and resumed from its last checkpoint logs what an uninterrupted run logs."""
    args = ["--epochs", "2", "--train_batches", "24", "--val_batches", "2", "--checkpoint_every", "5"]
    run_train(tmp_path / "straight", *args)
    out = tmp_path / "killed"
    state = kill_after_checkpoint(out, args, step=5)
    assert json.loads(state.read_text())["batch_in_epoch"] > 0  # killed mid-epoch, no results yet
    assert not (out / "results.json").exists()
    run_train(out, *args, "--resume")
    a, b = epoch_rows(tmp_path / "straight"), epoch_rows(out)
    keys = ("epoch", "step", "train/loss", "train/loss_x", "train/loss_y", "val/loss", "val/pixel_error")
    assert [r[k] for r in b for k in keys] == pytest.approx([r[k] for r in a for k in keys], rel=1e-5)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "straight", out))
    assert rb["best_val_loss"] == pytest.approx(ra["best_val_loss"], rel=1e-5) and rb["step"] == ra["step"]


def test_max_minutes_fixes_the_epochs_at_the_end_of_warmup_and_a_resume_keeps_them(tmp_path):
    """--max_minutes: the epochs that fit the budget (at most --epochs) are fixed at the end of warm-up, recorded in
    config.json, state.json and results.json, and the cosine schedule ends at 0 on their last step; a run resumed
    after that keeps them whatever budget it is given; a run that passed warm-up without a budget is refused one."""
    budget = ["--epochs", "1000", "--train_batches", "10", "--val_batches", "1", "--warmup_steps", "5",
              "--checkpoint_every", "3"]
    out = tmp_path / "budget"
    run_train(out, *budget, "--max_minutes", "0.2")
    res, cfg = (json.loads((out / name).read_text()) for name in ("results.json", "config.json"))
    planned = res["epochs_planned"]
    assert 1 <= planned < 1000 and res["epochs_completed"] == cfg["epochs"] == planned and cfg["epochs_limit"] == 1000
    assert res["step"] == 10 * planned
    lrs = [r["lr/vlm"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "lr/vlm" in r]
    assert lrs[-1] == 0.0 and max(lrs) > 0  # the schedule ran to its end on the planned steps

    killed = tmp_path / "killed"
    state = kill_after_checkpoint(killed, budget + ["--max_minutes", "0.3"], step=6)  # decided at step 5
    kept = json.loads(state.read_text())["planned_epochs"]
    assert kept is not None and json.loads(state.read_text())["step"] < 10 * kept
    run_train(killed, *budget, "--max_minutes", "10", "--resume")  # a budget for 1000 epochs: the plan stands
    res = json.loads((killed / "results.json").read_text())
    assert res["status"] == "completed" and res["epochs_completed"] == res["epochs_planned"] == kept
    cfg = json.loads((killed / "config.json").read_text())
    assert cfg["epochs"] == kept and cfg["epochs_limit"] == 1000 and cfg["max_minutes_plan"]["step_s"] > 0

    plain = tmp_path / "plain"
    run_train(plain, "--epochs", "1", "--train_batches", "10", "--val_batches", "1", "--warmup_steps", "5")
    before = (plain / "results.json").read_text()
    proc = run_train(plain, "--epochs", "1", "--train_batches", "10", "--val_batches", "1", "--warmup_steps", "5",
                     "--max_minutes", "5", "--resume", check=False)
    assert proc.returncode == 2 and "without a budget" in proc.stderr.strip().splitlines()[-1]
    assert (plain / "results.json").read_text() == before


def test_max_minutes_plan_is_revised_from_the_measured_epochs(tmp_path):
    """At the end of each epoch from the second until REPLAN_SHARE of the planned ones, the plan is fitted again to the budget from how long the epochs since
    the first took (the first steps' speed only estimated it): more epochs when they ran faster than planned, fewer
    when slower; the schedule, state and config.json follow; later epochs and a resumed run keep the plan."""
    from types import SimpleNamespace

    logged = []
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    args = SimpleNamespace(max_minutes=10, epochs=30, grad_accum=1, warmup_steps=5, output_dir=str(tmp_path))
    now = time.time()
    run = SimpleNamespace(args=args, state={"epoch": 2, "planned_epochs": 30, "budget_plan": {
        "epochs_limit": 100, "estimates": {"step_s": 0.1, "epoch_s": 20.0, "count_s": 30.0}}},
        data=SimpleNamespace(train_batches=200), scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        t_start=now - 100, replan_from=[now - 10], accelerator=SimpleNamespace(num_processes=1), is_main=True,
        log=logged.append, config={}, wandb=None)
    tr.replan_epochs(run)  # epoch 2 took 10 s: (570 - 100 - 30) s left hold 44 more
    assert run.state["planned_epochs"] == args.epochs == json.loads((tmp_path / "config.json").read_text())["epochs"]
    assert args.epochs in (45, 46) and "took 10.0 s" in logged[-1]
    assert run.scheduler.lr_lambdas[0](200 * args.epochs) == 0.0 < run.scheduler.lr_lambdas[0](200 * args.epochs - 1)
    run.state["epoch"], run.replan_from[:] = 3, [time.time() - 60, time.time() - 30]  # 30 s an epoch now: fewer
    tr.replan_epochs(run)
    assert run.state["planned_epochs"] == args.epochs < 45
    kept = args.epochs
    run.state["epoch"], run.replan_from[:] = int(tr.REPLAN_SHARE * kept) + 1, [time.time() - 100]
    tr.replan_epochs(run)
    run.state["epoch"], run.replan_from = 2, None  # a resumed run
    tr.replan_epochs(run)
    assert args.epochs == run.state["planned_epochs"] == kept


def test_sigterm_saves_a_loadable_checkpoint_and_resume_completes(tmp_path):
    """SIGTERM: a checkpoint of the trained weights, results.json `preempted`, exit 75; --resume then completes."""
    out = tmp_path / "run"
    args = ["--epochs", "2", "--train_batches", "40", "--val_batches", "1"]
    proc = subprocess.Popen(train_cmd(out, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == tr.EXIT_PREEMPTED, stdout[-2000:]
    res = json.loads((out / "results.json").read_text())
    state = json.loads((out / "checkpoints/last/state.json").read_text())
    assert res["status"] == "preempted" and 0 < state["step"] < 80 and res["step"] == state["step"]
    model, _ = mvr.VLMRegressionModel.from_pretrained(str(out / "checkpoints/last"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: these are trained weights
    run_train(out, *args, "--resume")
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["step"] == 80 and res["epochs_completed"] == 2


def test_wandb_offline_files_hold_metrics_and_images_and_no_key(tmp_path):
    """W&B offline: the metrics, the validation images with their prompts, and never the API key."""
    out = tmp_path / "run"
    secret = "0123456789abcdef0123456789abcdef01234567"
    run_train(out, "--epochs", "1", "--train_batches", "3", "--val_batches", "1", "--wandb_mode", "offline",
              env={"WANDB_API_KEY": secret})
    runs = glob.glob(str(out / "wandb/offline-run-*"))
    assert len(runs) == 1
    blob = open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb").read()
    for key in (b"train/loss", b"val/loss", b"val/pixel_error", b"lr/heads", b"train/saturation"):
        assert key in blob, key
    assert len(glob.glob(os.path.join(runs[0], "files/media/images/**/*.png"), recursive=True)) == 2  # --num_val_images 2
    assert b"Next location" in blob  # the prompt is the images' caption
    for path in glob.glob(str(out / "**/*"), recursive=True):
        if os.path.isfile(path):
            assert secret.encode() not in open(path, "rb").read(), path


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    """A non-finite loss stops the run at that step with results.json `failed`; checkpoints/last stays finite."""
    out = tmp_path / "run"
    # an absurd head lr makes the head weights overflow on the first update: the next loss is NaN
    proc = run_train(out, "--epochs", "1", "--train_batches", "6", "--val_batches", "1", "--mlp_lr", "1e30",
                     "--max_grad_norm", "0", "--checkpoint_every", "1", check=False)
    assert proc.returncode != 0
    assert "error: non-finite loss" in proc.stderr and "optimizer step 2" in proc.stderr, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "failed" and "non-finite" in res["error"]
    assert json.loads((out / "checkpoints/last/state.json").read_text())["step"] == 1
    model, _ = mvr.VLMRegressionModel.from_pretrained(str(out / "checkpoints/last"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_old_argument_spellings_still_parse():
    """Commands and sweep settings written before the renames keep working: --head_dim, --train_iters and
    --val_iters are the old names of --head_hidden_dim, --train_batches and --val_batches."""
    old = tr.parse_args(["--head_dim", "64", "--train_iters", "7", "--val_iters", "3", "--run_name", "x"])
    new = tr.parse_args(["--head_hidden_dim", "64", "--train_batches", "7", "--val_batches", "3", "--run_name", "x"])
    assert vars(old) == vars(new)
    assert (new.head_hidden_dim, new.train_batches, new.val_batches) == (64, 7, 3)


def test_config_file_settings_and_the_count_at_the_end(tmp_path):
    """--config sets flags from a YAML file (the command line wins, config.json records the result); with
    --eval_count_split test the run ends by counting held-out test images (with test-time shifts), writes
    count_examples/ PNGs, stores the metrics in results.json and says in words what it measured and where the
    pictures are. A config with an unknown key is a one-line error."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 1\ntrain_batches: 2\nval_batches: 1\nlr: 0.002\neval_count_split: test\n"
                   "eval_count_images: 3\nsynthetic_num_test: 4\neval_count_tta_shift: 4\n")
    out = tmp_path / "run"
    proc = run_train(out, "--config", str(cfg), "--lr", "0.001")
    saved = json.loads((out / "config.json").read_text())
    assert saved["train_batches"] == 2 and saved["lr"] == 0.001 and saved["config"] == str(cfg)
    res = json.loads((out / "results.json").read_text())
    assert res["count_eval"]["split"] == "test" and res["count_eval"]["num_images"] == 3
    assert len(list((out / "count_examples").glob("*.png"))) == 3
    assert "counted 3 test images one object at a time" in proc.stdout and "count_examples" in proc.stdout
    c = res["count_eval"]
    assert c["settings"]["tta_shift"] == 4  # test-time shifts: 9 forward passes per step
    assert c["forward_passes"] == 9 * (round(c["pred_count_mean"] * 3) + sum(
        n for reason, n in c["stop_reasons"].items() if reason != "max_steps"))
    assert c["match_radius_px_mean"] == 8.0  # utils.mark_radius of a 224-px image
    assert c["images_with_object_size"] == 3 and 0 <= c["f1_object_radius"] <= 1  # synthetic shapes have sizes
    assert c["f1_object_radius"] >= c["f1"]  # objects' radii (12-24 px) are wider than the 8-px mark radius
    if c["pred_count_mean"] > 0:  # the median distance from a counted point to its nearest object, said in words
        assert c["point_to_nearest_object_px_median"] >= 0 and "px from the nearest object" in proc.stdout
    assert "within the 8-px mark radius" in proc.stdout and "within the object's own radius" in proc.stdout
    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n")
    bad = run_train(tmp_path / "bad", "--config", str(cfg), check=False)
    assert bad.returncode == 2 and "unknown setting(s) learning_rate" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()

