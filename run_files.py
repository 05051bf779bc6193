"""
What a training run keeps in its output folder, and how it is written and read back:

    config.json           the arguments and what was derived from them (written at every start)
    metrics.jsonl         one row per train log line and per epoch (cut back to the checkpoint on resume)
    results.json          status (completed / preempted / failed, with the error) and the best validation loss
    checkpoints/          step-N/ folders (adapter, heads, optimizer, scheduler, RNG, state.json), `last` and `best`
    wandb/, wandb_run_id  the W&B run, one across resumes of the same folder

    .lock                 held (fcntl) by the training writing the folder: a second one fails at once

Written by train_vlm_regression.py; read by evaluation (checkpoints, config.json) and the sweep tools.
One rule for the folder (Hugging Face's overwrite_output_dir): a folder holding a run is refused unless --resume
(continue it) or --overwrite (clear it first); nothing in it is written before the arguments, the data and the
checkpoint to resume have been checked.
"""

import errno
import glob
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import zipfile

import torch
from tqdm import tqdm

import model_vlm_regression as mvr
import utils

RUN_FILES = ("config.json", "results.json", "metrics.jsonl", "checkpoints")  # any of them: the folder holds a run
CLEARED_BY_OVERWRITE = RUN_FILES + ("wandb", "wandb_run_id", "eval")  # the run's own entries; nothing else is touched
LOCK_FILE = ".lock"
CHECKPOINT_FILES = ("state.json", "training_state.pt", "heads.safetensors", "regression_config.json",
                    os.path.join("adapter", "adapter_config.json"), os.path.join("adapter", "adapter_model.safetensors"))
# regression_config.json key -> training argument: what a resumed run must share with its checkpoint
RESUME_KEYS = {"base_model": "model_name", "lora_r": "lora_r", "lora_alpha": "lora_alpha", "mlp_layers": "mlp_layers",
               "head_hidden_dim": "head_hidden_dim", "stop_rule": "stop_rule", "mark_style": "mark_style",
               "ordering": "ordering", "min_pixels": "min_pixels", "max_pixels": "max_pixels",
               "load_in_4bit": "load_in_4bit", "train_vision": "train_vision",
               "coord_loss": "coord_loss", "attention_loss": "attention_loss"}


class RunError(Exception):
    """A start that must not go ahead (the folder, its lock or the checkpoint does not fit the request); one line."""

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
            "step": state["step"], "epochs_planned": state.get("planned_epochs"), "trainable_params": trainable,
            "baseline_val_loss": state["baseline_val_loss"],
            "wall_time_s": time.time() - t_start}


def write_results(run_dir, res):
    utils.write_json_atomic(os.path.join(run_dir, "results.json"), res)


# -----------------------------------------------------------------------------
# state.json and resuming


def new_state():
    """What a checkpoint saves as state.json, and a run resumes from."""
    return {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_val_loss": None, "best_epoch": None,
            "baseline_val_loss": None, "history": [], "epoch_sums": None, "planned_epochs": None}


def checkpoint_problem(ckpt_dir):
    """None when the checkpoint folder is complete and its files readable, else what is wrong, in a few words. Cheap:
    JSON parsed, zip directory (torch.save's format: a cut file has none) and safetensors headers read."""
    from safetensors import safe_open

    for name in CHECKPOINT_FILES:
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            return f"{name} missing"
        try:
            if name.endswith(".json"):
                with open(path) as f:
                    json.load(f)
            elif name.endswith(".pt"):
                zipfile.ZipFile(path).close()
            else:
                with safe_open(path, "pt") as f:
                    for key in f.keys():  # reading each tensor's slice checks it lies inside the file
                        f.get_slice(key)
        except Exception as e:  # noqa: BLE001 - any failure to read means the checkpoint is not usable
            return f"{name} unreadable ({type(e).__name__})"
    return None


def step_dirs(ckpt_root):
    """The step-N checkpoint folders, newest first."""
    return sorted(glob.glob(os.path.join(ckpt_root, "step-*")), reverse=True)


def find_resume_dir(args, log):
    """The checkpoint to resume (None: start from scratch). --resume DIR must be intact; --resume alone takes the
    output folder's checkpoints/last, or, when that is cut short or missing, the newest intact step-N (saying so)."""
    if not args.resume:
        return None
    if args.resume != "auto":
        if not os.path.isdir(args.resume):
            raise RunError(f"--resume {args.resume}: no such checkpoint folder")
        problem = checkpoint_problem(args.resume)
        if problem:
            raise RunError(f"--resume {args.resume}: not a complete checkpoint ({problem})")
        return args.resume
    ckpt_root = os.path.join(args.output_dir, "checkpoints")
    last = os.path.join(ckpt_root, "last")
    problem = checkpoint_problem(last) if os.path.lexists(last) else "no checkpoints/last"
    if not problem:
        return last
    for candidate in step_dirs(ckpt_root):
        if not checkpoint_problem(candidate):
            log(f"warning: {last} is not usable ({problem}); resuming from {candidate}, the newest intact checkpoint")
            return candidate
    if os.path.lexists(last) or step_dirs(ckpt_root):
        raise RunError(f"{ckpt_root}: no intact checkpoint to resume ({problem}); --overwrite starts the run again")
    log(f"no checkpoint at {last}; starting from scratch")
    return None


def check_resume_compatible(args, ckpt_dir):
    """Raise RunError listing every model setting (RESUME_KEYS, and LoRA's target modules) in which the arguments
    differ from the checkpoint's regression_config.json; keys an older checkpoint did not record are not compared."""
    with open(os.path.join(ckpt_dir, "regression_config.json")) as f:
        saved = json.load(f)
    for old, new in mvr.RENAMED_CONFIG_KEYS.items():
        saved.setdefault(new, saved.get(old))
    saved.setdefault("stop_rule", "coordinate")  # saved before the stop head
    with open(os.path.join(ckpt_dir, "adapter", "adapter_config.json")) as f:
        saved["lora_targets"] = json.load(f).get("target_modules")
    wanted = {key: getattr(args, arg) for key, arg in RESUME_KEYS.items()}
    wanted["lora_targets"] = mvr.LORA_TARGETS
    same_path = lambda a, b: os.path.exists(str(a)) and os.path.exists(str(b)) and os.path.samefile(a, b)  # noqa: E731
    diff = [f"{key} {saved[key]!r} vs {value!r}" for key, value in wanted.items()
            if saved.get(key) is not None and saved[key] != value and not same_path(saved[key], value)]
    if diff:
        raise RunError(f"--resume {ckpt_dir}: the checkpoint was trained with other model settings (checkpoint vs "
                       f"now): {'; '.join(diff)}")


# -----------------------------------------------------------------------------
# The output folder: the rule, the lock, --overwrite, stale temp files


def run_entries(run_dir):
    """The run files the folder holds (empty for a new or foreign folder)."""
    return [n for n in RUN_FILES if os.path.lexists(os.path.join(run_dir, n))]


def check_output_dir(args):
    """Read-only: a folder holding a run needs --resume (continue it) or --overwrite (replace it)."""
    found = run_entries(args.output_dir) if os.path.isdir(args.output_dir) else []
    if found and not (args.resume or args.overwrite):
        raise RunError(f"{args.output_dir} already holds a run ({', '.join(found)}); add --resume to continue it or "
                       f"--overwrite to replace it")


_LOCKS = []  # the open lock files: closing one (or the process ending, even by SIGKILL) releases it


def lock_output_dir(run_dir):
    """Take OUTPUT_DIR/.lock for the rest of the process, or raise RunError naming the process that holds it.
    fcntl (POSIX) locks, which NFS and Lustre mounted with locking support honour across nodes."""
    import fcntl

    if any(f.name == os.path.join(run_dir, LOCK_FILE) for f in _LOCKS):
        return
    os.makedirs(run_dir, exist_ok=True)
    f = open(os.path.join(run_dir, LOCK_FILE), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"{run_dir} is in use by another training ({holder}); wait for it to end or choose another "
                       f"--output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _LOCKS.append(f)


def claim_output_dir(args, log):
    """Rank 0, once every check has passed: the lock, --overwrite's clearing of the previous run, and the temp files
    an interrupted write left (a .tmp-* checkpoint folder, a half-swapped link, a .tmp-* file)."""
    lock_output_dir(args.output_dir)
    check_output_dir(args)  # again under the lock: another training may have started here meanwhile
    if args.overwrite and run_entries(args.output_dir):
        log(f"--overwrite: clearing the previous run in {args.output_dir}")
        for name in CLEARED_BY_OVERWRITE:
            path = os.path.join(args.output_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    ckpt_root = os.path.join(args.output_dir, "checkpoints")
    stale = glob.glob(os.path.join(args.output_dir, ".tmp-*")) + glob.glob(os.path.join(ckpt_root, ".tmp-*")) + \
        glob.glob(os.path.join(ckpt_root, ".*.tmp"))
    for path in stale:
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    if stale:
        log(f"removed {len(stale)} temp file(s) an interrupted write left in {args.output_dir}")


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


def rng_state():
    """This process's RNG state (CPU, and the CUDA devices'), as a checkpoint keeps it for each rank."""
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(run_dir, model, processor, optimizer, scheduler, state, best=False, rank_rng=None):
    """checkpoints/step-N, then `last` (and `best`) pointed at it. rank_rng: every rank's rng_state(), in rank order
    (default: this process's). A folder of the same step left by an abandoned branch (a resume from an older
    checkpoint) is replaced, never reused. A failed write (disk full) removes its temp folder and raises OSError."""
    ckpt_root = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpt_root, exist_ok=True)
    name = f"step-{state['step']:07d}"
    final = os.path.join(ckpt_root, name)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=ckpt_root)
    try:
        model.save_pretrained(tmp, processor)
        rank_rng = rank_rng or [rng_state()]
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **rank_rng[0],
                    "rank_rng": rank_rng}, os.path.join(tmp, "training_state.pt"))
        utils.write_json_atomic(os.path.join(tmp, "state.json"), state)
        if os.path.isdir(final):
            old = tempfile.mkdtemp(prefix=".tmp-old-", dir=ckpt_root)
            os.replace(final, os.path.join(old, name))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except Exception as e:  # torch.save and safetensors report a failed write (disk full) as their own errors
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise
        first = (str(e).splitlines() or [""])[0][:200]
        raise OSError(errno.EIO, f"checkpoint not written ({type(e).__name__}: {first})", ckpt_root) from e
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


def load_training_state(ckpt_dir, optimizer, scheduler, rank=0, world=1):
    """Optimizer, scheduler and this rank's RNG state; returns state.json (with this rank's epoch sums). A checkpoint saved by another number of
    processes (or before per-rank states were kept) gives every rank rank 0's RNG state."""
    blob = torch.load(os.path.join(ckpt_dir, "training_state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    per_rank = blob.get("rank_rng") or []
    rng = per_rank[rank] if len(per_rank) == world else blob
    torch.set_rng_state(rng["torch_rng"])
    if rng["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        state = json.load(f)
    if len(per_rank) == world and "epoch_sums" in rng:  # the losses summed by this rank (state.json holds rank 0's)
        state["epoch_sums"] = rng["epoch_sums"]
    return state


def load_trained_weights(model, ckpt_dir):
    """Copy a checkpoint's adapter, token rows and heads into the freshly built model (same architecture)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model.vlm, load_file(os.path.join(ckpt_dir, "adapter", "adapter_model.safetensors")))
    model.load_heads(ckpt_dir)
