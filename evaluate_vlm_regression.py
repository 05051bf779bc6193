"""
Count objects one at a time with a trained checkpoint (mark, predict the next object, mark it, repeat until the model
stops) and score it: count MAE / RMSE against the mean-count baseline, and how well the points land on real objects.

    python evaluate_vlm_regression.py --checkpoint runs/demo --split test                  # run dir -> checkpoints/best
    python evaluate_vlm_regression.py --checkpoint runs/fsc/checkpoints/last --dataset fsc147 \\
        --data_root /media/M2SSD/FSC147 --split test --output_dir runs/fsc/eval-test
    python evaluate_vlm_regression.py --checkpoint runs/demo --mode next_point --split test   # teacher-forced
    python evaluate_vlm_regression.py --checkpoint runs/demo --images photo.jpg photos/ --object eggs \\
        --output_dir counts                                       # your own images: counts.json, marks/*.png

--checkpoint is a training run's checkpoints/best or checkpoints/last, a checkpoints/step-N folder, or the run dir
itself (its checkpoints/best). The data arguments default to the run's own (config.json: dataset, data_root,
categories, object types, synthetic settings, seed); ordering, min_pixels and max_pixels to the checkpoint's
(regression_config.json), because the prompt and the image size must be the ones the model was trained on.
Outputs in --output_dir (default <run dir>/eval/<dataset>-<split>[-next_point]): predictions.jsonl, metrics.json,
vis/*.png. See docs/EVALUATION.md.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

import counting
import dataset as data
import model_vlm_regression as mvr
import utils
from prompt import encode_batch

# The stop head says "all objects are marked" when its probability exceeds this.
DONE_THRESHOLD = 0.5
# --stop_rule coordinate (runs trained before the stop head): a prediction this close to (-1, -1) in normalized units
# (both coordinates) means "all counted", 2.5% of the image side from the top-left corner. It stops at 0 on an image
# with an object there (docs/EVALUATION.md), which is why the stop head replaced it.
DONE_CORNER_MARGIN = 0.05
# max_steps defaults to 2 x the largest ground-truth count of the evaluated images + 5 (room for over-counting, the
# error we want to see), capped: FSC-147's largest image holds 3,731 objects, so a model that never stops burns at
# most about twice that many forward passes on one image, and a perfect one still reaches its "done" at 4,000.
MAX_STEPS_CAP = 8000
STOP_REASONS = ("done", "repeat", "max_steps")


# -----------------------------------------------------------------------------
# Pure pieces: stop rule, matching, metrics (numpy in, numpy out)


def default_max_steps(records):
    return min(2 * max((len(r.points) for r in records), default=0) + 5, MAX_STEPS_CAP)


def stop_reason(pred, p_done, marked, width, height, repeat_radius, done_threshold=DONE_THRESHOLD):
    """Why counting stops at this prediction, or None to count it. pred: normalized (2,); p_done: the stop head's
    probability, or None for the coordinate rule; marked: (k, 2) pixels of the objects counted so far, in the
    model-input frame of size (width, height).
    'done': the stop head's probability exceeds done_threshold (coordinate rule: the model answers (-1, -1)).
    'repeat': it points at an object it already counted (within repeat_radius px of one; None: no repeat rule);
    the point is not counted."""
    pred = np.asarray(pred, np.float64).reshape(2)
    if p_done is None:
        if pred[0] <= -1 + DONE_CORNER_MARGIN and pred[1] <= -1 + DONE_CORNER_MARGIN:
            return "done"
    elif p_done > done_threshold:
        return "done"
    marked = np.asarray(marked, np.float64).reshape(-1, 2)
    if len(marked) and repeat_radius is not None:
        xy = utils.denormalize_points(pred, width, height)[0]
        if np.linalg.norm(marked - xy, axis=1).min() <= repeat_radius:
            return "repeat"
    return None


def match_points(pred, gt, radius):
    """Number of one-to-one matches between predicted and ground-truth points (pixels) at most `radius` apart.
    Hungarian matching on a cost that makes any extra match worth more than any distance saved, so the count of
    matches is the maximum possible (minimising plain total distance can trade two near matches for two far ones)."""
    return matches_within(pairwise_distances(pred, gt), radius)


def pairwise_distances(pred, gt):
    """(len(pred), len(gt)) pixel distances between two point sets."""
    pred = np.asarray(pred, np.float64).reshape(-1, 2)
    gt = np.asarray(gt, np.float64).reshape(-1, 2)
    return np.linalg.norm(pred[:, None, :] - gt[None, :, :], axis=2)


def matches_within(d, radius):
    """match_points on a precomputed distance matrix (one matrix serves several radii)."""
    from scipy.optimize import linear_sum_assignment

    if not d.size:
        return 0
    ok = d <= radius
    rows, cols = ok.any(1), ok.any(0)  # points with no partner in range cannot match: drop them (FSC-147 is big)
    d, ok = d[rows][:, cols], ok[rows][:, cols]
    if not ok.any():
        return 0
    cost = np.where(ok, d, radius * (min(d.shape) + 1) + 1.0)
    r, c = linear_sum_assignment(cost)
    return int(ok[r, c].sum())


def precision_recall_f1(matched, predicted, annotated):
    """Micro-averaged localisation scores from totals of matched, predicted and annotated points."""
    precision = matched / predicted if predicted else 0.0
    recall = matched / annotated if annotated else 0.0
    return float(precision), float(recall), float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def object_radius_f1(predictions):
    """{"f1_object_radius": ..., "images_with_object_size": n} over predictions whose record has an object size."""
    if not predictions:
        return {"f1_object_radius": None, "images_with_object_size": 0}
    f1 = precision_recall_f1(sum(p["num_matched_on_object"] for p in predictions),
                             sum(p["pred_count"] for p in predictions), sum(p["gt_count"] for p in predictions))[2]
    return {"f1_object_radius": f1, "images_with_object_size": len(predictions)}


def count_metrics(predictions, train_mean_count=None):
    """Count error, localisation and stopping statistics of count_records' per-image predictions."""
    gt = np.array([p["gt_count"] for p in predictions], np.float64)
    pred = np.array([p["pred_count"] for p in predictions], np.float64)
    err = pred - gt
    precision, recall, f1 = precision_recall_f1(sum(p["num_matched"] for p in predictions), pred.sum(), gt.sum())
    n = len(predictions)
    near = [d for p in predictions for d in p.get("nearest_object_px", [])]
    radii = [p["match_radius_px"] for p in predictions if "match_radius_px" in p]
    m = {
        "num_images": n,
        "mae": float(np.abs(err).mean()) if n else None,
        "rmse": float(np.sqrt((err ** 2).mean())) if n else None,
        "mean_count_error": float(err.mean()) if n else None,  # > 0: over-counts
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_steps": float(np.mean([p["steps"] for p in predictions])) if n else None,
        # how far the counted points land from the nearest object, against the radius a match allows (model frame)
        "point_to_nearest_object_px_median": float(np.median(near)) if len(near) else None,
        "match_radius_px_mean": float(np.mean(radii)) if radii else None,
        # F1 with a match anywhere within the object's own radius (half its size) where the data gives a size: did
        # the point land on the object it counted, whatever the mark's size
        **object_radius_f1([p for p in predictions if p.get("num_matched_on_object") is not None]),
        "stop_reasons": {k: v for k, v in Counter(p["stop_reason"] for p in predictions).items()},
        "gt_count_mean": float(gt.mean()) if n else None,
        "pred_count_mean": float(pred.mean()) if n else None,
        "per_count_bin": counting.per_count_bin(predictions),
        "per_step": counting.per_step([p for p in predictions if "match_radius_px" in p]),
        "per_object_type": counting.per_group(predictions, lambda p: p["object_type"]),
    }
    if any("/" in p["image"] for p in predictions):  # OmniCount ids are <category>/<split>/<file>
        m["per_category"] = counting.per_group(predictions, lambda p: p["image"].split("/", 1)[0])
    if train_mean_count is not None:
        base = float(train_mean_count) - gt
        m["train_mean_count"] = float(train_mean_count)
        m["baseline_mean_count_mae"] = float(np.abs(base).mean()) if n else None
        m["baseline_mean_count_rmse"] = float(np.sqrt((base ** 2).mean())) if n else None
    return m


def _model_device(model):
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def protocol_settings(model, stop_rule=None, mark_style=None):
    """(stop_rule, mark_style): given, else the model's training config, else what the model has (a stop head, or
    the oracle: "head" and "auto"). A model without either record or head predates them: it stopped on (-1, -1) and
    drew numbered labels, and is counted so again."""
    cfg = getattr(model, "config", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    has_head = isinstance(model, counting.Oracle) or getattr(model, "done_head", None) is not None
    stop_rule = stop_rule or cfg.get("stop_rule") or ("head" if has_head else "coordinate")
    mark_style = mark_style or cfg.get("mark_style") or ("auto" if has_head else "numbers")
    return stop_rule, mark_style


def _data_settings(model, ordering, min_pixels, max_pixels):
    """Unset settings come from the model's recorded training config (regression_config.json), then the defaults."""
    cfg = getattr(model, "config", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    return (ordering or cfg.get("ordering") or "reading_order",
            int(min_pixels or cfg.get("min_pixels") or data.MIN_PIXELS),
            int(max_pixels or cfg.get("max_pixels") or data.MAX_PIXELS))


def _original_size(record):
    if record.width and record.height:
        return record.width, record.height
    return record.load_image().size


def _to_original_frame(points, record, model_size):
    """Pixel points of the model-input frame -> the frame of the image on disk (where annotations live)."""
    w, h = _original_size(record)
    return (np.asarray(points, np.float64).reshape(-1, 2) * [w / model_size[0], h / model_size[1]]).tolist()


# -----------------------------------------------------------------------------
# Sequential counting


def _start_counting(i, record, min_pixels, max_pixels, ordering):
    """The counting state of record i: its image loaded and resized once (as in training), nothing counted yet."""
    image, gt = data.prepare_image(record, min_pixels, max_pixels)
    w, h = image.size
    size = data.object_size_in(record, (w, h))
    return {"i": i, "key": i, "record": record, "clean": image, "marked": image, "size": (w, h),
            "gt": gt[utils.order_points(gt, ordering)] if len(gt) else gt, "points": [], "spec": None,
            "object_size": size, "scale": counting.protocol_scale([], size), "mark_radius": utils.mark_radius(w, h)}


def shift_offsets(shift_px):
    """(dx, dy) pixel moves of the image for one counting step: none, or with --tta_shift S the 3 x 3 grid of 0 and
    +-S along each axis (9 forward passes)."""
    s = int(shift_px or 0)
    return [(0, 0)] if s == 0 else [(dx, dy) for dy in (-s, 0, s) for dx in (-s, 0, s)]


def shift_image(image, dx, dy):
    """The PIL image moved dx px right and dy px down, the same size, the uncovered border repeating the edge."""
    if dx == 0 and dy == 0:
        return image
    from PIL import Image

    a = np.asarray(image)
    h, w = a.shape[:2]
    padded = np.pad(a, ((max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0)), (0, 0)), mode="edge")
    return Image.fromarray(padded[max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w])


def _forward(model, processor, images, active, ordering, device):
    """(normalized (B, 2) points, (B,) stop probabilities or None) of the model on these images of the states."""
    batch = encode_batch(processor, images, [s["record"].object_type for s in active],
                         [len(s["points"]) for s in active], ordering)
    pred = model(**{k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()
    return pred[:, :2], (1 / (1 + np.exp(-pred[:, 2])) if pred.shape[1] == 3 else None)


def _predict(model, processor, active, ordering, device, tta_shift=0):
    """(normalized (B, 2) points, (B,) stop probabilities or None) of the model, or of counting.Oracle, for the
    active counting states. With tta_shift, each state is predicted on its image moved by each of shift_offsets
    (the ViT's patch grid then falls elsewhere on the objects) and each point moved back; the point is the median of
    their largest group within the image's mark radius (utils.densest_point: where the moves disagree on which object
    is next, the majority's), the stop probability their mean."""
    if isinstance(model, counting.Oracle):
        return model.predict(active)
    if not tta_shift:
        return _forward(model, processor, [s["marked"] for s in active], active, ordering, device)
    xy, p_done = [], []
    for dx, dy in shift_offsets(tta_shift):
        moved = [shift_image(s["marked"], dx, dy) for s in active]
        points, p = _forward(model, processor, moved, active, ordering, device)
        xy.append([utils.denormalize_points(q, *s["size"])[0] - (dx, dy) for q, s in zip(points, active)])
        p_done.append(p)
    xy = np.asarray(xy, np.float64)  # (moves, B, 2) pixels
    xy = np.stack([utils.densest_point(xy[:, j], s["mark_radius"]) for j, s in enumerate(active)])
    points = np.stack([utils.normalize_points(q, *s["size"])[0] for q, s in zip(xy, active)])
    return points, (None if p_done[0] is None else np.mean(p_done, axis=0))


def _repeat_radius(s, protocol):
    """The repeat rule's radius for state s: fixed by the caller, the mark radius under the coordinate rule (as
    the original protocol), else counting.repeat_radius of the protocol's scale."""
    if protocol["repeat_radius"] is not None:
        return protocol["repeat_radius"]
    if protocol["stop_rule"] == "coordinate":
        return s["mark_radius"]
    return counting.repeat_radius(s["scale"])


def _remark(s, protocol):
    """Mark the counted points as training draws them: only the new mark is pasted while the marks' style and size
    stay the same (later marks cover earlier ones, so this equals drawing all at once); all are redrawn on the clean
    image when the scale changes them. The scale of the counted points is computed here, once per counted point,
    and kept for the next step's repeat rule."""
    w, h = s["size"]
    pts, k = np.asarray(s["points"], np.float64).reshape(-1, 2), len(s["points"])
    s["scale"] = counting.protocol_scale(pts, s["object_size"])
    spec = counting.mark_spec(s["scale"], w, h, k, protocol["mark_style"])
    if spec == s["spec"]:
        s["marked"] = counting.draw_marks(s["marked"], pts[-1:], spec, start_index=k)
    else:
        s["marked"], s["spec"] = counting.draw_marks(s["clean"], pts, spec), spec


def _count_step(s, xy_norm, p_done, protocol, max_steps):
    """Take one prediction for counting state s: why counting stops, or None after counting and marking it."""
    s["steps"] = len(s["points"]) + 1
    w, h = s["size"]
    reason = stop_reason(xy_norm, p_done, s["points"], w, h, _repeat_radius(s, protocol), protocol["done_threshold"])
    if reason is None:
        s["points"].append(utils.denormalize_points(xy_norm, w, h)[0].astype(np.float64))
        _remark(s, protocol)
        if len(s["points"]) >= max_steps:
            reason = "max_steps"
    return reason


def _count_result(s, reason, match_radius):
    """The prediction of a finished counting state, its points in the frame of the image on disk."""
    rec, pts = s["record"], np.asarray(s["points"], np.float64).reshape(-1, 2)
    radius = match_radius if match_radius is not None else s["mark_radius"]
    d = pairwise_distances(pts, s["gt"])  # one matrix for both matchings and the nearest-object distances
    nearest = d.min(1) if d.size else np.zeros(0)
    return {"image": rec.image_id, "object_type": rec.object_type, "gt_count": int(len(rec.points)),
            "pred_count": int(len(pts)), "stop_reason": reason, "steps": s["steps"],
            "num_matched": matches_within(d, radius), "match_radius_px": float(radius),
            "num_matched_on_object": None if not s["object_size"] else matches_within(d, s["object_size"] / 2),
            "nearest_object_px": [round(float(x), 2) for x in nearest],
            "points": _to_original_frame(pts, rec, s["size"])}


@torch.no_grad()
def count_records(model, processor, records, *, ordering=None, min_pixels=None, max_pixels=None, batch_size=8,
                  stop_radius=None, max_steps=None, match_radius=None, train_mean_count=None,
                  done_threshold=DONE_THRESHOLD, stop_rule=None, mark_style=None, tta_shift=0, progress=False):
    """Count the objects of each record one at a time: {"metrics": {...}, "predictions": [one dict per record]}.

    model: a VLMRegressionModel, or counting.Oracle (then processor is unused). Up to batch_size images advance
    together, one forward pass per step; an image that stops leaves the batch and the next record takes its place.
    stop_rule/mark_style None = the model's training config (counting.py explains the protocol); stop_radius (the
    repeat rule's radius) None = from the protocol's scale; match_radius None = the image's mark radius
    (utils.mark_radius). Distances are pixels of the model-input frame; reported points are in the original frame.
    ordering/min_pixels/max_pixels None = the model's training config. tta_shift PX > 0: each step predicts on the
    image moved by 0 and +-PX px (9 forward passes) and counts the point most of them agree on (_predict).
    """
    ordering, min_pixels, max_pixels = _data_settings(model, ordering, min_pixels, max_pixels)
    stop_rule, mark_style = protocol_settings(model, stop_rule, mark_style)
    protocol = {"stop_rule": stop_rule, "mark_style": mark_style, "done_threshold": done_threshold,
                "repeat_radius": stop_radius}
    max_steps = int(max_steps) if max_steps else default_max_steps(records)
    device, passes = _model_device(model), len(shift_offsets(tta_shift))  # passes: forward passes per step
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
        if stop_rule == "head" and getattr(model, "done_head", None) is None:
            raise ValueError("--stop_rule head needs a model trained with a stop head (this one stops on (-1, -1): "
                             "use --stop_rule coordinate)")
    queue = iter(enumerate(records))
    active, results, skipped, forwards = [], [None] * len(records), 0, 0
    bar = tqdm(total=len(records), desc="counting", unit="img", disable=not progress, dynamic_ncols=True,
               mininterval=1 if sys.stderr.isatty() else 30, file=sys.stderr)
    t0 = time.time()

    def admit():
        nonlocal skipped
        while len(active) < batch_size and (nxt := next(queue, None)) is not None:
            i, rec = nxt
            try:
                active.append(_start_counting(i, rec, min_pixels, max_pixels, ordering))
            except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for missing/corrupt/truncated files
                warnings.warn(f"{rec.image_path or rec.image_id}: unreadable image ({e}); not evaluated")
                skipped += 1
                bar.update(1)

    try:
        admit()
        while active:
            xy, p_done = _predict(model, processor, active, ordering, device, tta_shift)
            if stop_rule == "coordinate":
                p_done = None
            forwards += len(active) * passes
            still = []
            for j, s in enumerate(active):
                reason = _count_step(s, xy[j], None if p_done is None else float(p_done[j]), protocol, max_steps)
                if reason:
                    results[s["i"]] = _count_result(s, reason, match_radius)
                    bar.update(1)
                else:
                    still.append(s)
            active[:] = still
            admit()
    finally:
        bar.close()
        if was_training:
            model.train()
    seconds = time.time() - t0
    predictions = [r for r in results if r is not None]
    metrics = count_metrics(predictions, train_mean_count)
    counted = sum(p["pred_count"] for p in predictions)
    metrics.update(
        images_per_s=len(predictions) / seconds if seconds > 0 else None, seconds=seconds, forward_passes=forwards,
        forwards_per_counted_object=forwards / counted if counted else None, skipped_images=skipped,
        settings={"ordering": ordering, "min_pixels": min_pixels, "max_pixels": max_pixels, "batch_size": batch_size,
                  "max_steps": max_steps, "stop_rule": stop_rule, "mark_style": mark_style,
                  "done_threshold": done_threshold if stop_rule == "head" else None, "tta_shift": tta_shift,
                  "repeat_radius": "protocol scale" if stop_radius is None else stop_radius,
                  "match_radius": "mark radius" if match_radius is None else match_radius})
    return {"metrics": metrics, "predictions": predictions}


# -----------------------------------------------------------------------------
# Teacher-forced next point: k ground-truth objects marked, where does the model point?


@torch.no_grad()
def next_point_records(model, processor, records, *, ordering=None, min_pixels=None, max_pixels=None, batch_size=8,
                       match_radius=None, seed=0, progress=False):
    """One sample per record, built exactly like validation (dataset.CountingDataset: k ~ U{0..N-1} objects marked
    in `ordering`, seeded by `seed`). Reports the pixel error to the ordering's next object and the rate at which the
    prediction lands on *any* unmarked object (within match_radius; None = the mark radius): the ordering is
    ambiguous, landing on an uncounted object is what counting needs. Also the rate of landing on a marked one."""
    ordering, min_pixels, max_pixels = _data_settings(model, ordering, min_pixels, max_pixels)
    ds = data.CountingDataset(records, ordering, min_pixels, max_pixels, done_fraction=0.0, seed=seed)
    collate = data.make_collate_fn(processor, ordering)
    device = _model_device(model)
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    by_key = {(r.image_id, r.object_type): r for r in records}
    predictions, t0 = [], time.time()
    try:
        for start in tqdm(range(0, len(ds), batch_size), desc="next point", disable=not progress, dynamic_ncols=True,
                          file=sys.stderr):
            samples = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
            batch = {k: v.to(device) for k, v in collate(samples).items()}
            pred = model(**batch).float().cpu().numpy()[:, :2]
            for s, p in zip(samples, pred):
                w, h = s.image.size
                k = s.num_marked
                xy = utils.denormalize_points(p, w, h)[0].astype(np.float64)
                dist = np.linalg.norm(s.points.astype(np.float64) - xy, axis=1)
                radius = match_radius if match_radius is not None else utils.mark_radius(w, h)
                rec = by_key[(s.image_id, s.object_type)]
                predictions.append({
                    "image": s.image_id, "object_type": s.object_type, "gt_count": int(len(s.points)),
                    "num_marked": k, "pixel_error": float(dist[k]),
                    "hit_unmarked": bool(dist[k:].min() <= radius), "hit_target": bool(dist[k] <= radius),
                    "hit_marked": bool(k > 0 and dist[:k].min() <= radius),
                    "target": _to_original_frame(s.points[k], rec, (w, h))[0],
                    "pred": _to_original_frame(xy, rec, (w, h))[0]})
    finally:
        if was_training:
            model.train()
    seconds = time.time() - t0
    err = np.array([p["pixel_error"] for p in predictions])
    rate = lambda key: float(np.mean([p[key] for p in predictions])) if predictions else None  # noqa: E731
    metrics = {"num_samples": len(predictions),
               "pixel_error": float(err.mean()) if len(err) else None,
               "median_pixel_error": float(np.median(err)) if len(err) else None,
               "hit_rate_unmarked": rate("hit_unmarked"), "hit_rate_target": rate("hit_target"),
               "hit_rate_marked": rate("hit_marked"),
               "samples_per_s": len(predictions) / seconds if seconds > 0 else None, "seconds": seconds,
               "settings": {"ordering": ordering, "min_pixels": min_pixels, "max_pixels": max_pixels, "seed": seed,
                            "match_radius": "mark radius" if match_radius is None else match_radius}}
    return {"metrics": metrics, "predictions": predictions}


# -----------------------------------------------------------------------------
# Counting your own images: no annotation, the same counting loop

# Most objects counted on an image without annotations (where evaluation sizes max_steps on the ground truth): above
# FSC-147's largest count (3,731), so a model that stops by itself is never cut short.
IMAGES_MAX_STEPS = 4000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class ImageRecord(data.CountingRecord):
    """A record of an image without annotation: a file, or a PIL image in memory (`pil`). Loaded upright (EXIF
    orientation applied, as a viewer shows it), so the counted points are in the frame a user sees."""
    pil: object = None

    def load_image(self):
        from PIL import Image, ImageOps

        if self.pil is not None:
            image = self.pil.convert("RGB")
        else:
            with Image.open(self.image_path) as im:
                image = ImageOps.exif_transpose(im).convert("RGB")  # convert() decodes: truncation fails here
        self.width, self.height = image.size
        return image


def image_record(image, object_name, key=0):
    """An ImageRecord for a path or a PIL image; its image_id is `key`."""
    pil = None if isinstance(image, (str, os.PathLike)) else image
    return ImageRecord(str(key), object_name, np.zeros((0, 2), np.float32),
                       image_path=None if pil is not None else os.fspath(image), pil=pil)


def count_images(model, processor, images, object_name, *, batch_size=8, max_steps=None, **protocol):
    """Count `object_name` (as the prompt names classes: 'eggs' or 'egg') on each image (path or PIL image), step by
    step exactly as count_records does: one dict per image, {"count", "points" (pixels of the image, upright),
    "stop_reason", "steps"}, or {"error": why} for an image that cannot be read. protocol: count_records' settings
    (ordering, min_pixels, max_pixels, stop_radius, done_threshold, stop_rule, mark_style, tta_shift); max_steps
    defaults to IMAGES_MAX_STEPS."""
    records = [image_record(im, object_name, i) for i, im in enumerate(images)]
    with warnings.catch_warnings(record=True) as caught:  # count_records warns per unreadable image: say it here
        warnings.simplefilter("always")
        out = count_records(model, processor, records, batch_size=batch_size,
                            max_steps=max_steps or IMAGES_MAX_STEPS, **protocol)
    unreadable = [str(w.message) for w in caught if "unreadable image" in str(w.message)]
    for w in caught:
        if str(w.message) not in unreadable:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    by_id = {p["image"]: p for p in out["predictions"]}
    results = []
    for rec in records:
        p = by_id.get(rec.image_id)
        if p is None:
            why = next((m for m in unreadable if m.startswith(f"{rec.image_path}: ")), "unreadable image")
            results.append({"error": why.split(": ", 1)[-1].replace("; not evaluated", "")})
        else:
            results.append({"count": p["pred_count"], "points": p["points"], "stop_reason": p["stop_reason"],
                            "steps": p["steps"]})
    return results


def count_image(model, processor, image, object_name, **protocol):
    """Count `object_name` on one image (a path or a PIL image): {"count", "points", "stop_reason", "steps"}, points
    in pixels of the image. Raises OSError for an image that cannot be read. See count_images."""
    result = count_images(model, processor, [image], object_name, batch_size=1, **protocol)[0]
    if "error" in result:
        raise OSError(f"{image if isinstance(image, (str, os.PathLike)) else 'image'}: {result['error']}")
    return result


def image_paths(paths):
    """The files to count: each file as given, and each folder's image files (IMAGE_EXTENSIONS), sorted."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            out += sorted(os.path.join(path, f) for f in os.listdir(path)
                          if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f)))
        else:
            out.append(path)
    return list(dict.fromkeys(out))


def count_images_main(args, model, processor):
    """--images: count each image, print a line per image, write counts.json and a PNG of the marks per image."""
    from prompt import object_names

    paths = image_paths(args.images)
    if not paths:
        sys.exit(f"error: no image files in {' '.join(args.images)}")
    stop_rule, mark_style = protocol_settings(model, args.stop_rule, args.mark_style)
    results = count_images(model, processor, paths, args.object, batch_size=args.batch_size,
                           max_steps=args.max_steps, ordering=args.ordering, min_pixels=args.min_pixels,
                           max_pixels=args.max_pixels, stop_radius=args.stop_radius,
                           done_threshold=args.done_threshold, stop_rule=stop_rule, mark_style=mark_style,
                           tta_shift=args.tta_shift)
    os.makedirs(os.path.join(args.output_dir, "marks"), exist_ok=True)
    counts, plural = {}, object_names(args.object)[1]
    for n, (path, r) in enumerate(zip(paths, results)):
        if "error" in r:
            print(f"{path}: skipped, {r['error']}", file=sys.stderr)
            continue
        png = os.path.join("marks", f"{n:03d}_{_safe_name(os.path.basename(path))}.png")
        marked = marks_as_counted(image_record(path, args.object), r["points"], args.min_pixels, args.max_pixels,
                                  mark_style)[0]
        utils.add_caption(marked, f"{os.path.basename(path)}: {r['count']} {plural} (stop: {r['stop_reason']})").save(
            os.path.join(args.output_dir, png))
        counts[path] = dict(r, marks=png)
        print(f"{path}: {r['count']} {plural} (stop: {r['stop_reason']}, {r['steps']} steps)")
    utils.write_text_atomic(os.path.join(args.output_dir, "counts.json"), json.dumps(counts, indent=2) + "\n")
    print(f"wrote {args.output_dir}/counts.json and marks/ ({len(counts)} of {len(paths)} images counted)",
          file=sys.stderr)
    return counts


# -----------------------------------------------------------------------------
# Visualisations


def marks_as_counted(record, points, min_pixels, max_pixels, mark_style="auto"):
    """(the image as the model last saw it: resized to the model-input frame, the counted points (pixels of the image
    file) marked as the protocol draws them; the unmarked image; its ground truth in that frame)."""
    image, gt = data.prepare_image(record, min_pixels, max_pixels)
    w0, h0 = _original_size(record)
    pts = np.asarray(points, np.float64).reshape(-1, 2) * [image.width / w0, image.height / h0]
    scale = counting.protocol_scale(pts, data.object_size_in(record, image.size))
    return counting.draw_marks(image, pts, counting.mark_spec(scale, *image.size, len(pts), mark_style)), image, gt


def count_visualisation(record, prediction, min_pixels, max_pixels, ordering=None, mark_style="auto"):
    """(final marks as the model last saw them | ground truth as green circles), counts in the caption."""
    marked, image, gt = marks_as_counted(record, prediction["points"], min_pixels, max_pixels, mark_style)
    truth = image
    for g in gt:
        truth = utils.draw_prediction(truth, None, g)
    panel = utils.side_by_side(marked, truth)
    return utils.add_caption(panel, f"{record.image_id} | {record.object_type}: predicted {prediction['pred_count']}"
                                    f", ground truth {prediction['gt_count']} (stop: {prediction['stop_reason']})")


def next_point_visualisation(record, prediction, min_pixels, max_pixels, ordering="reading_order"):
    """(input as marked | prediction as a red cross, the ordering's next object as a green circle)."""
    image, gt = data.prepare_image(record, min_pixels, max_pixels)
    w0, h0 = _original_size(record)
    scale = np.array([image.width / w0, image.height / h0])
    marked = utils.mark_objects(image, gt[utils.order_points(gt, ordering)][: prediction["num_marked"]])
    drawn = utils.draw_prediction(marked, np.array(prediction["pred"]) * scale, np.array(prediction["target"]) * scale)
    return utils.add_caption(utils.side_by_side(marked, drawn),
                             f"{record.image_id} | {record.object_type}: {prediction['num_marked']} marked, error "
                             f"{prediction['pixel_error']:.1f} px, on an unmarked object: {prediction['hit_unmarked']}")


# -----------------------------------------------------------------------------
# CLI: checkpoint and arguments, files


def resolve_checkpoint(path):
    """(checkpoint folder, run dir or None) for a checkpoint folder, checkpoints/best|last, or a run dir."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint folder or run dir")
    if os.path.isfile(os.path.join(path, "regression_config.json")):
        ckpt = path
    else:
        ckpt = next((os.path.join(path, "checkpoints", n) for n in ("best", "last")
                     if os.path.isfile(os.path.join(path, "checkpoints", n, "regression_config.json"))), None)
        if ckpt is None:
            raise FileNotFoundError(f"{path}: neither a checkpoint (regression_config.json) nor a run dir with "
                                    f"checkpoints/best or checkpoints/last")
    # <run>/checkpoints/<best|last|step-N>: the run dir is two levels up (symlinks resolve to the same place)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    return ckpt, run_dir if os.path.isfile(os.path.join(run_dir, "config.json")) else None


# Inherited from the run's config.json. Not min/max_objects: a test set is not filtered by a training budget.
RUN_DATA_KEYS = ("dataset", "data_root", "categories", "object_types", "seed", "train_split", "annotation_file",
                 "synthetic_image_size", "synthetic_min_count", "synthetic_max_count", "synthetic_num_train",
                 "synthetic_num_val", "synthetic_num_test", "synthetic_distractor_types", "synthetic_min_radius",
                 "synthetic_max_radius", "synthetic_background")
# Inherited from the checkpoint's regression_config.json: how the model was trained to see and stop.
MODEL_PROTOCOL_KEYS = ("ordering", "min_pixels", "max_pixels", "mark_style", "stop_rule")
DATASET_SPECIFIC_KEYS = ("data_root", "categories", "object_types", "train_split")


def checkpoint_defaults(ckpt, run_dir, dataset=None):
    """Argument defaults recorded by training: the run's data arguments, the checkpoint's ordering and pixel bounds.
    When the user picks another --dataset, the run's dataset-specific ones (data_root, ...) do not apply."""
    out = {}
    # an export (model_vlm_regression.py --export) carries its run's config.json as training_config.json
    run_config = os.path.join(run_dir, "config.json") if run_dir else os.path.join(ckpt, mvr.TRAINING_CONFIG)
    if os.path.isfile(run_config):
        with open(run_config) as f:
            run = json.load(f)
        out = {k: run[k] for k in RUN_DATA_KEYS + ("ordering", "min_pixels", "max_pixels") if k in run}
        if dataset and dataset != run.get("dataset"):
            out = {k: v for k, v in out.items() if k not in DATASET_SPECIFIC_KEYS}
    with open(os.path.join(ckpt, "regression_config.json")) as f:
        reg = json.load(f)
    out.update({k: reg[k] for k in MODEL_PROTOCOL_KEYS if reg.get(k)})
    if "stop_rule" not in reg:  # trained before the stop head: its original protocol
        out.update(stop_rule="coordinate", mark_style="numbers")
    return out


def check_args(p, args):
    """argparse-style one-line errors (exit 2) for values no evaluation can use."""
    data.check_data_args(p, args)
    for name, low in (("batch_size", 1), ("num_images", 0), ("max_steps", 1), ("num_vis", 0), ("tta_shift", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name} must be >= {low}, got {value}")
    if not 0 < args.done_threshold < 1:
        p.error(f"--done_threshold must be in (0, 1), got {args.done_threshold}")
    if not (math.isfinite(args.oracle_noise_px) and args.oracle_noise_px >= 0):
        p.error(f"--oracle_noise_px must be >= 0, got {args.oracle_noise_px}")
    for name in ("stop_radius", "match_radius"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            p.error(f"--{name} must be > 0, got {value}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- Checkpoint and data
    p.add_argument("--checkpoint", default=None, help="checkpoints/best|last, a step-N folder, or a run dir")
    p.add_argument("--oracle", action="store_true",
                   help="count with a scripted perfect model instead of a checkpoint (the protocol's own error)")
    p.add_argument("--oracle_noise_px", type=float, default=0.0,
                   help="--oracle: Gaussian noise of this many px added to each coordinate of its points")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH",
                   help="count these image files, or every image file in these folders, instead of a dataset split "
                        "(no annotation: counts.json and marks/, no metrics; the data arguments do not apply)")
    p.add_argument("--object", default=None, help="--images: what to count, as the prompt names it ('eggs', 'egg')")
    p.add_argument("--split", default="test", help="split to evaluate (val/valid, test, train)")
    p.add_argument("--train_split", default="train", help="split whose mean count is the baseline")
    p.add_argument("--num_images", type=int, default=0, help="evaluate the split's first N records; 0 = all")
    p.add_argument("--seed", type=int, default=42, help="synthetic data seed (default: the run's); next_point's k")
    data.add_data_args(p)
    # ---- Counting
    p.add_argument("--mode", default="count", choices=("count", "next_point"),
                   help="count: sequential counting; next_point: teacher-forced next-point error")
    p.add_argument("--batch_size", type=int, default=8, help="images advancing together")
    p.add_argument("--stop_radius", type=float, default=None,
                   help="stop ('repeat') when a prediction is this close (model-input px) to a counted object; "
                        "default: half the protocol's scale (counting.py; the mark radius under --stop_rule "
                        "coordinate)")
    p.add_argument("--stop_rule", default=None, choices=mvr.STOP_RULES,
                   help="default: the checkpoint's (head with a stop head; coordinate for runs trained before it)")
    p.add_argument("--max_steps", type=int, default=None,
                   help="most objects counted per image; default: 2 x the largest ground-truth count + 5, at most "
                        f"{MAX_STEPS_CAP}")
    p.add_argument("--done_threshold", type=float, default=DONE_THRESHOLD,
                   help="the stop head's probability above which all objects count as marked")
    p.add_argument("--tta_shift", type=int, default=0, metavar="PX",
                   help="test-time shifts: predict each step on the image moved by 0 and +-PX px along each axis "
                        "(9 forward passes) and combine the points (0 = off; 8 = half the ViT's 16-px patch)")
    p.add_argument("--match_radius", type=float, default=None,
                   help="a predicted point within this many model-input px of an object localises it; default: the "
                        "mark radius")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    # ---- Outputs
    p.add_argument("--output_dir", default=None, help="default: <run dir>/eval/<dataset>-<split>[-next_point]")
    p.add_argument("--num_vis", type=int, default=8, help="visualisations written for the first N records")
    p.add_argument("--wandb_mode", default="disabled", choices=("online", "offline", "disabled"),
                   help="log the metrics and visualisations to W&B")
    p.add_argument("--wandb_project", default="vlm-sequential-counting", help="W&B project")
    p.set_defaults(dataset=None, mark_style=None)  # None = not given: the run's
    first, _ = p.parse_known_args(argv)
    if first.oracle == bool(first.checkpoint):
        p.error("give --checkpoint, or --oracle to count with a scripted perfect model")
    ckpt, run_dir = resolve_checkpoint(first.checkpoint) if first.checkpoint else (None, None)
    if ckpt:
        p.set_defaults(**checkpoint_defaults(ckpt, run_dir, first.dataset))
    args = p.parse_args(argv)
    check_args(p, args)
    args.mark_style = args.mark_style or "auto"
    if args.oracle and args.mode != "count":
        p.error("--oracle counts (--mode count)")
    if bool(args.images) != bool(args.object):
        p.error("--images and --object go together")
    if args.images:
        if args.oracle or args.mode != "count":
            p.error("--images counts with a checkpoint (no --oracle, --mode count)")
        args.checkpoint_dir, args.run_dir = ckpt, run_dir
        args.output_dir = args.output_dir or os.path.join(run_dir or ckpt, "counts", _safe_name(args.object))
        return args
    args.dataset = args.dataset or "synthetic"
    args.checkpoint_dir, args.run_dir = ckpt, run_dir
    if args.dataset != "synthetic" and not args.data_root:
        p.error(f"--data_root is required for --dataset {args.dataset}")
    if args.output_dir is None:
        if args.oracle:
            p.error("--oracle needs --output_dir")
        suffix = "-next_point" if args.mode == "next_point" else ""
        args.output_dir = os.path.join(run_dir or ckpt, "eval", f"{args.dataset}-{args.split}{suffix}")
    return args


def load_checkpoint(args, device):
    """(model, processor) of --checkpoint, the processor set to the pixel bounds the images are resized to."""
    model, processor = mvr.VLMRegressionModel.from_pretrained(args.checkpoint_dir, device=device)
    # our images arrive at model_input_size for these bounds, so the processor must not resize them again
    processor.image_processor.size = dict(processor.image_processor.size, shortest_edge=args.min_pixels,
                                          longest_edge=args.max_pixels)
    return model, processor


def _safe_name(s):
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)[-60:]


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        utils.keep_freed_memory()
    if args.images:
        print(f"counting {args.object} with {os.path.realpath(args.checkpoint_dir)}, device {device}",
              file=sys.stderr)
        return count_images_main(args, *load_checkpoint(args, device))
    try:
        records, _ = data.records_from_args(args, args.split)
        train_records = data.records_from_args(args, args.train_split)[0] if args.mode == "count" else []
    except data.DataError as e:
        sys.exit(f"error: {e}")
    records = records[: args.num_images] if args.num_images else records
    if not records:
        sys.exit(f"error: no records in {args.dataset} split {args.split!r}")
    if args.oracle:
        model, processor = counting.Oracle(args.oracle_noise_px, args.seed), None
    else:
        model, processor = load_checkpoint(args, device)
    source = "the oracle" if args.oracle else os.path.realpath(args.checkpoint_dir)
    print(f"evaluating {source} on {args.dataset} {args.split}: {len(records)} records, mode {args.mode}, device "
          f"{device}", file=sys.stderr)
    kw = dict(ordering=args.ordering, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
              batch_size=args.batch_size, match_radius=args.match_radius, progress=True)
    if args.mode == "count":
        train_mean = float(np.mean([len(r.points) for r in train_records])) if train_records else None
        out = count_records(model, processor, records, stop_radius=args.stop_radius, max_steps=args.max_steps,
                            train_mean_count=train_mean, done_threshold=args.done_threshold,
                            stop_rule=args.stop_rule, mark_style=args.mark_style, tta_shift=args.tta_shift, **kw)
        draw = functools.partial(count_visualisation, mark_style=out["metrics"]["settings"]["mark_style"])
    else:
        out = next_point_records(model, processor, records, seed=args.seed + 1, **kw)  # +1: training's val seed
        draw = next_point_visualisation
    metrics = dict(out["metrics"], mode=args.mode, dataset=args.dataset, split=args.split,
                   checkpoint=None if args.oracle else os.path.realpath(args.checkpoint_dir),
                   oracle={"noise_px": args.oracle_noise_px} if args.oracle else None)

    os.makedirs(os.path.join(args.output_dir, "vis"), exist_ok=True)
    utils.write_text_atomic(os.path.join(args.output_dir, "predictions.jsonl"),
                            "".join(json.dumps(p) + "\n" for p in out["predictions"]))
    utils.write_text_atomic(os.path.join(args.output_dir, "metrics.json"), json.dumps(metrics, indent=2) + "\n")
    by_key = {(r.image_id, r.object_type): r for r in records}
    images = []
    for n, p in enumerate(out["predictions"][: args.num_vis]):
        im = draw(by_key[(p["image"], p["object_type"])], p, args.min_pixels, args.max_pixels, args.ordering)
        im.save(os.path.join(args.output_dir, "vis", f"{n:03d}_{_safe_name(p['image'])}.png"))
        images.append((im, f"{p['image']} {p['object_type']}"))
    if args.wandb_mode != "disabled":
        import wandb

        run = wandb.init(project=args.wandb_project, mode=args.wandb_mode, dir=args.output_dir, job_type="eval",
                         config={k: v for k, v in vars(args).items() if not k.startswith("_")})
        run.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
        run.log({"eval/images": [wandb.Image(im, caption=c) for im, c in images]})
        run.finish()

    print(summary_line(metrics))
    print(f"wrote {args.output_dir}/metrics.json, predictions.jsonl, vis/ ({len(images)} images)", file=sys.stderr)
    return metrics


def summary_line(m):
    if m["mode"] == "next_point":
        return (f"next point on {m['num_samples']} samples: error {m['pixel_error']:.1f} px (median "
                f"{m['median_pixel_error']:.1f}), lands on an unmarked object {m['hit_rate_unmarked']:.1%}, on the "
                f"ordering's next {m['hit_rate_target']:.1%}, on a marked one {m['hit_rate_marked']:.1%}; "
                f"{m['samples_per_s']:.2f} samples/s")
    base = (f" (mean-count baseline MAE {m['baseline_mean_count_mae']:.3f}, RMSE {m['baseline_mean_count_rmse']:.3f})"
            if m.get("baseline_mean_count_mae") is not None else "")
    fpo = m["forwards_per_counted_object"]
    bins = "; ".join(f"{b}: {s['num_images']} images MAE {s['mae']:.2f} RMSE {s['rmse']:.2f} signed "
                     f"{s['mean_signed_error']:+.2f}" for b, s in m.get("per_count_bin", {}).items() if s["num_images"])
    return (f"{m['num_images']} images: count MAE {m['mae']:.3f}, RMSE {m['rmse']:.3f}{base}; localisation P "
            f"{m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f}; stops {m['stop_reasons']}; mean steps "
            f"{m['mean_steps']:.2f}; {m['images_per_s']:.2f} images/s, "
            f"{'n/a' if fpo is None else f'{fpo:.2f}'} forward passes per counted object"
            + (f"\nby ground-truth count: {bins}" if bins else ""))


if __name__ == "__main__":
    main()
