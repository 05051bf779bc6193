"""
Train Qwen3-VL (LoRA + <x>/<y> regression heads) to point at the next uncounted object.

The embedded demo (the pretrained tiny Qwen3-VL in tiny_base/, synthetic data, about 9 minutes on 2 CPU cores):
    python train_vlm_regression.py --config configs/demo.yaml --output_dir runs/demo     # settings and reasons there

Real data on one GPU (the original code's commands):
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
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

STARTED = time.time()  # before the heavy imports (torch, transformers: 10-30 s), which the budget must count too

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import dataset as data  # noqa: E402
import model_vlm_regression as mvr  # noqa: E402
import run_files  # noqa: E402
import train_data  # noqa: E402
import utils  # noqa: E402
from prompt import render_prompt  # noqa: E402

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved, resume me
DEFAULT_SPLITS = {"synthetic": ("train", "val"), "fsc147": ("train", "val"), "omnicount": ("train", "valid")}


def config_defaults(parser, path):
    """Argument defaults from a YAML file of flag names (without --) and values, e.g. configs/demo.yaml: the file
    sets a run's settings in one place, each with its reason; flags on the command line still win."""
    import yaml

    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"--config {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    return values


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML file of settings (flag names without --), e.g. configs/demo.yaml; flags given here win")
    # ---- Data
    data.add_data_args(p)
    p.add_argument("--train_split", default=None, help="default: train")
    p.add_argument("--val_split", default=None, help="default: val (omnicount: valid)")
    # ---- Model
    g = mvr.add_model_args(p)
    g.add_argument("--load_in_4bit", action="store_true", help="QLoRA: NF4 language model (CUDA or CPU)")
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--dtype", default="auto", choices=tuple(mvr.DTYPES),
                   help="the base model's weights (auto: bf16 on CUDA, fp32 on CPU; bf16 on CPU halves its memory)")
    # ---- Optimisation
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=4, help="per device")
    g.add_argument("--grad_accum", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--epochs", type=int, default=10, help="passes of --train_batches batches, each validated")
    g.add_argument("--train_batches", "--train_iters", dest="train_batches", type=int, default=200,
                   help="batches per epoch (per device); 0 = whole split (--train_iters: its old name)")
    g.add_argument("--val_batches", "--val_iters", dest="val_batches", type=int, default=50,
                   help="validation batches per device (a fixed, seeded subset); 0 = whole split "
                        "(--val_iters: its old name)")
    g.add_argument("--lr", type=float, default=1e-3, help="LoRA and <x>/<y> token rows")
    g.add_argument("--mlp_lr_multiplier", type=float, default=5.0, help="heads train at lr x this")
    g.add_argument("--mlp_lr", type=float, default=None, help="heads' lr (overrides the multiplier)")
    g.add_argument("--vision_lr", type=float, default=None, help="lr of the vision modules --train_vision trains "
                   "(default: --lr)")
    g.add_argument("--coord_loss", default="mse", choices=mvr.COORD_LOSSES, help="loss on x and y: mse, or l1 "
                   "(the median: commits to one object where MSE's mean lands between two)")
    g.add_argument("--attention_loss", type=float, default=0.0,
                   help="weight of a loss on the last layer's attention from <x> and <y>: -log of its share on the "
                        "image tokens at the target (0: off); it teaches which object is next, not only where")
    g.add_argument("--warmup_steps", type=int, default=100, help="linear warmup, then cosine decay to 0")
    g.add_argument("--max_minutes", type=float, default=0,
                   help="wall-time budget of the run from the process's start, training and the count at the end "
                        "(0: none): at the end of warm-up the number of epochs, at most --epochs, is fixed from the "
                        "measured speed and fitted again after each epoch until half of them from their length; "
                        "recorded in config.json and results.json, and kept by --resume (--epochs N reruns it "
                        "without a budget)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the global gradient norm; 0 = off")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW's, on every trainable parameter")
    g.add_argument("--seed", type=int, default=42, help="data order, samples and initialisation")
    # ---- Run: outputs, checkpoints, logging
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default=None, help="default: runs/<run_name>")
    g.add_argument("--run_name", default=None, help="default: <dataset>-<model>-<time>")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from a checkpoint folder; alone: OUTPUT_DIR/checkpoints/last (or its newest intact "
                        "step-N); the model settings must match the checkpoint's")
    g.add_argument("--overwrite", action="store_true",
                   help="clear a previous run in --output_dir first (without it or --resume, such a folder is refused)")
    g.add_argument("--checkpoint_every", type=int, default=0,
                   help="also save checkpoints/last every N optimizer steps (long epochs on preemptible nodes)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader worker processes (default: 4 with CUDA, 0 on CPU, where workers would compete "
                        "with the training step for the same cores)")
    g.add_argument("--num_val_images", type=int, default=16, help="validation images logged to W&B per epoch")
    g.add_argument("--log_every", type=int, default=10, help="optimizer steps between train log lines")
    g.add_argument("--eval_count_split", default=None,
                   help="split that --eval_count_images counts (default: the validation split; the demo: test, "
                        "never used for training or model selection)")
    g.add_argument("--eval_count_tta_shift", type=int, default=0, metavar="PX",
                   help="that count's test-time shifts (evaluate_vlm_regression.py --tta_shift; 0 = off)")
    g.add_argument("--eval_count_images", type=int, default=0,
                   help="at the end, count objects step by step on N validation images (results.json)")
    g.add_argument("--wandb_project", default="vlm-sequential-counting", help="W&B project")
    g.add_argument("--wandb_mode", default=None, choices=["online", "offline", "disabled"],
                   help="default: online when a W&B key is configured, else offline")
    first, _ = p.parse_known_args(argv)
    if first.config:
        p.set_defaults(**config_defaults(p, first.config))
    args = p.parse_args(argv)
    check_args(p, args)
    if args.num_workers is None:
        args.num_workers = train_data.default_num_workers()
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


def check_args(p, args):
    """argparse-style one-line errors (exit 2) for values no run can use; nothing is read or written yet."""
    data.check_data_args(p, args)
    mvr.check_model_args(p, args)
    for name, low in (("batch_size", 1), ("grad_accum", 1), ("epochs", 1), ("train_batches", 0), ("val_batches", 0),
                      ("warmup_steps", 0), ("checkpoint_every", 0), ("num_val_images", 0), ("log_every", 1),
                      ("eval_count_images", 0), ("eval_count_tta_shift", 0), ("num_workers", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name} must be >= {low}, got {value}")
    for name in ("lr", "mlp_lr_multiplier", "mlp_lr", "vision_lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name} must be a positive number, got {value}")
    if not (math.isfinite(args.max_minutes) and args.max_minutes >= 0):
        p.error(f"--max_minutes must be >= 0, got {args.max_minutes}")
    if args.max_minutes and args.warmup_steps < 2:
        p.error("--max_minutes needs --warmup_steps >= 2: the speed is measured during warm-up, whose learning rates "
                "do not depend on the number of epochs")
    for name in ("max_grad_norm", "weight_decay"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.vision_lr is not None and args.train_vision == "none":
        p.error("--vision_lr needs --train_vision merger or all (the vision tower is frozen)")
    if args.attention_loss < 0:
        p.error(f"--attention_loss must be >= 0, got {args.attention_loss}")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output_dir and --overwrite clears it: give one of them")


# -----------------------------------------------------------------------------
# Small pieces: the schedule, the gradient-flow check, a failed run, W&B's validation images, preemption


def lr_lambda(warmup_steps, total_steps):
    def f(step):  # step = optimizer steps already taken
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def build_optimizer(model, lr, mlp_lr, weight_decay, vision_lr=None):
    """AdamW with a group per learning rate: the VLM side (LoRA, <x>/<y> rows) at lr, the freshly initialised heads at
    mlp_lr, and the vision modules of --train_vision (if any) at vision_lr (None: lr)."""
    groups = model.trainable_groups()
    heads = [p for g in mvr.HEADS for p in groups.get(g, [])]
    vlm = [p for g, ps in groups.items() if g not in mvr.HEADS and g != "vision" for p in ps]
    param_groups = [{"params": vlm, "lr": lr, "weight_decay": weight_decay, "name": "vlm"},
                    {"params": heads, "lr": mlp_lr, "weight_decay": weight_decay, "name": "heads"}]
    if groups.get("vision"):
        param_groups.append({"params": groups["vision"], "lr": lr if vision_lr is None else vision_lr,
                             "weight_decay": weight_decay, "name": "vision"})
    # fused: one kernel per step for all tensors (CPU and CUDA); the per-tensor loop took 9% of a demo step
    return torch.optim.AdamW(param_groups, fused=True)


def gradient_flow(model):
    """Gradient norm of each trainable group; raises if a group that training must update got no gradient."""
    norms = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = mvr.param_group(name)
            norms[group] = norms.get(group, 0.0) + (0.0 if p.grad is None else p.grad.detach().float().pow(2).sum().item())
    norms = {k: math.sqrt(v) for k, v in norms.items()}
    required = mvr.GROUPS + (("done_head",) if getattr(model, "done_head", None) is not None else ()) + \
        (("vision",) if model.config.get("train_vision", "none") != "none" else ())
    dead = [g for g in required if not norms.get(g)]
    if dead:
        raise RuntimeError(f"gradient-flow check failed: {', '.join(dead)} received no gradient on the first step "
                           f"(frozen by mistake, or detached from the loss); norms: {norms}")
    return norms


def fail(run, message):
    """results.json says `failed` and why (written by rank 0); every rank exits with the message."""
    if run.is_main:
        res = run_files.results(run.state, "failed", None, run.t_start)
        res["error"] = message
        run_files.write_results(run.args.output_dir, res)
    sys.exit(f"error: {message}")


def val_images(model, val_ds, processor, collate, indices, device, ordering):
    """(input as marked | prediction and ground truth) images and their full prompts, for W&B."""
    model.eval()
    samples = [val_ds[i] for i in indices]
    with torch.no_grad():
        pred = model(**train_data.to_device(collate(samples), device)).float().cpu().numpy()
    model.train()
    out = []
    for s, p in zip(samples, pred):
        w, h = s.image.size
        drawn = utils.draw_prediction(s.image, utils.denormalize_points(p[None, :2], w, h)[0],
                                      None if s.done else utils.denormalize_points(s.target[None], w, h)[0])
        prompt = render_prompt(processor, s.object_type, s.num_marked, ordering)
        out.append((utils.side_by_side(s.image, drawn), prompt))
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
# The run's pieces: its data, running means, and what the epoch and step functions share


@dataclass
class RunningMeans:
    """Sums of the per-batch train numbers over a span of batches, and their means: the epoch so far (saved in the
    checkpoint's state, so a mid-epoch resume reports the same epoch mean) or the log window."""
    loss: float = 0.0
    loss_x: float = 0.0
    loss_y: float = 0.0
    saturation: float = 0.0  # share of predictions at the tanh bounds (|p| > 0.99)
    batches: int = 0
    loss_done: float = 0.0  # the stop head's BCE (0 under --stop_rule coordinate)

    def add(self, loss, loss_x, loss_y, loss_done, saturation):
        self.loss += loss
        self.loss_x += loss_x
        self.loss_y += loss_y
        self.loss_done += loss_done
        self.saturation += saturation
        self.batches += 1

    def means(self):
        """(loss, loss_x, loss_y, loss_done, saturation) per batch."""
        n = max(1, self.batches)
        return self.loss / n, self.loss_x / n, self.loss_y / n, self.loss_done / n, self.saturation / n

    def to_state(self):
        """The checkpoint's `epoch_sums` (saturation is reported per log line only, so a checkpoint keeps no sum)."""
        return {"loss": self.loss, "loss_x": self.loss_x, "loss_y": self.loss_y, "loss_done": self.loss_done,
                "n": self.batches}

    @classmethod
    def from_state(cls, sums):
        if not sums:
            return cls()
        return cls(sums["loss"], sums["loss_x"], sums["loss_y"], 0.0, sums["n"], sums.get("loss_done", 0.0))


@dataclass
class LogWindow(RunningMeans):
    """The batches since the last train log line: their running means, samples, and the time spent waiting for data."""
    samples: int = 0
    data_wait: float = 0.0
    started: float = field(default_factory=time.time)


@dataclass
class Run:
    """What the epoch and step functions share, set up once by main()."""
    args: argparse.Namespace
    accelerator: object
    log: object  # prints on rank 0 only
    data: train_data.TrainData
    model: torch.nn.Module  # as accelerate prepared it (DDP-wrapped with several processes)
    raw_model: mvr.VLMRegressionModel
    processor: object
    collate: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: dict  # see run_files.new_state
    trainable: int
    preempt: Preemption
    t_start: float
    wandb: object = None  # the W&B run, on rank 0 unless disabled
    val_loader: object = None
    window: LogWindow = None
    flow_checked: bool = False  # the gradient-flow check runs on a run's first optimizer step only
    config: dict = None  # config.json's content (rank 0)
    step_times: list = field(default_factory=list)  # --max_minutes: (time, step) after each step until the decision
    replan_from: list = None  # --max_minutes: when each epoch ended, in the process that planned (None: no re-plan)

    @property
    def is_main(self):
        return self.accelerator.is_main_process


def start_run_files(run, resume_dir, mlp_lr):
    """Rank 0: config.json, metrics.jsonl cut back to the checkpoint resumed from, and the W&B run (or None)."""
    if not run.is_main:
        return None
    args, d, world = run.args, run.data, run.accelerator.num_processes
    config = dict(vars(args), world_size=world, effective_batch_size=args.batch_size * world * args.grad_accum,
                  train_batches_effective=d.train_batches, mlp_lr_effective=mlp_lr, trainable_params=run.trainable,
                  num_train_records=len(d.train_ds), num_val_samples=len(d.val_order), skipped=d.skipped,
                  versions=mvr.library_versions(), git_commit=run_files.git_commit(),
                  command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    if run.state.get("budget_plan"):  # resumed after --max_minutes planned: config.json keeps the plan
        config.update(epochs_limit=run.state["budget_plan"]["epochs_limit"],
                      max_minutes_plan=run.state["budget_plan"]["estimates"])
    run_files.write_config(args.output_dir, config)
    run.config = config
    run_files.trim_metrics(args.output_dir, resume_dir, run.state["step"])
    return run_files.init_wandb(args, config, args.output_dir)


def log_metrics(run, row):
    if not run.is_main:
        return
    run_files.append_metrics(run.args.output_dir, row)
    if run.wandb is not None:
        run.wandb.log({k: v for k, v in row.items() if k not in ("epoch_end",)}, step=row["step"])


def checkpoint(run, best=False):
    """Every rank's own RNG state and epoch sums gathered (each rank draws its own dropout and sums the losses of its
    own slice), the files written by rank 0."""
    from accelerate.utils import gather_object

    run.accelerator.wait_for_everyone()
    rank_rng = gather_object([dict(run_files.rng_state(), epoch_sums=run.state["epoch_sums"])]) \
        if run.accelerator.num_processes > 1 else None
    if run.is_main:
        run_files.save_checkpoint(run.args.output_dir, run.raw_model, run.processor, run.optimizer, run.scheduler,
                                  run.state, best, rank_rng)


# -----------------------------------------------------------------------------
# --max_minutes: the number of epochs fixed at the end of warm-up from the measured speed

BUDGET_SHARE = 0.95  # epochs are planned on 95% of the budget: checkpoints, W&B images, estimates' errors the rest
REPLAN_SHARE = 0.5  # the plan is revised after each epoch from the second until this share of the planned ones (the
# learning rate moves by a few percent when the schedule's end does there; near the end it would jump)
COUNT_OVERHEAD = 1.0  # a counting batch against a validation batch: marks drawn, but fewer images as counts end


def decision_step(args, train_batches):
    """The optimizer step at which --max_minutes fixes the epochs: the end of warm-up, or of the first epoch if
    sooner. Learning rates up to there do not depend on the number of epochs."""
    return min(args.warmup_steps, math.ceil(train_batches / args.grad_accum))


def set_epochs(run, epochs):
    """Train `epochs` epochs in all, the cosine schedule ending at 0 on the last step."""
    args = run.args
    args.epochs = run.state["planned_epochs"] = epochs
    total = math.ceil(run.data.train_batches / args.grad_accum) * epochs
    run.scheduler.lr_lambdas = [lr_lambda(args.warmup_steps, total)] * len(run.scheduler.lr_lambdas)


def validation_batch_seconds(run, batches=2):
    """Seconds per validation batch (collate and a forward pass without gradients), measured on a few of them."""
    model, n, t = run.raw_model, 0, time.time()
    model.eval()
    with torch.no_grad():
        for batch in run.val_loader:
            model(**train_data.to_device(batch, run.accelerator.device))
            n += 1
            if n == batches:
                break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    model.train()
    return (time.time() - t) / max(1, n)


def plan_epochs(run, step_s):
    """The number of epochs (at least 1, at most --epochs) whose training, validations and the count at the end fit
    BUDGET_SHARE of --max_minutes from the run's start, at `step_s` seconds per optimizer step; and the estimates."""
    args, d, state = run.args, run.data, run.state
    val_s = validation_batch_seconds(run)
    steps_per_epoch = math.ceil(d.train_batches / args.grad_accum)
    epoch_s = steps_per_epoch * step_s + len(run.val_loader) * val_s
    count_s = 0.0
    if args.eval_count_images:
        import evaluate_vlm_regression as ev

        steps = float(np.mean([len(r.points) for r in d.train_records])) + 1  # each object, then the stop
        passes = len(ev.shift_offsets(args.eval_count_tta_shift))
        count_s = math.ceil(args.eval_count_images / args.batch_size) * steps * passes * val_s * COUNT_OVERHEAD
    first_epoch_left = (steps_per_epoch * (state["epoch"] + 1) - state["step"]) * step_s + len(run.val_loader) * val_s
    left = args.max_minutes * 60 * BUDGET_SHARE - (time.time() - run.t_start) - count_s - first_epoch_left
    epochs = int(max(1, min(args.epochs, state["epoch"] + 1 + left // epoch_s)))
    return epochs, {"step_s": step_s, "val_batch_s": val_s, "epoch_s": epoch_s, "count_s": count_s}


def fit_epochs_to_budget(run, bar):
    """--max_minutes, after each optimizer step until the decision step: note the time; at the decision step plan
    the epochs from the speed of this process's steps, its first quarter left out as warm-up of the caches and the
    allocator (rank 0's plan, on every rank), end the schedule there and record it in config.json and W&B."""
    args, state = run.args, run.state
    run.step_times.append((time.time(), state["step"]))
    if state["step"] < decision_step(args, run.data.train_batches) or len(run.step_times) < 2:
        return
    (t0, s0), (t1, s1) = run.step_times[(len(run.step_times) - 1) // 4], run.step_times[-1]
    plan = [plan_epochs(run, (t1 - t0) / (s1 - s0)) if run.is_main else None]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(plan, from_process=0)
    epochs, est = plan[0]
    run.replan_from = []  # this process planned: it re-plans too
    record_plan(run, epochs, args.epochs, est,
                f"{est['step_s']:.3f} s a step, {est['epoch_s']:.0f} s an epoch with its validation" +
                (f", the count about {est['count_s']:.0f} s" if est["count_s"] else ""))
    bar.set_description(f"epoch {state['epoch'] + 1}/{epochs}")


def record_plan(run, epochs, limit, est, why):
    """Train `epochs` epochs (the cosine schedule ending on their last step): say so and why, and record it in the
    state, config.json and W&B."""
    args = run.args
    set_epochs(run, epochs)
    run.state["budget_plan"] = {"epochs_limit": limit, "estimates": est}
    run.log(f"--max_minutes {args.max_minutes:g}: {why}: {epochs} epochs (at most {limit}), "
            f"{math.ceil(run.data.train_batches / args.grad_accum) * epochs} steps")
    if run.is_main:
        run.config.update(epochs=epochs, epochs_limit=limit, max_minutes_plan=est)
        run_files.write_config(args.output_dir, run.config)
        if run.wandb is not None:
            run.wandb.config.update({"epochs": epochs, "epochs_limit": limit}, allow_val_change=True)


def replan_epochs(run):
    """--max_minutes, at the end of an epoch before its checkpoint: from epoch 2 until REPLAN_SHARE of the planned
    epochs, fit the epochs to the budget again from the mean length of the epochs since the first (training,
    validation, checkpoint), which the first steps' speed only estimated, and which a machine shared for a while
    changes. Only in the process that made the plan: a resumed run keeps its epochs (rank 0's plan on every rank)."""
    if run.replan_from is None:
        return
    run.replan_from.append(time.time())
    done, est = run.state["epoch"], run.state["budget_plan"]["estimates"]
    if not 2 <= done <= REPLAN_SHARE * run.args.epochs:
        return
    args, limit = run.args, run.state["budget_plan"]["epochs_limit"]
    epoch_s = (run.replan_from[-1] - run.replan_from[0]) / (len(run.replan_from) - 1)
    left = args.max_minutes * 60 * BUDGET_SHARE - (time.time() - run.t_start) - est["count_s"]
    plan = [int(max(done, min(limit, done + left // epoch_s)))]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(plan, from_process=0)
    if plan[0] != args.epochs:
        record_plan(run, plan[0], limit, dict(est, epoch_s=epoch_s),
                    f"epochs {2 if done == 2 else f'2-{done}'} took {epoch_s:.1f} s each")


# -----------------------------------------------------------------------------
# The loop: one function per step, per epoch, and the validation after each epoch


def train_step(run, batch):
    """Forward and backward of one batch; at the end of an accumulation also the clipped optimizer step and the
    scheduler's. Returns (predictions, (loss, loss_x, loss_y, loss_done), gradient norm or None), on the device."""
    accelerator, grad_norm = run.accelerator, None
    with accelerator.accumulate(run.model):
        pred = run.model(**batch)
        losses = mvr.counting_loss(pred.float(), batch["targets"], batch["done"], run.args.coord_loss)
        attention = run.raw_model.attention_loss
        accelerator.backward(losses[0] if attention is None else losses[0] + run.args.attention_loss * attention)
        if accelerator.sync_gradients:
            if not run.flow_checked:
                norms = gradient_flow(run.raw_model)
                run.log("gradient flow on the first step (norm per group): " +
                        ", ".join(f"{k} {v:.3e}" for k, v in norms.items()))
                run.flow_checked = True
            grad_norm = accelerator.clip_grad_norm_(
                [p for g in run.optimizer.param_groups for p in g["params"]],
                run.args.max_grad_norm if run.args.max_grad_norm > 0 else float("inf"))
        run.optimizer.step()
        if accelerator.sync_gradients:
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return pred, losses, grad_norm


def log_train_line(run, epoch, grad_norm, bar):
    """The log window's row (means over the ranks) in metrics.jsonl and W&B; then a new window."""
    window, scheduler = run.window, run.scheduler
    dt = time.time() - window.started
    loss, loss_x, loss_y, loss_done, saturation = train_data.mean_over_ranks(run.accelerator, list(window.means()))
    row = {"epoch": epoch + 1, "step": run.state["step"], "train/loss": loss, "train/loss_x": loss_x,
           "train/loss_y": loss_y, **({"train/loss_done": loss_done} if run.raw_model.done_head is not None else {}),
           "train/saturation": saturation, "train/grad_norm": float(grad_norm),
           "train/samples_per_s": window.samples / dt, "train/data_wait_share": window.data_wait / dt,
           "lr/vlm": scheduler.get_last_lr()[0], "lr/heads": scheduler.get_last_lr()[1]}
    log_metrics(run, row)
    bar.set_postfix(loss=f"{row['train/loss']:.4f}", sps=f"{row['train/samples_per_s']:.1f}")
    run.window = LogWindow()


def after_optimizer_step(run, epoch, batch_index, grad_norm, stop, bar):
    """Count the step; the train log line every --log_every steps and at the epoch's end; on a preemption signal a
    checkpoint and exit 75; a mid-epoch checkpoint every --checkpoint_every steps."""
    args, state = run.args, run.state
    state["step"] += 1
    if args.max_minutes and state["planned_epochs"] is None:
        fit_epochs_to_budget(run, bar)
    last_batch = batch_index + 1 == run.data.train_batches
    if state["step"] % args.log_every == 0 or last_batch:
        log_train_line(run, epoch, grad_norm, bar)
    if stop:
        checkpoint(run)
        run.log(f"{run.preempt.signal or 'signal'}: checkpoint saved at step {state['step']}; exiting "
                f"(code {EXIT_PREEMPTED}); continue with --resume")
        if run.is_main:
            run_files.write_results(args.output_dir, run_files.results(state, "preempted", run.trainable, run.t_start))
        # no rank exits before rank 0 has written: torchrun kills the remaining ranks 30 s after the first one exits
        run.accelerator.wait_for_everyone()
        sys.exit(EXIT_PREEMPTED)
    if args.checkpoint_every and state["step"] % args.checkpoint_every == 0 and not last_batch:
        checkpoint(run)


def train_epoch(run, epoch):
    """Train one epoch, from state["batch_in_epoch"] on (mid-epoch after a resume). Returns its running means."""
    args, state, accelerator, d = run.args, run.state, run.accelerator, run.data
    world = accelerator.num_processes
    d.train_ds.set_epoch(epoch)
    start = state["batch_in_epoch"]
    indices = train_data.epoch_indices(len(d.train_ds), args.seed, epoch, d.train_batches, args.batch_size, world,
                                       accelerator.process_index, start)
    loader = train_data.make_loader(d.train_ds, indices, args.batch_size, run.collate, args.num_workers,
                                    args.seed + epoch)
    bar = tqdm(total=d.train_batches, initial=start, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not run.is_main,
               dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30, file=sys.stderr)
    totals = RunningMeans.from_state(state["epoch_sums"])
    t_data = time.time()
    for b, batch in enumerate(loader, start=start):
        batch = train_data.to_device(batch, accelerator.device)
        run.window.data_wait += time.time() - t_data
        pred, losses, grad_norm = train_step(run, batch)
        # One host sync per batch, after the step has been queued (no stall between forward and backward). A
        # non-finite loss stops the run here; the weights it touched are never saved, so checkpoints/last is good.
        loss, loss_x, loss_y, loss_done, saturation = torch.stack(
            [*(t.detach() for t in losses), (pred.detach()[:, :2].abs() > 0.99).float().mean()]).tolist()
        # the preemption signal is agreed here too: one all-reduce per batch for both decisions
        nonfinite, stop = train_data.any_rank(accelerator, not math.isfinite(loss), run.preempt.signal is not None)
        if nonfinite:
            fail(run, f"non-finite loss ({loss}) at epoch {epoch + 1}, batch {b + 1}, optimizer step "
                      f"{state['step'] + 1}; the last good checkpoint (checkpoints/last) is kept")
        run.window.add(loss, loss_x, loss_y, loss_done, saturation)
        run.window.samples += pred.shape[0] * world
        totals.add(loss, loss_x, loss_y, loss_done, saturation)
        state["batch_in_epoch"], state["epoch_sums"] = b + 1, totals.to_state()
        bar.update(1)
        if accelerator.sync_gradients:
            after_optimizer_step(run, epoch, b, grad_norm, stop, bar)
        t_data = time.time()
    bar.close()
    return totals


def stop_summary(metrics):
    """The stop head's validation figures for the epoch's console line ('' without a stop head)."""
    if "val/stop_accuracy" not in metrics:
        return ""
    return (f"  stop head: accuracy {metrics['val/stop_accuracy']:.2f}, precision {metrics['val/stop_precision']:.2f}, "
            f"recall {metrics['val/stop_recall']:.2f}")


def end_epoch(run, epoch, totals):
    """Validation, the epoch's row and console line, W&B images, and a checkpoint (also `best` if it improved)."""
    args, state, accelerator = run.args, run.state, run.accelerator
    metrics, _ = train_data.validate(run.model, run.val_loader, accelerator, args.coord_loss)
    state["epoch"], state["batch_in_epoch"], state["epoch_sums"] = epoch + 1, 0, None
    improved = state["best_val_loss"] is None or metrics["val/loss"] < state["best_val_loss"]
    if improved:
        state["best_val_loss"], state["best_epoch"] = metrics["val/loss"], epoch + 1
    keys = ("loss", "loss_x", "loss_y") + (("loss_done",) if run.raw_model.done_head is not None else ())
    train_means = train_data.mean_over_ranks(accelerator, list(totals.means()[:len(keys)]))
    row = {"epoch": epoch + 1, "step": state["step"], "epoch_end": True,
           **{f"train/{k}": v for k, v in zip(keys, train_means)},
           **metrics,
           "val/baseline_loss": state["baseline_val_loss"]}
    state["history"].append({k: row[k] for k in ("epoch", "step", "train/loss", "val/loss")})
    log_metrics(run, row)
    replan_epochs(run)
    if run.wandb is not None and args.num_val_images:
        import wandb

        shown = val_images(run.raw_model, run.data.val_ds, run.processor, run.collate,
                           run.data.val_order[: args.num_val_images].tolist(), accelerator.device, args.ordering)
        run.wandb.log({"val/images": [wandb.Image(im, caption=cap) for im, cap in shown]}, step=state["step"])
    run.log(f"epoch {epoch + 1}/{args.epochs} step {state['step']}: train {row['train/loss']:.4f}  val "
            f"{metrics['val/loss']:.4f} (x {metrics['val/loss_x']:.4f}, y {metrics['val/loss_y']:.4f})  "
            f"pixel error {metrics['val/pixel_error']:.1f}  baseline {state['baseline_val_loss']:.4f}  "
            f"saturation {metrics['val/saturation']:.2f}" + stop_summary(metrics) + ("  *best*" if improved else ""))
    checkpoint(run, best=improved)


def count_at_the_end(run, num_examples=4):
    """--eval_count_images: count that many records of --eval_count_split step by step with the final model; the
    metrics go to results.json, the first images with their marks to count_examples/ (and W&B)."""
    import evaluate_vlm_regression as ev

    args = run.args
    split = args.eval_count_split or args.val_split
    records = run.data.val_records if split == args.val_split else data.records_from_args(args, split)[0]
    mean_count = float(np.mean([len(r.points) for r in run.data.train_records]))
    out = ev.count_records(run.raw_model, run.processor, records[: args.eval_count_images], ordering=args.ordering,
                           min_pixels=args.min_pixels, max_pixels=args.max_pixels, batch_size=args.batch_size,
                           train_mean_count=mean_count, tta_shift=args.eval_count_tta_shift)
    folder = os.path.join(args.output_dir, "count_examples")
    os.makedirs(folder, exist_ok=True)
    by_key = {(r.image_id, r.object_type): r for r in records}
    shown = []
    for n, p in enumerate(out["predictions"][:num_examples]):
        im = ev.count_visualisation(by_key[(p["image"], p["object_type"])], p, args.min_pixels, args.max_pixels,
                                    mark_style=args.mark_style)
        im.save(os.path.join(folder, f"{n:02d}_{p['image'][-40:].replace('/', '_')}.png"))
        shown.append((im, f"{p['object_type']}: counted {p['pred_count']}, truth {p['gt_count']}"))
    if run.wandb is not None:
        import wandb

        run.wandb.log({"count/examples": [wandb.Image(im, caption=c) for im, c in shown]}, step=run.state["step"])
    return dict(out["metrics"], split=split)


def count_summary(m, args):
    """The end of the console: the count in words a newcomer reads, and where the pictures are."""
    stops = m["stop_reasons"]
    by_head = stops.get("done", 0) / max(1, m["num_images"])
    points = f"found {m['recall']:.0%} of the objects (F1 {m['f1']:.2f} with a match within the " \
             f"{m.get('match_radius_px_mean') or 0:.0f}-px mark radius"
    if m.get("f1_object_radius") is not None:
        points += f", {m['f1_object_radius']:.2f} within the object's own radius"
    points += ")"
    if m.get("point_to_nearest_object_px_median") is not None:
        points += f"; a counted point lands a median {m['point_to_nearest_object_px_median']:.0f} px from the nearest object"
    return "\n".join([
        f"counted {m['num_images']} {m['split']} images one object at a time:",
        f"  count: mean absolute error {m['mae']:.2f} objects; always guessing the training images' mean count: "
        f"{m['baseline_mean_count_mae']:.2f}",
        f"  stopping: {by_head:.0%} of the images stopped on the model's own 'all counted' signal (stops: {stops})",
        f"  points: {points}",
        f"  pictures: {os.path.join(args.output_dir, 'count_examples')}/"])


def finish(run):
    """results.json (with the count evaluation if asked), the final console line, W&B's summary."""
    args = run.args
    final = run_files.results(run.state, "completed", run.trainable, run.t_start)
    if args.eval_count_images and run.is_main:
        final["count_eval"] = count_at_the_end(run)
    if run.is_main:
        run_files.write_results(args.output_dir, final)
        run.log(f"done: best val loss {final['best_val_loss']:.4f} at epoch {final['best_epoch']} (baseline "
                f"{final['baseline_val_loss']:.4f}, ratio {final['best_val_loss'] / final['baseline_val_loss']:.3f}), "
                f"{final['wall_time_s']:.0f} s; outputs in {args.output_dir}")
        if "count_eval" in final:
            run.log(count_summary(final["count_eval"], args))
    if run.wandb is not None:
        run.wandb.summary.update({k: v for k, v in final.items() if isinstance(v, (int, float, str))})
        run.wandb.finish()
    # every rank leaves together, with the DDP wrapper (which holds the process group) released first: a rank that
    # tore its group down while the other still wrote results once died at exit (SIGABRT, gloo, 1 run in ~25)
    run.accelerator.wait_for_everyone()
    run.model = run.optimizer = None
    run.accelerator.free_memory()
    run.accelerator.end_training()
    return final


# -----------------------------------------------------------------------------
# main: the phases in order


def main(args, started=None):
    """Train (and count) as args say. started: when the process began (run_main as a script: before the imports),
    for --max_minutes and results.json's wall_time_s; None: now."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t_start = started or time.time()
    # cpu=True is what makes accelerate use gloo for a multi-process CPU run (torchrun without GPUs)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    if accelerator.device.type == "cpu":
        utils.keep_freed_memory()  # ~7% more steps/s on CPU; the arithmetic is the same
    is_main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    log = (lambda *a: tqdm.write(" ".join(str(x) for x in a))) if is_main else (lambda *a: None)
    set_seed(args.seed)  # the same initialisation on every rank
    preempt = Preemption()

    # ---- checks, all before anything in the output folder is written: the folder, the checkpoint, the data
    if is_main and os.path.isdir(args.output_dir):
        run_files.lock_output_dir(args.output_dir)  # a second training into this folder fails here, at once
    run_files.check_output_dir(args)
    resume_dir = run_files.find_resume_dir(args, log)
    if resume_dir:
        run_files.check_resume_compatible(args, resume_dir)
    d = train_data.load_data(args, world, rank)

    # ---- model and optimizer, restored from the checkpoint when resuming
    model, processor = mvr.build_model(
        args.model_name, args.lora_r, args.lora_alpha, args.lora_dropout, args.mlp_layers, args.head_hidden_dim,
        device=accelerator.device, dtype=mvr.DTYPES[args.dtype], load_in_4bit=args.load_in_4bit,
        gradient_checkpointing=args.gradient_checkpointing, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        stop_rule=args.stop_rule, train_vision=args.train_vision)
    model.config.update(ordering=args.ordering, mark_style=args.mark_style, done_fraction=args.done_fraction,
                        coord_loss=args.coord_loss, attention_loss=args.attention_loss)
    collate = data.make_collate_fn(processor, args.ordering)
    mlp_lr = args.mlp_lr if args.mlp_lr is not None else args.lr * args.mlp_lr_multiplier
    optimizer = build_optimizer(model, args.lr, mlp_lr, args.weight_decay, args.vision_lr)
    total_steps = math.ceil(d.train_batches / args.grad_accum) * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, total_steps))
    trainable = sum(p.numel() for ps in model.trainable_groups().values() for p in ps)
    state = run_files.new_state()
    if world > 1:
        set_seed(args.seed + rank)  # each rank its own dropout stream (a resume restores each rank's own state)
    if resume_dir:
        run_files.load_trained_weights(model, resume_dir)
        state = run_files.load_training_state(resume_dir, optimizer, scheduler, rank, world)
        state.setdefault("planned_epochs", None)  # a checkpoint from before --max_minutes
        if args.max_minutes and state["planned_epochs"] is None and state["step"] >= decision_step(args,
                                                                                                   d.train_batches):
            raise run_files.RunError(f"--resume {resume_dir}: --max_minutes fixes the epochs at the end of warm-up, "
                                     f"and this run passed it (step {state['step']}) without a budget: resume it "
                                     f"without --max_minutes")
        log(f"resumed from {os.path.realpath(resume_dir)}: epoch {state['epoch']}, batch {state['batch_in_epoch']}, "
            f"step {state['step']}")

    # ---- every check passed: the folder is this run's (lock, --overwrite, stale temp files)
    if is_main:
        run_files.claim_output_dir(args, log)
        CLAIMED.add(os.path.abspath(args.output_dir))
    accelerator.wait_for_everyone()
    model, optimizer = accelerator.prepare(model, optimizer)
    run = Run(args, accelerator, log, d, model, accelerator.unwrap_model(model), processor, collate, optimizer,
              scheduler, state, trainable, preempt, t_start)
    if state["planned_epochs"] is not None:  # resumed: the epochs --max_minutes fixed before, whatever it says now
        set_epochs(run, state["planned_epochs"])

    # ---- run files, and the baseline every validation loss is compared with
    run.wandb = start_run_files(run, resume_dir, mlp_lr)
    if state["baseline_val_loss"] is None:
        state["baseline_val_loss"] = train_data.baseline_val_loss(d, args.seed, args.stop_rule == "head",
                                                                  args.coord_loss)
    log(f"run {args.run_name}: {len(d.train_ds)} train records, {len(d.val_order)} val samples, {trainable:,} "
        f"trainable params, world {world}, {d.train_batches} batches/epoch, baseline val loss "
        f"{state['baseline_val_loss']:.4f}")

    # ---- train: each epoch, then its validation and checkpoint
    model.train()
    run.flow_checked = state["step"] > 0
    run.window = LogWindow()
    run.val_loader = train_data.make_loader(d.val_ds, d.val_shard, args.batch_size, collate, args.num_workers,
                                            args.seed)
    while state["epoch"] < args.epochs:  # --max_minutes fixes args.epochs during the first epoch
        totals = train_epoch(run, state["epoch"])
        end_epoch(run, state["epoch"], totals)

    # ---- finish
    return finish(run)


CLAIMED = set()  # output folders this process has taken (all checks passed): only there may it write `failed`


def run_main(argv=None, started=None):
    """main(), with one-line errors: a refused start (exit 2), bad data or a failed write such as a full disk (exit
    1). An unexpected error in a run that had started leaves results.json saying `failed` and why, for the sweep
    tools; a start refused before that writes nothing, so a finished run in the folder keeps its files."""
    args = parse_args(argv)  # once: the default output_dir holds the time, a second parse could name another
    ours = lambda: os.path.abspath(args.output_dir) in CLAIMED  # noqa: E731
    try:
        return main(args, started)
    except run_files.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (data.DataError, OSError) as e:
        message = str(e) if isinstance(e, data.DataError) else \
            f"{e.filename or args.output_dir}: {e.strerror or e} (errno {e.errno})"
        if ours():
            try:
                run_files.write_results(args.output_dir, {"status": "failed", "error": message[:2000]})
            except OSError:
                pass  # the disk is still full: the message below is all there is
        sys.exit(f"error: {message}")
    except Exception as e:
        if ours():
            run_files.write_results(args.output_dir, {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000]})
        raise


if __name__ == "__main__":
    run_main(started=STARTED)
