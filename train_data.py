"""
The data side of training: both splits as datasets, which samples each epoch and each rank take, their loaders,
the validation loss and the mean-target baseline it is compared with; and how the ranks agree on what they saw.
Data parallel: a run's samples are the same whatever the number of processes for a given global batch, and a
resumed run restarts at exactly the batch it stopped at.
"""

import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import dataset as data
import model_vlm_regression as mvr


def default_num_workers():
    """DataLoader worker processes: 4 with CUDA; 0 on CPU, where workers compete with the training step for the same
    cores (64.5 vs 57.5 samples/s on 2 cores)."""
    return min(4, max(0, (os.cpu_count() or 1) - 1)) if torch.cuda.is_available() else 0


# -----------------------------------------------------------------------------
# The splits and their validation samples


@dataclass
class TrainData:
    """Both splits as datasets, and which samples each epoch and the validation use."""
    train_records: list
    val_records: list
    train_ds: data.CountingDataset
    val_ds: data.CountingDataset  # fixed: never set_epoch
    train_batches: int  # per epoch and device, a whole number of optimizer steps
    val_order: np.ndarray  # the validation samples of all ranks
    val_shard: list  # this rank's share of them
    skipped: dict


def load_data(args, world, rank):
    try:
        train_records, train_skipped = data.records_from_args(args, args.train_split)
        val_records, val_skipped = data.records_from_args(args, args.val_split)
        check_disjoint(train_records, val_records, args.train_split, args.val_split)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    dkw = dict(ordering=args.ordering, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
               done_fraction=args.done_fraction, mark_style=args.mark_style)
    train_ds = data.CountingDataset(train_records, seed=args.seed, mark_jitter=args.mark_jitter, **dkw)
    val_ds = data.CountingDataset(val_records, seed=args.seed + 1, **dkw)
    train_batches = args.train_batches or len(train_ds) // (args.batch_size * world)
    train_batches = max(1, math.ceil(train_batches / args.grad_accum)) * args.grad_accum  # epochs end on a full step
    # the validation set is val_batches global batches (per-device batch x world), so it is the same set of samples
    # whatever the number of processes for a given global batch
    val_order = np.random.default_rng([args.seed, 7]).permutation(len(val_ds))
    if args.val_batches:
        val_order = val_order[: args.val_batches * args.batch_size * world]
    val_order = val_order[: max(world, len(val_order) // world * world)]  # equal shards, so ranks can gather
    return TrainData(train_records, val_records, train_ds, val_ds, train_batches, val_order,
                     val_order[rank::world].tolist(), {"train": train_skipped, "val": val_skipped})


def check_disjoint(train_records, val_records, train_split, val_split):
    """DataError when an image file is in both splits: validation on training images would look better than it is."""
    train_paths = {os.path.realpath(r.image_path) for r in train_records if r.image_path}
    leaked = sorted({r.image_path for r in val_records if r.image_path and os.path.realpath(r.image_path) in train_paths})
    if leaked:
        raise data.DataError(f"{leaked[0]}: image in both the {train_split!r} and the {val_split!r} split "
                             f"({len(leaked)} such images; a leak between splits)")


def baseline_val_loss(d, seed, stop_head=False, coord_loss="mse"):
    """The loss of a model that knows only the training targets (of 512 seeded samples), on the validation samples:
    the best constant for the coordinate loss (the mean target for MSE, the per-axis median for L1) and, with a stop
    head, the share of done samples as its constant probability. With a stop head the coordinate part leaves the
    done samples out, as the training loss does."""
    centre = np.median if coord_loss == "l1" else np.mean
    ids = np.random.default_rng([seed, 11]).permutation(len(d.train_ds))[:512]
    train = [d.train_ds[int(i)] for i in ids]
    val = [d.val_ds[int(i)] for i in d.val_order]
    val_targets = torch.tensor(np.stack([s.target for s in val]))
    if not stop_head:
        constant = torch.tensor(centre([s.target for s in train], 0), dtype=torch.float32)
        return mvr.regression_loss(constant.expand_as(val_targets), val_targets, kind=coord_loss)[0].item()
    constant = torch.tensor(centre([s.target for s in train if not s.done] or [np.zeros(2, np.float32)], 0),
                            dtype=torch.float32)
    p_done = float(np.clip(np.mean([s.done for s in train]), 1e-4, 1 - 1e-4))
    val_done = torch.tensor([float(s.done) for s in val])
    logit = torch.full((len(val), 1), float(np.log(p_done / (1 - p_done))))
    pred = torch.cat((constant.expand_as(val_targets), logit), 1)
    return mvr.counting_loss(pred, val_targets, val_done, coord_loss)[0].item()


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


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# The ranks agree: one all-reduce each


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


# -----------------------------------------------------------------------------
# Validation: every rank scores its shard, the predictions are gathered


def image_sizes(batch):
    """(W, H) in pixels of each image as the model saw it: the grid is in 16-px patches."""
    thw = batch["image_grid_thw"].float()
    return torch.stack([thw[:, 2], thw[:, 1]], dim=1) * 16


@torch.no_grad()
def validate(model, loader, accelerator, coord_loss="mse"):
    """Loss (total, x, y, and the stop head's), mean pixel error over the samples with an object left (all samples
    under the coordinate stop rule), and the stop head's accuracy, precision and recall at probability 0.5 (done is
    the positive class), over the whole validation set (gathered across ranks)."""
    model.eval()
    preds, targets, sizes, dones = [], [], [], []
    for batch in loader:
        batch = to_device(batch, accelerator.device)
        preds.append(model(**batch).float())
        targets.append(batch["targets"])
        sizes.append(image_sizes(batch))
        dones.append(batch["done"])
    model.train()
    pred, target, size, done = (accelerator.gather(torch.cat(t)) for t in (preds, targets, sizes, dones))
    loss, loss_x, loss_y, loss_done = mvr.counting_loss(pred, target, done, coord_loss)
    xy = pred[:, :2]
    keep = done < 0.5 if pred.shape[1] == 3 else torch.ones_like(done, dtype=torch.bool)
    pixel_error = ((xy - target) / 2 * size).norm(dim=1)[keep].mean() if keep.any() else torch.tensor(float("nan"))
    metrics = {"val/loss": loss.item(), "val/loss_x": loss_x.item(), "val/loss_y": loss_y.item(),
               "val/pixel_error": pixel_error.item(), "val/saturation": (xy.abs() > 0.99).float().mean().item()}
    if pred.shape[1] == 3:
        said, truth = pred[:, 2] > 0, done > 0.5
        tp = (said & truth).sum().item()
        metrics.update({"val/loss_done": loss_done.item(),
                        "val/stop_accuracy": (said == truth).float().mean().item(),
                        "val/stop_precision": tp / max(1, said.sum().item()),
                        "val/stop_recall": tp / max(1, truth.sum().item())})
    return metrics, pred
