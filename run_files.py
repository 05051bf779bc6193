"""
What a training run keeps in its output folder, and how it is written and read back:

    config.json           the arguments and what was derived from them (written at every start)
    metrics.jsonl         one row per train log line and per epoch (cut back to the checkpoint on resume)
    results.json          status (completed / preempted / failed, with the error) and the best validation loss
    checkpoints/          step-N/ folders (adapter, heads, optimizer, scheduler, RNG, state.json), `last` and `best`
    wandb/, wandb_run_id  the W&B run, one across resumes of the same folder

Written by train_vlm_regression.py; read by evaluation (checkpoints, config.json) and the sweep tools.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import torch
from tqdm import tqdm

import utils

# -----------------------------------------------------------------------------
# config.json, metrics.jsonl, results.json


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_config(run_dir, config):
    utils.write_json_atomic(os.path.join(run_dir, "config.json"), config)


def trim_metrics(run_dir, resume_dir, step):
    """Drop the metrics.jsonl lines logged after the checkpoint we resume from (all of them when not resuming)."""
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            lines = [l for l in f if resume_dir and l.strip() and json.loads(l)["step"] <= step]
        utils.write_text_atomic(metrics_path, "".join(lines))


def append_metrics(run_dir, row):
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def results(state, status, trainable, t_start):
    hist = state["history"]
    return {"status": status, "best_val_loss": state["best_val_loss"], "best_epoch": state["best_epoch"],
            "final_val_loss": hist[-1]["val/loss"] if hist else None, "epochs_completed": state["epoch"],
            "step": state["step"], "trainable_params": trainable, "baseline_val_loss": state["baseline_val_loss"],
            "wall_time_s": time.time() - t_start}


def write_results(run_dir, res):
    utils.write_json_atomic(os.path.join(run_dir, "results.json"), res)


# -----------------------------------------------------------------------------
# state.json and resuming


def new_state():
    """What a checkpoint saves as state.json, and a run resumes from."""
    return {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_val_loss": None, "best_epoch": None,
            "baseline_val_loss": None, "history": [], "epoch_sums": None}


def find_resume_dir(args, log):
    """The checkpoint --resume names (alone: the output folder's checkpoints/last), or None: start from scratch."""
    if not args.resume:
        return None
    resume_dir = os.path.join(args.output_dir, "checkpoints", "last") if args.resume == "auto" else args.resume
    if os.path.isdir(resume_dir):
        return resume_dir
    if args.resume != "auto":
        sys.exit(f"error: --resume {resume_dir}: no such checkpoint folder")
    log(f"no checkpoint at {resume_dir}; starting from scratch")
    return None


# -----------------------------------------------------------------------------
# W&B


def wandb_mode(requested):
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        import netrc

        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def init_wandb(args, config, run_dir):
    import wandb

    mode = wandb_mode(args.wandb_mode)
    if mode == "disabled":
        return None
    run_id_path = os.path.join(run_dir, "wandb_run_id")  # one W&B run across resumes of the same output dir
    run_id = open(run_id_path).read().strip() if os.path.exists(run_id_path) else uuid.uuid4().hex[:8]
    with open(run_id_path, "w") as f:
        f.write(run_id)
    run = wandb.init(project=args.wandb_project, name=args.run_name, id=run_id, resume="allow", mode=mode,
                     dir=run_dir, config=config)
    if mode == "offline":
        tqdm.write(f"W&B offline: upload later with `wandb sync {os.path.join(run_dir, 'wandb', 'offline-run-*')}`")
    return run


# -----------------------------------------------------------------------------
# Checkpoints: checkpoints/step-N/ written to a temp dir then renamed; `last` and `best` are symlinks swapped
# atomically with os.replace, so a job killed at any instant leaves the previous checkpoint intact.


def save_checkpoint(run_dir, model, processor, optimizer, scheduler, state, best=False):
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step-{state['step']:07d}"
    final = os.path.join(ckpt_root, name)
    if not os.path.isdir(final):
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=ckpt_root)
        model.save_pretrained(tmp, processor)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   os.path.join(tmp, "training_state.pt"))
        utils.write_json_atomic(os.path.join(tmp, "state.json"), state)
        os.replace(tmp, final)
    for link in ["last"] + (["best"] if best else []):
        tmp_link = os.path.join(ckpt_root, f".{link}.tmp")
        if os.path.lexists(tmp_link):
            os.remove(tmp_link)
        os.symlink(name, tmp_link)
        os.replace(tmp_link, os.path.join(ckpt_root, link))
    keep = {os.path.basename(os.path.realpath(os.path.join(ckpt_root, n))) for n in ("last", "best")}
    for entry in os.listdir(ckpt_root):
        if entry.startswith("step-") and entry not in keep:
            shutil.rmtree(os.path.join(ckpt_root, entry), ignore_errors=True)


def load_training_state(ckpt_dir, optimizer, scheduler):
    blob = torch.load(os.path.join(ckpt_dir, "training_state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        return json.load(f)


def load_trained_weights(model, ckpt_dir):
    """Copy a checkpoint's adapter, token rows and heads into the freshly built model (same architecture)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model.vlm, load_file(os.path.join(ckpt_dir, "adapter", "adapter_model.safetensors")))
    model.load_heads(ckpt_dir)
