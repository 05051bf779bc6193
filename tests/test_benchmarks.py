"""benchmarks/gpu_check.sh in its CPU mode (tiny model, one step per part): every part runs and the one JSON file
holds the figures the GPU run reports."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_cpu_mode_writes_every_part(tmp_path):
    out = tmp_path / "sub" / "gpu_check.json"
    env = dict(os.environ, GPU_CHECK_CPU="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"seconds", "torch", "transformers", "peft", "device"} <= set(result)
    for name in ("lora_bf16", "lora_bf16_gradient_checkpointing"):
        part = result[name]
        assert "error" not in part, part
        assert part["samples_per_s"] > 0 and part["batch_size"] == 2 and "peak_gpu_mem_gib" in part
    assert result["lora_bf16_gradient_checkpointing"]["gradient_checkpointing"] is True
    assert result["lora_bf16"]["gradient_checkpointing"] is False
    qlora = result["qlora_nf4"]  # bitsandbytes is installed here: then QLoRA is measured too
    assert ("samples_per_s" in qlora and qlora["load_in_4bit"] is True) or qlora == {
        "unavailable": "bitsandbytes not installed"}, qlora
    count = result["counting_forwards"]
    assert "error" not in count, count
    assert count["forwards_per_s"] > 0 and count["batch_size"] == 2 and count["tokens_per_sample"] > 0


def test_gpu_check_records_parts_out_of_budget(tmp_path):
    """A part left without time is an error record in the file, not a crash of the whole check."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, GPU_CHECK_CPU="1", PYTHON=sys.executable, GPU_CHECK_BUDGET_S="0")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["lora_bf16"] == {"error": "not run: the 0 s budget was spent"}
    assert "error" in result["counting_forwards"]


def test_demo_seeds_reports_each_seed_and_reuses_a_finished_run(tmp_path):
    """benchmarks/demo_seeds.py runs the demo config per seed (extra flags passed through) and reports the count
    against the bars; a second call finds the completed run and does not train it again; an unfinished one is
    resumed."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "demo_seeds.py"), "--seeds", "3", "--out_root", str(tmp_path),
           "--json", "--model_name", "tiny-random", "--epochs", "1", "--train_batches", "2", "--val_batches", "1",
           "--eval_count_images", "3", "--synthetic_num_test", "4", "--wandb_mode", "disabled", "--num_workers", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = json.loads(first.stdout)["rows"]
    assert len(rows) == 1 and rows[0]["seed"] == 3 and rows[0]["count_images"] == 3 and rows[0]["wall_s"] > 0
    assert rows[0]["epochs"] == 1 and rows[0]["steps"] == 2  # --epochs 1 caps the demo's --max_minutes plan
    assert rows[0]["mae"] >= 0 and rows[0]["baseline_mae"] > 0 and rows[0]["match_radius_px"] == 8.0
    assert json.loads((tmp_path / "seed-3" / "config.json").read_text())["seed"] == 3
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(again.stdout)["rows"][0]["wall_s"] is None
    # a seed whose folder holds a failed run (no checkpoint) is run again, not refused
    (tmp_path / "seed-4").mkdir()
    (tmp_path / "seed-4" / "results.json").write_text(json.dumps({"status": "failed", "error": "killed"}))
    cmd[cmd.index("--seeds") + 1] = "4"
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads(third.stdout)["rows"][0]["wall_s"] > 0
    assert json.loads((tmp_path / "seed-4" / "results.json").read_text())["status"] == "completed"
