"""
The counting protocol, model-free: how big the marks are, when a prediction repeats a counted object, a perfect
model to measure the protocol with (the oracle), and the count metrics per count range.

Everything here is numpy in, numpy out, so training (dataset.CountingDataset), evaluation
(evaluate_vlm_regression.count_records) and the statistics (dataset.py --stats) share one definition.

The protocol's scale is one length per image, in pixels of the model-input frame:
    scale = min(object size, spacing of the points marked so far)
object size comes from the data where it gives one (FSC-147's exemplar boxes, OmniCount's boxes, the synthetic
objects' radii); spacing is a low percentile of the marked points' nearest-neighbour distances, which needs two
marked points. With neither, the scale is unknown: marks are drawn at the image's default label size and no
prediction counts as a repeat (the stop head decides). Training and evaluation compute it the same way: training
from the ground-truth points it has marked, evaluation from the points it has counted.
"""

import numpy as np

import utils

MARK_STYLES = ("auto", "numbers", "dots")
STOP_RULES = ("head", "coordinate")
# Percentile of the marked points' nearest-neighbour distances used as their spacing: low, so that the spacing is
# that of the closest objects (a mark or a repeat radius sized on it never reaches a neighbour), but not the
# minimum, so one model-made duplicate does not collapse it. On hard-core random layouts (centres >= d apart, the
# oracle tests) the 10th percentile is 1.0-1.3 d once a few dozen points are marked.
SPACING_PERCENTILE = 10
# A prediction within REPEAT_FRACTION x scale of a counted point repeats it. Half the spacing is the largest radius
# that cannot reach a neighbouring object's centre on a grid; the noiseless oracle is never stopped on grids or
# dense random layouts (tests/test_counting.py), and with 1 px noise not at 12 px spacing.
REPEAT_FRACTION = 0.5
# A numbered label must fit in LABEL_FRACTION x scale (its half-width, capsule included), so it never covers the
# centre of a neighbour at the spacing; labels are never drawn smaller than MIN_LABEL_RADIUS (two digits stop being
# legible at the tiny model's resolution below ~6 px) nor larger than utils.mark_radius (the original size).
LABEL_FRACTION = 0.5
MIN_LABEL_RADIUS = 6
# Where no label fits, a dot of DOT_FRACTION x scale (at least 1 px): a dot 0.3 x the spacing leaves 0.7 x the
# spacing uncovered around every neighbour. The prompt says how many objects are marked, so no number is lost.
DOT_FRACTION = 0.3
COUNT_BINS = ((1, 10), (11, 50), (51, 150), (151, 500), (501, None))  # the ranges FSC-147 papers discuss


# -----------------------------------------------------------------------------
# scale, repeat rule, marks


def spacing(points):
    """The SPACING_PERCENTILE-th percentile of the points' nearest-neighbour distances (pixels), or None for < 2
    points. Coincident points count as distance 0 (a duplicate makes the spacing small, never undefined)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if len(pts) < 2:
        return None
    from scipy.spatial import cKDTree

    d, _ = cKDTree(pts).query(pts, k=2)
    return float(np.percentile(d[:, 1], SPACING_PERCENTILE))


def protocol_scale(marked, object_size=None):
    """min(object_size, spacing(marked)) over those that are known; None when neither is."""
    known = [s for s in (object_size, spacing(marked)) if s is not None and np.isfinite(s) and s > 0]
    return float(min(known)) if known else None


def repeat_radius(scale):
    """Pixels within which a prediction repeats a counted point; None (no repeat rule) when the scale is unknown."""
    return None if scale is None else REPEAT_FRACTION * scale


def mark_spec(scale, width, height, last_index, style="auto"):
    """("numbers", radius) or ("dots", radius) for marking labels 1..last_index on an image of this size.

    numbers: the original labels at utils.mark_radius, whatever the density. dots: dots sized on the scale.
    auto: the largest label radius <= utils.mark_radius whose label (last_index's digits) fits the scale, so
    sparse images are marked exactly as with `numbers`; dots where no label of at least MIN_LABEL_RADIUS fits."""
    if style not in MARK_STYLES:
        raise ValueError(f"unknown mark style {style!r}; choose from {MARK_STYLES}")
    full = utils.mark_radius(width, height)
    if style == "numbers":
        return "numbers", full
    if style == "auto":
        if scale is None:
            return "numbers", full
        digits = len(str(max(1, int(last_index))))
        for r in range(full, MIN_LABEL_RADIUS - 1, -1):
            if utils.label_half_width(r, digits) <= LABEL_FRACTION * scale:
                return "numbers", r
    if scale is None:
        return "dots", max(1, full // 3)
    return "dots", int(np.clip(round(DOT_FRACTION * scale), 1, full))


def draw_marks(image, points, spec, start_index=1):
    """A copy of the PIL image with points (N, 2) marked start_index.. in the style of mark_spec's spec."""
    kind, radius = spec
    return utils.mark_objects(image, points, start_index=start_index, radius=radius, dots=kind == "dots")


def hidden_share(points, order, marks_per_target, object_size, width, height, style="auto"):
    """Fraction of targets whose pixel lies under a mark of the objects counted before them.

    points (N, 2) pixels; order: counting order; marks_per_target: the k values to check (k objects marked, target
    = object k in the order). Marks are laid out exactly as training draws them (mark_spec, utils.mark_mask)."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)[np.asarray(order)]
    hidden = 0
    for k in marks_per_target:
        marked = pts[:k]
        spec = mark_spec(protocol_scale(marked, object_size), width, height, k, style)
        mask = utils.mark_mask(width, height, marked, radius=spec[1], dots=spec[0] == "dots")
        x, y = np.floor(pts[k]).astype(int)
        hidden += bool(0 <= x < width and 0 <= y < height and mask[y, x])
    return hidden / len(marks_per_target) if len(marks_per_target) else 0.0


# -----------------------------------------------------------------------------
# the oracle: a scripted perfect model


class Oracle:
    """Stands in for the model in evaluate_vlm_regression.count_records: for each image it returns the ground
    truth's next point in counting order (the object after the ones it has already given), with Gaussian noise of
    noise_px pixels per coordinate, and says done when none is left. `predict(states)` takes the counting states
    ({"key", "gt" (N, 2) pixels in counting order, "points" counted so far, "size"}) and returns normalized (B, 2)
    points and (B,) stop probabilities, as the model does."""

    def __init__(self, noise_px=0.0, seed=0):
        if noise_px < 0:
            raise ValueError(f"oracle noise must be >= 0 px, got {noise_px}")
        self.noise_px, self.seed = float(noise_px), int(seed)

    def predict(self, states):
        xy, done = np.zeros((len(states), 2)), np.zeros(len(states))
        for i, s in enumerate(states):
            k, gt = len(s["points"]), np.asarray(s["gt"], np.float64).reshape(-1, 2)
            w, h = s["size"]
            if k >= len(gt):
                done[i], xy[i] = 1.0, (-1.0, -1.0)
                continue
            p = gt[k].copy()
            if self.noise_px:
                p += np.random.default_rng([self.seed, s["key"], k]).normal(0, self.noise_px, 2)
                p = np.clip(p, 0, [w - 1e-6, h - 1e-6])
            xy[i] = utils.normalize_points(p, w, h)[0]
        return xy, done


# -----------------------------------------------------------------------------
# metrics per count range and per class


def bin_label(lo, hi):
    return f"{lo}-{hi}" if hi is not None else f"{lo}+"


def error_stats(gt, pred):
    gt, pred = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    err = pred - gt
    if not len(err):
        return {"num_images": 0, "mae": None, "rmse": None, "mean_signed_error": None}
    return {"num_images": int(len(err)), "mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "mean_signed_error": float(err.mean())}


def per_count_bin(predictions):
    """{"1-10": {num_images, mae, rmse, mean_signed_error}, ...} over COUNT_BINS by ground-truth count (images with
    0 objects fall in no bin)."""
    out = {}
    for lo, hi in COUNT_BINS:
        sel = [p for p in predictions if p["gt_count"] >= lo and (hi is None or p["gt_count"] <= hi)]
        out[bin_label(lo, hi)] = error_stats([p["gt_count"] for p in sel], [p["pred_count"] for p in sel])
    return out


STEP_BINS = ((1, 1), (2, 2), (3, 3), (4, 10), (11, 50), (51, 150), (151, None))  # which point of the count


def per_step(predictions):
    """{"1": {points, within_radius, median_px}, "2": ..., "4-10": ...} over STEP_BINS by the point's place in its
    image's count (1 = the first point counted): how many k-th points there were, the share that landed within the
    image's match radius of some object (unassigned: a repeat on one object counts for each point), and their median
    distance to the nearest object. Does localisation hold as marks accumulate, or is one step the weak one?"""
    out = {}
    for lo, hi in STEP_BINS:
        ok, near = [], []
        for p in predictions:
            d = p.get("nearest_object_px") or []
            sel = d[lo - 1:hi]
            near += sel
            ok += [x <= p["match_radius_px"] for x in sel]
        out[bin_label(lo, hi) if hi != lo else str(lo)] = {
            "points": len(near), "within_radius": float(np.mean(ok)) if ok else None,
            "median_px": float(np.median(near)) if near else None}
    return out


def per_group(predictions, key):
    """{group: error stats} for key(prediction) -> group name, plus mRMSE, the mean of the groups' RMSEs (the
    OmniCount paper's class-averaged RMSE)."""
    groups = {}
    for p in predictions:
        groups.setdefault(key(p), []).append(p)
    stats = {g: error_stats([p["gt_count"] for p in ps], [p["pred_count"] for p in ps])
             for g, ps in sorted(groups.items())}
    rmses = [s["rmse"] for s in stats.values() if s["rmse"] is not None]
    return {"groups": stats, "mrmse": float(np.mean(rmses)) if rmses else None}
