"""
Train Qwen3-VL (LoRA + <x>/<y> regression heads) to point at the next uncounted object.

The embedded demo (tiny random-init Qwen3-VL, synthetic data, about 8 minutes on 2 CPU cores):
    python train_vlm_regression.py --model_name tiny --dataset synthetic --output_dir runs/demo --epochs 30 \
        --train_iters 200 --val_iters 25 --batch_size 4 --lr 1e-3 --mlp_lr_multiplier 1 --max_grad_norm 0 \
        --eval_count_images 50

Real data on one GPU (the seed's commands):
    python train_vlm_regression.py --dataset fsc147 --data_root /media/M2SSD/FSC147 --batch_size 4 --epochs 10 --lr 1e-3
    python train_vlm_regression.py --dataset omnicount --data_root /path/to/OmniCount-191 --categories Supermarket \
        --batch_size 4 --epochs 10 --lr 1e-3

Several GPUs / nodes (data parallel; each rank trains on its own slice of every global batch):
    accelerate launch --num_processes 4 train_vlm_regression.py ...
    torchrun --nproc_per_node 4 train_vlm_regression.py ...

Resume (also what a requeued SLURM job does): add --resume (the output dir's last checkpoint) or --resume DIR.
SIGTERM / SIGUSR1 save a checkpoint at the next optimizer step and exit with code 75 so the job can be requeued.
"""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import torch
from tqdm import tqdm

import dataset as data
import model_vlm_regression as mvr
import utils

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved, resume me
DEFAULT_SPLITS = {"synthetic": ("train", "val"), "fsc147": ("train", "val"), "omnicount": ("train", "valid")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_args(p)
    p.add_argument("--train_split", default=None, help="default: train")
    p.add_argument("--val_split", default=None, help="default: val (omnicount: valid)")
    g = p.add_argument_group("model")
    g.add_argument("--model_name", default=mvr.DEFAULT_MODEL, help="hub id, local folder, or `tiny`")
    g.add_argument("--lora_r", type=int, default=16)
    g.add_argument("--lora_alpha", type=int, default=32)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--mlp_layers", type=int, default=3, choices=[2, 3, 4], help="Linear+GELU blocks per head")
    g.add_argument("--head_dim", type=int, default=512, help="hidden width of the heads")
    g.add_argument("--load_in_4bit", action="store_true", help="QLoRA: NF4 language model (CUDA or CPU)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=4, help="per device")
    g.add_argument("--grad_accum", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--train_iters", type=int, default=200, help="batches per epoch (per device); 0 = whole split")
    g.add_argument("--val_iters", type=int, default=50, help="validation batches per device (a fixed, seeded subset); 0 = whole split")
    g.add_argument("--lr", type=float, default=1e-3, help="LoRA and <x>/<y> token rows")
    g.add_argument("--mlp_lr_multiplier", type=float, default=5.0, help="heads train at lr x this")
    g.add_argument("--mlp_lr", type=float, default=None, help="heads' lr (overrides the multiplier)")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warmup, then cosine decay to 0")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm; 0 = off")
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="default: runs/<run_name>")
    g.add_argument("--run_name", default=None, help="default: <dataset>-<model>-<time>")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint folder; alone: OUTPUT_DIR/checkpoints/last")
    g.add_argument("--checkpoint_every", type=int, default=0,
                   help="also save checkpoints/last every N optimizer steps (long epochs on preemptible nodes)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader worker processes (default: 4 with CUDA, 0 on CPU, where workers would compete "
                        "with the training step for the same cores)")
    g.add_argument("--num_val_images", type=int, default=16, help="validation images logged to W&B per epoch")
    g.add_argument("--log_every", type=int, default=10, help="optimizer steps between train log lines")
    g.add_argument("--eval_count_images", type=int, default=0,
                   help="at the end, count objects step by step on N validation images (results.json)")
    g.add_argument("--wandb_project", default="vlm-sequential-counting")
    g.add_argument("--wandb_mode", default=None, choices=["online", "offline", "disabled"],
                   help="default: online when a W&B key is configured, else offline")
    args = p.parse_args(argv)
    if args.num_workers is None:
        args.num_workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if torch.cuda.is_available() else 0
    default_train, default_val = DEFAULT_SPLITS[args.dataset]
    args.train_split = args.train_split or default_train
    args.val_split = args.val_split or default_val
    if args.dataset != "synthetic" and not args.data_root:
        p.error(f"--data_root is required for --dataset {args.dataset}")
    if args.run_name is None:
        model = os.path.basename(args.model_name.rstrip("/"))
        args.run_name = f"{args.dataset}-{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    args.output_dir = args.output_dir or os.path.join("runs", args.run_name)
    return args


# -----------------------------------------------------------------------------
# Small pieces: atomic files, the schedule, the gradient-flow check


def lr_lambda(warmup_steps, total_steps):
    def f(step):  # step = optimizer steps already taken
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def build_optimizer(model, lr, mlp_lr, weight_decay):
    """AdamW with two groups: the VLM side (LoRA, <x>/<y> rows) at lr, the freshly initialised heads at mlp_lr."""
    groups = model.trainable_groups()
    heads = groups.get("x_head", []) + groups.get("y_head", [])
    vlm = [p for g, ps in groups.items() if g not in ("x_head", "y_head") for p in ps]
    return torch.optim.AdamW([{"params": vlm, "lr": lr, "weight_decay": weight_decay, "name": "vlm"},
                              {"params": heads, "lr": mlp_lr, "weight_decay": weight_decay, "name": "heads"}])


def gradient_flow(model):
    """Gradient norm of each trainable group; raises if a group that training must update got no gradient."""
    norms = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = mvr.param_group(name)
            norms[group] = norms.get(group, 0.0) + (0.0 if p.grad is None else p.grad.detach().float().pow(2).sum().item())
    norms = {k: math.sqrt(v) for k, v in norms.items()}
    dead = [g for g in mvr.GROUPS if not norms.get(g)]
    if dead:
        raise RuntimeError(f"gradient-flow check failed: {', '.join(dead)} received no gradient on the first step "
                           f"(frozen by mistake, or detached from the loss); norms: {norms}")
    return norms


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


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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


# -----------------------------------------------------------------------------
# Data order: a permutation per epoch from (seed, epoch); global batch b is the slice [b*B*W, (b+1)*B*W) and rank r
# takes its r-th B. Same order whatever the world size, and a resumed run restarts at exactly the batch it stopped.


def epoch_indices(n, seed, epoch, num_batches, batch_size, world, rank, start_batch=0):
    g = np.random.default_rng([seed, 1000003, epoch])
    per_epoch = num_batches * batch_size * world
    order = np.concatenate([g.permutation(n) for _ in range(-(-per_epoch // n))])[:per_epoch]
    batches = order.reshape(num_batches, world, batch_size)[start_batch:, rank]
    return batches.reshape(-1).tolist()


def make_loader(ds, indices, batch_size, collate, num_workers, seed):
    # A private generator: creating the loader must not consume the global RNG (dropout), or resume would diverge.
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, indices), batch_size=batch_size, shuffle=False, collate_fn=collate,
        num_workers=num_workers, persistent_workers=False, generator=torch.Generator().manual_seed(seed),
        multiprocessing_context="fork" if num_workers and sys.platform == "linux" else None)


def mean_over_ranks(accelerator, values):
    """Each rank saw its own slice of the global batch: report the mean over ranks (one all-reduce)."""
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, "mean").tolist()


def any_rank(accelerator, *flags):
    """Each flag OR-ed over the ranks in one all-reduce, so every rank takes the same decision (a rank that stopped
    alone would leave the others waiting forever in the next collective)."""
    if accelerator.num_processes == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=accelerator.device)
    return [v > 0 for v in accelerator.reduce(t, "max").tolist()]


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def image_sizes(batch):
    """(W, H) in pixels of each image as the model saw it: the grid is in 16-px patches."""
    thw = batch["image_grid_thw"].float()
    return torch.stack([thw[:, 2], thw[:, 1]], dim=1) * 16


@torch.no_grad()
def validate(model, loader, accelerator):
    """Loss (total, x, y) and mean pixel error over the whole validation set (gathered across ranks)."""
    model.eval()
    preds, targets, sizes = [], [], []
    for batch in loader:
        batch = to_device(batch, accelerator.device)
        preds.append(model(**batch).float())
        targets.append(batch["targets"])
        sizes.append(image_sizes(batch))
    model.train()
    pred, target, size = (accelerator.gather(torch.cat(t)) for t in (preds, targets, sizes))
    loss, loss_x, loss_y = mvr.regression_loss(pred, target)
    pixel_error = ((pred - target) / 2 * size).norm(dim=1).mean()
    return {"val/loss": loss.item(), "val/loss_x": loss_x.item(), "val/loss_y": loss_y.item(),
            "val/pixel_error": pixel_error.item(), "val/saturation": (pred.abs() > 0.99).float().mean().item()}, pred


def val_images(model, val_ds, processor, collate, indices, device, ordering):
    """(input as marked | prediction and ground truth) images and their full prompts, for W&B."""
    model.eval()
    samples = [val_ds[i] for i in indices]
    with torch.no_grad():
        pred = model(**to_device(collate(samples), device)).float().cpu().numpy()
    model.train()
    out = []
    for s, p in zip(samples, pred):
        w, h = s.image.size
        drawn = utils.draw_prediction(s.image, utils.denormalize_points(p[None], w, h)[0],
                                      None if s.done else utils.denormalize_points(s.target[None], w, h)[0])
        out.append((utils.side_by_side(s.image, drawn), mvr.render_prompt(processor, s.object_type, s.num_marked,
                                                                           ordering)))
    return out


class Preemption:
    """SIGTERM/SIGUSR1 set a flag; the loop saves a checkpoint at the next optimizer step and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


# -----------------------------------------------------------------------------


def main(args):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t_start = time.time()
    # cpu=True is what makes accelerate use gloo for a multi-process CPU run (torchrun without GPUs)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    log = (lambda *a: tqdm.write(" ".join(str(x) for x in a))) if is_main else (lambda *a: None)
    set_seed(args.seed)
    run_dir = args.output_dir
    os.makedirs(run_dir, exist_ok=True)
    preempt = Preemption()

    resume_dir = None
    if args.resume:
        resume_dir = os.path.join(run_dir, "checkpoints", "last") if args.resume == "auto" else args.resume
        if not os.path.isdir(resume_dir):
            if args.resume != "auto":
                sys.exit(f"error: --resume {resume_dir}: no such checkpoint folder")
            log(f"no checkpoint at {resume_dir}; starting from scratch")
            resume_dir = None

    # ---- data
    try:
        train_records, train_skipped = data.records_from_args(args, args.train_split)
        val_records, val_skipped = data.records_from_args(args, args.val_split)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    dkw = dict(ordering=args.ordering, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
               done_fraction=args.done_fraction)
    train_ds = data.CountingDataset(train_records, seed=args.seed, **dkw)
    val_ds = data.CountingDataset(val_records, seed=args.seed + 1, **dkw)  # fixed: never set_epoch
    train_iters = args.train_iters or len(train_ds) // (args.batch_size * world)
    train_iters = max(1, math.ceil(train_iters / args.grad_accum)) * args.grad_accum  # epochs end on a full step
    # the validation set is val_iters global batches (per-device batch x world), so it is the same set of samples
    # whatever the number of processes for a given global batch
    val_order = np.random.default_rng([args.seed, 7]).permutation(len(val_ds))
    if args.val_iters:
        val_order = val_order[: args.val_iters * args.batch_size * world]
    val_order = val_order[: max(world, len(val_order) // world * world)]  # equal shards, so ranks can gather
    val_shard = val_order[rank::world].tolist()

    # ---- model and optimizer
    model, processor = mvr.build_model(
        args.model_name, args.lora_r, args.lora_alpha, args.lora_dropout, args.mlp_layers, args.head_dim,
        device=accelerator.device, load_in_4bit=args.load_in_4bit,
        gradient_checkpointing=args.gradient_checkpointing, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    model.config["ordering"] = args.ordering
    collate = data.make_collate_fn(processor, args.ordering)
    mlp_lr = args.mlp_lr if args.mlp_lr is not None else args.lr * args.mlp_lr_multiplier
    optimizer = build_optimizer(model, args.lr, mlp_lr, args.weight_decay)
    steps_per_epoch = math.ceil(train_iters / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, total_steps))
    trainable = sum(p.numel() for ps in model.trainable_groups().values() for p in ps)

    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best_val_loss": None, "best_epoch": None,
             "baseline_val_loss": None, "history": [], "epoch_sums": None}
    if resume_dir:
        load_trained_weights(model, resume_dir)
        state = load_training_state(resume_dir, optimizer, scheduler)
        log(f"resumed from {os.path.realpath(resume_dir)}: epoch {state['epoch']}, batch {state['batch_in_epoch']}, "
            f"step {state['step']}")
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    if is_main:
        config = dict(vars(args), world_size=world, effective_batch_size=args.batch_size * world * args.grad_accum,
                      train_iters_effective=train_iters, mlp_lr_effective=mlp_lr, trainable_params=trainable,
                      num_train_records=len(train_ds), num_val_samples=len(val_order),
                      skipped={"train": train_skipped, "val": val_skipped}, versions=mvr.library_versions(),
                      git_commit=git_commit(), command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
        utils.write_json_atomic(os.path.join(run_dir, "config.json"), config)
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(metrics_path):  # drop lines logged after the checkpoint we resume from (or all, if none)
            with open(metrics_path) as f:
                lines = [l for l in f if resume_dir and l.strip() and json.loads(l)["step"] <= state["step"]]
            utils.write_text_atomic(metrics_path, "".join(lines))
    run = init_wandb(args, config if is_main else None, run_dir) if is_main else None

    def log_metrics(row):
        if not is_main:
            return
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if run is not None:
            run.log({k: v for k, v in row.items() if k not in ("epoch_end",)}, step=row["step"])

    def checkpoint(best=False):
        accelerator.wait_for_everyone()
        if is_main:
            save_checkpoint(run_dir, raw_model, processor, optimizer, scheduler, state, best)

    if state["baseline_val_loss"] is None:  # predict the mean training target, scored on the same val samples
        ids = np.random.default_rng([args.seed, 11]).permutation(len(train_ds))[:512]
        mean_target = torch.tensor(np.mean([train_ds[int(i)].target for i in ids], 0))
        val_targets = torch.tensor(np.stack([val_ds[int(i)].target for i in val_order]))
        state["baseline_val_loss"] = mvr.regression_loss(mean_target.expand_as(val_targets), val_targets)[0].item()
    log(f"run {args.run_name}: {len(train_ds)} train records, {len(val_order)} val samples, {trainable:,} trainable "
        f"params, world {world}, {train_iters} batches/epoch, baseline val loss {state['baseline_val_loss']:.4f}")

    # ---- train
    model.train()
    checked_flow = state["step"] > 0
    window = {"loss": 0.0, "loss_x": 0.0, "loss_y": 0.0, "sat": 0.0, "n": 0, "samples": 0, "t": time.time(),
              "data_t": 0.0}
    val_loader = make_loader(val_ds, val_shard, args.batch_size, collate, args.num_workers, args.seed)
    for epoch in range(state["epoch"], args.epochs):
        train_ds.set_epoch(epoch)
        start = state["batch_in_epoch"]
        indices = epoch_indices(len(train_ds), args.seed, epoch, train_iters, args.batch_size, world, rank, start)
        loader = make_loader(train_ds, indices, args.batch_size, collate, args.num_workers, args.seed + epoch)
        bar = tqdm(total=train_iters, initial=start, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main,
                   dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30, file=sys.stderr)
        # running train-loss sums of this epoch live in `state`, so a mid-epoch resume reports the same epoch mean
        epoch_sums = state["epoch_sums"] = state["epoch_sums"] or {"loss": 0.0, "loss_x": 0.0, "loss_y": 0.0, "n": 0}
        t_data = time.time()
        for b, batch in enumerate(loader, start=start):
            batch = to_device(batch, accelerator.device)
            window["data_t"] += time.time() - t_data
            with accelerator.accumulate(model):
                pred = model(**batch)
                loss, loss_x, loss_y = mvr.regression_loss(pred.float(), batch["targets"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if not checked_flow:
                        norms = gradient_flow(raw_model)
                        log("gradient flow on the first step (norm per group): " +
                            ", ".join(f"{k} {v:.3e}" for k, v in norms.items()))
                        checked_flow = True
                    grad_norm = accelerator.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]],
                        args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            # One host sync per batch, after the step has been queued (no stall between forward and backward). A
            # non-finite loss stops the run here; the weights it touched are never saved, so checkpoints/last is good.
            vals = torch.stack([loss.detach(), loss_x.detach(), loss_y.detach(),
                                (pred.detach().abs() > 0.99).float().mean()]).tolist()
            # the preemption signal is agreed here too: one all-reduce per batch for both decisions
            nonfinite, stop = any_rank(accelerator, not math.isfinite(vals[0]), preempt.signal is not None)
            if nonfinite:
                fail(run_dir, state, is_main, t_start,
                     f"non-finite loss ({vals[0]}) at epoch {epoch + 1}, batch {b + 1}, optimizer step "
                     f"{state['step'] + 1}; the last good checkpoint (checkpoints/last) is kept")
            for k, v in zip(("loss", "loss_x", "loss_y"), vals):
                window[k] += v
                epoch_sums[k] += v
            epoch_sums["n"] += 1
            window["sat"] += vals[3]
            window["n"] += 1
            window["samples"] += pred.shape[0] * world
            bar.update(1)
            state["batch_in_epoch"] = b + 1
            if accelerator.sync_gradients:
                state["step"] += 1
                if state["step"] % args.log_every == 0 or b + 1 == train_iters:
                    dt = time.time() - window["t"]
                    means = mean_over_ranks(accelerator, [window[k] / window["n"] for k in ("loss", "loss_x", "loss_y",
                                                                                          "sat")])
                    row = {"epoch": epoch + 1, "step": state["step"], "train/loss": means[0],
                           "train/loss_x": means[1], "train/loss_y": means[2],
                           "train/saturation": means[3], "train/grad_norm": float(grad_norm),
                           "train/samples_per_s": window["samples"] / dt, "train/data_wait_share": window["data_t"] / dt,
                           "lr/vlm": scheduler.get_last_lr()[0], "lr/heads": scheduler.get_last_lr()[1]}
                    log_metrics(row)
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}", sps=f"{row['train/samples_per_s']:.1f}")
                    window.update(loss=0.0, loss_x=0.0, loss_y=0.0, sat=0.0, n=0, samples=0, t=time.time(), data_t=0.0)
                if stop:
                    checkpoint()
                    log(f"{preempt.signal or 'signal'}: checkpoint saved at step {state['step']}; exiting "
                        f"(code {EXIT_PREEMPTED}); continue with --resume")
                    if is_main:
                        utils.write_json_atomic(os.path.join(run_dir, "results.json"),
                                                results(state, "preempted", trainable, t_start))
                    sys.exit(EXIT_PREEMPTED)
                if args.checkpoint_every and state["step"] % args.checkpoint_every == 0 and b + 1 < train_iters:
                    checkpoint()
            t_data = time.time()
        bar.close()

        metrics, _ = validate(model, val_loader, accelerator)
        state["epoch"], state["batch_in_epoch"], state["epoch_sums"] = epoch + 1, 0, None
        improved = state["best_val_loss"] is None or metrics["val/loss"] < state["best_val_loss"]
        if improved:
            state["best_val_loss"], state["best_epoch"] = metrics["val/loss"], epoch + 1
        train_means = mean_over_ranks(accelerator, [epoch_sums[k] / max(1, epoch_sums["n"])
                                                    for k in ("loss", "loss_x", "loss_y")])
        row = {"epoch": epoch + 1, "step": state["step"], "epoch_end": True,
               **{f"train/{k}": v for k, v in zip(("loss", "loss_x", "loss_y"), train_means)},
               **metrics,
               "val/baseline_loss": state["baseline_val_loss"]}
        state["history"].append({k: row[k] for k in ("epoch", "step", "train/loss", "val/loss")})
        log_metrics(row)
        if run is not None and args.num_val_images:
            import wandb

            shown = val_images(raw_model, val_ds, processor, collate, val_order[: args.num_val_images].tolist(),
                               accelerator.device, args.ordering)
            run.log({"val/images": [wandb.Image(im, caption=cap) for im, cap in shown]}, step=state["step"])
        log(f"epoch {epoch + 1}/{args.epochs} step {state['step']}: train {row['train/loss']:.4f}  val "
            f"{metrics['val/loss']:.4f} (x {metrics['val/loss_x']:.4f}, y {metrics['val/loss_y']:.4f})  "
            f"pixel error {metrics['val/pixel_error']:.1f}  baseline {state['baseline_val_loss']:.4f}  "
            f"saturation {metrics['val/saturation']:.2f}{'  *best*' if improved else ''}")
        checkpoint(best=improved)

    # ---- done
    final = results(state, "completed", trainable, t_start)
    if args.eval_count_images and is_main:
        import evaluate_vlm_regression as ev

        mean_count = float(np.mean([len(r.points) for r in train_records]))
        final["count_eval"] = ev.count_records(
            raw_model, processor, val_records[: args.eval_count_images], ordering=args.ordering,
            min_pixels=args.min_pixels, max_pixels=args.max_pixels, batch_size=args.batch_size,
            train_mean_count=mean_count)["metrics"]
    if is_main:
        utils.write_json_atomic(os.path.join(run_dir, "results.json"), final)
        log(f"done: best val loss {final['best_val_loss']:.4f} at epoch {final['best_epoch']} (baseline "
            f"{final['baseline_val_loss']:.4f}, ratio {final['best_val_loss'] / final['baseline_val_loss']:.3f}), "
            f"{final['wall_time_s']:.0f} s; outputs in {run_dir}")
    if run is not None:
        run.summary.update({k: v for k, v in final.items() if isinstance(v, (int, float, str))})
        run.finish()
    accelerator.end_training()
    return final


def results(state, status, trainable, t_start):
    hist = state["history"]
    return {"status": status, "best_val_loss": state["best_val_loss"], "best_epoch": state["best_epoch"],
            "final_val_loss": hist[-1]["val/loss"] if hist else None, "epochs_completed": state["epoch"],
            "step": state["step"], "trainable_params": trainable, "baseline_val_loss": state["baseline_val_loss"],
            "wall_time_s": time.time() - t_start}


def fail(run_dir, state, is_main, t_start, message):
    if is_main:
        res = results(state, "failed", None, t_start)
        res["error"] = message
        utils.write_json_atomic(os.path.join(run_dir, "results.json"), res)
    sys.exit(f"error: {message}")


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


def run_main(argv=None):
    """main(), but an unexpected error still leaves results.json saying `failed` and why, for the sweep tools."""
    args = parse_args(argv)  # once: the default output_dir holds the time, a second parse could name another
    try:
        return main(args)
    except Exception as e:
        if os.path.isdir(args.output_dir) and int(os.environ.get("RANK", "0")) == 0:
            path = os.path.join(args.output_dir, "results.json")
            utils.write_json_atomic(path, {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]})
        raise


if __name__ == "__main__":
    run_main()
