"""
The embedded synthetic data: shapes x colours on plain or varied backgrounds, each image deterministic from
(seed, split, index), so a split is re-rendered on load instead of stored. write_synthetic also writes one to disk
in FSC-147's or OmniCount's layout, to exercise the real loaders.

    python dataset.py --stats                                                     # the synthetic training split
    python dataset.py --make_synthetic --format omnicount --out data/synth_omni --num_images 200
"""

import hashlib
import json
import os
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from utils import DataError

@dataclass
class SyntheticConfig:
    """Knobs of the embedded synthetic data. The defaults are sized for the tiny CPU demo (224 px = 7x7 merged
    tokens): 1-3 large objects of one type on a plain grey background, which even the tiny random-init model learns
    within minutes. The random ViT's features change with the background's brightness more than with a small object, so
    `background="varied"`, distractor types and more objects make a task it does not learn in the demo's budget
    (docs/VLM_WORKFLOW.md section 4b); they are there for harder tests and for real models."""

    image_size: int = 224
    min_count: int = 1
    max_count: int = 3  # per object type; the longest sequence a sample teaches
    num_train: int = 2000  # images per split; every object type in an image is one sample
    num_val: int = 200
    num_test: int = 200
    max_distractor_types: int = 0  # other shape/colour types drawn beside the named one
    min_radius: float = 12.0  # at 224 px; scaled with image_size
    max_radius: float = 24.0
    background: str = "plain"  # "plain": mid grey; "varied": random grey level, tint and brightness ramp


BACKGROUNDS = ("plain", "varied")
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (240, 200, 20)}
SYNTHETIC_TYPES = tuple(f"{c} {s}s" for s in SHAPES for c in COLOURS)
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


# -----------------------------------------------------------------------------
# One image: layout, points, pixels


def synthetic_layout(seed, cfg):
    """Background and objects of one synthetic image: dict with 'size', 'background' params and 'objects', a list
    of (type, cx, cy, radius, angle) with (cx, cy) in continuous pixel coordinates. Types' counts are in
    [min_count, max_count] unless the image is too full to place them without overlap."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(list(seed))
    s = cfg.image_size
    n_types = 1 + int(rng.integers(0, cfg.max_distractor_types + 1))
    types = [SYNTHETIC_TYPES[i] for i in rng.choice(len(SYNTHETIC_TYPES), n_types, replace=False)]
    counts = rng.integers(cfg.min_count, cfg.max_count + 1, n_types)
    background = dict(base=int(rng.integers(70, 200)), tint=rng.integers(-25, 26, 3).tolist(),
                      angle=float(rng.uniform(0, 2 * np.pi)), amplitude=float(rng.uniform(0, 40)))
    if cfg.background == "plain":  # drawn anyway, so both kinds place the same objects
        background = dict(base=128, tint=[0, 0, 0], angle=0.0, amplitude=0.0)
    elif cfg.background != "varied":
        raise DataError(f"synthetic background must be one of {BACKGROUNDS}, got {cfg.background!r}")
    scale = s / 224
    placed = []  # (type, cx, cy, r, angle)
    for t, count in zip(types, counts.tolist()):
        for _ in range(count):
            r = float(rng.uniform(cfg.min_radius, cfg.max_radius)) * scale
            for _try in range(30):
                c = rng.uniform(r + 1, s - r - 1, 2)
                if all((c[0] - o[1]) ** 2 + (c[1] - o[2]) ** 2 > (r + o[3] + 3) ** 2 for o in placed):
                    placed.append((t, float(c[0]), float(c[1]), r, float(rng.uniform(0, 2 * np.pi))))
                    break
    return dict(size=s, background=background, objects=placed)


def synthetic_points(layout):
    """{type: (N, 2) float32 centres} of a layout, types in the order they were drawn (first = the named type)."""
    out = {}
    for t, cx, cy, _, _ in layout["objects"]:
        out.setdefault(t, []).append((cx, cy))
    return {t: np.asarray(p, dtype=np.float32) for t, p in out.items()}


def render_synthetic(layout):
    s, bg = layout["size"], layout["background"]
    base = np.clip(bg["base"] + np.asarray(bg["tint"], np.float32), 0, 255)
    if bg["amplitude"] == 0:  # plain: no per-pixel float work (it was most of a sample's preparation time)
        canvas = np.empty((s, s, 3), np.uint8)
        canvas[:] = base.astype(np.uint8)
    else:
        t = np.arange(s, dtype=np.float32) / s - 0.5  # a linear ramp is a row term plus a column term
        img = bg["amplitude"] * (np.cos(bg["angle"]) * t[None, :] + np.sin(bg["angle"]) * t[:, None])
        img = img[:, :, None] + base
        canvas = np.clip(img, 0, 255, out=img).astype(np.uint8)
    for t, cx, cy, r, angle in layout["objects"]:
        colour_name, shape = t.split()
        colour = COLOURS[colour_name]
        c = (cx - 0.5, cy - 0.5)  # continuous coords -> cv2 pixel-centre coords
        if shape == "circles":
            cv2.circle(canvas, (round(c[0] * 16), round(c[1] * 16)), round(r * 16), colour, -1, cv2.LINE_AA, 4)
            continue
        k = 4 if shape == "squares" else 3
        rr = r * (1.0 if k == 4 else 1.15)  # a triangle's area looks smaller; enlarge its circumradius a little
        a = angle + 2 * np.pi * np.arange(k) / k
        poly = np.stack([c[0] + rr * np.cos(a), c[1] + rr * np.sin(a)], 1)
        cv2.fillPoly(canvas, [np.round(poly * 16).astype(np.int32)], colour, cv2.LINE_AA, 4)
    return Image.fromarray(canvas)




# -----------------------------------------------------------------------------
# A dataset on disk in a real dataset's layout


def write_synthetic(out, fmt, num_images, seed=0, cfg=None):
    """Write synthetic images in FSC-147 or OmniCount (Roboflow COCO) layout under `out`; 80/10/10 train/val/test.
    FSC-147 annotates only the image's first (named) type, like the real one; OmniCount annotates every type."""
    cfg = cfg or SyntheticConfig()
    n_val = max(1, num_images // 10)
    sizes = {"train": max(1, num_images - 2 * n_val), "val": n_val, "test": n_val}
    if fmt == "fsc147":
        image_dir = os.path.join(out, "images_384_VarV2")
        os.makedirs(image_dir, exist_ok=True)
        annotations, split_lists, classes = {}, {}, []
        for split, n in sizes.items():
            split_lists[split] = []
            for i in range(n):
                layout = synthetic_layout((seed, SPLIT_SEEDS[split], i), cfg)
                t, pts = next(iter(synthetic_points(layout).items()))
                name = f"{split}_{i:06d}.jpg"
                render_synthetic(layout).save(os.path.join(image_dir, name), quality=95)
                radii = [o[3] for o in layout["objects"] if o[0] == t]
                boxes = [[[x - r, y - r], [x - r, y + r], [x + r, y + r], [x + r, y - r]]
                         for (x, y), r in list(zip(pts.tolist(), radii))[:3]]
                # H/W are the "original" size, deliberately unlike the file's, as in the real dataset
                annotations[name] = {"H": cfg.image_size * 2, "W": cfg.image_size * 2, "points": pts.tolist(),
                                     "box_examples_coordinates": boxes, "ratio_h": 0.5, "ratio_w": 0.5}
                split_lists[split].append(name)
                classes.append(f"{name}\t{t}\n")
        _write_fsc147_files(out, annotations, split_lists, classes)
    elif fmt == "omnicount":
        cat_ids = {t: i + 1 for i, t in enumerate(SYNTHETIC_TYPES)}
        categories = [{"id": 0, "name": "synthetic-shapes", "supercategory": "none"}]  # Roboflow's placeholder
        categories += [{"id": i, "name": t, "supercategory": "synthetic-shapes"} for t, i in cat_ids.items()]
        for split, n in sizes.items():
            split_dir = os.path.join(out, "Synthetic", "valid" if split == "val" else split)  # Roboflow's names
            os.makedirs(split_dir, exist_ok=True)
            images, anns = [], []
            for i in range(n):
                layout = synthetic_layout((seed, SPLIT_SEEDS[split], i), cfg)
                digest = hashlib.md5(f"{seed}-{split}-{i}".encode()).hexdigest()
                name = f"synth-{i:06d}_jpg.rf.{digest}.jpg"
                render_synthetic(layout).save(os.path.join(split_dir, name), quality=95)
                images.append({"id": i, "file_name": name, "width": cfg.image_size, "height": cfg.image_size})
                for t, x, y, r, _ in layout["objects"]:
                    anns.append({"id": len(anns), "image_id": i, "category_id": cat_ids[t],
                                 "bbox": [x - r, y - r, 2 * r, 2 * r], "area": 4 * r * r, "segmentation": [],
                                 "iscrowd": 0})
            with open(os.path.join(split_dir, "_annotations.coco.json"), "w") as f:
                json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    else:
        raise DataError(f"unknown format {fmt!r}; choose fsc147 or omnicount")
    return sizes



def _write_fsc147_files(out, annotations, split_lists, classes):
    split_lists["val_coco"], split_lists["test_coco"] = split_lists["val"][:1], split_lists["test"][:1]
    with open(os.path.join(out, "annotation_FSC147_384.json"), "w") as f:
        json.dump(annotations, f)
    with open(os.path.join(out, "Train_Test_Val_FSC_147.json"), "w") as f:
        json.dump(split_lists, f)
    with open(os.path.join(out, "ImageClasses_FSC147.txt"), "w") as f:
        f.writelines(classes)


# -----------------------------------------------------------------------------
# Dense layouts: FSC-147's crowded images, for measuring the counting protocol itself (evaluate --oracle)


def hard_core_points(n, min_dist, width, height, rng):
    """n uniform random points (N, 2) in width x height with centres at least min_dist apart (dart throwing on a
    cell grid of side min_dist / sqrt(2), so each cell holds at most one point). Raises DataError if the darts
    cannot place n points (too dense for min_dist)."""
    cell = min_dist / np.sqrt(2)
    occupied, pts = {}, []
    for _ in range(50):
        for p in rng.uniform([0, 0], [width, height], (4 * n, 2)):
            cx, cy = int(p[0] // cell), int(p[1] // cell)
            near = (occupied.get((cx + i, cy + j)) for i in range(-2, 3) for j in range(-2, 3))
            if all(q is None or np.hypot(p[0] - q[0], p[1] - q[1]) >= min_dist for q in near):
                occupied[(cx, cy)] = p
                pts.append(p)
                if len(pts) == n:
                    return np.asarray(pts)
    raise DataError(f"cannot place {n} points {min_dist} px apart in {width}x{height}")


def dense_layout(n, seed, width=576, height=384):
    """(points (n, 2), object size) of a crowded image: hard-core random centres at a spacing of 0.6 x the mean
    spacing sqrt(area / n), at least 3 px; objects as large as that spacing (they touch, never overlap)."""
    spacing = max(3.0, 0.6 * np.sqrt(width * height / n))
    return hard_core_points(n, spacing, width, height, np.random.default_rng([seed, n])), spacing


def write_dense_fsc147(out, counts, seed=0, width=576, height=384):
    """An FSC-147-layout folder whose test split holds one plain image per count in `counts` (points from
    dense_layout, three exemplar boxes of the objects' size); train and val hold one image each of the first
    count, so every split loads. Images are plain grey: the oracle needs only the points."""
    image_dir = os.path.join(out, "images_384_VarV2")
    os.makedirs(image_dir, exist_ok=True)
    annotations, split_lists, classes = {}, {"train": [], "val": [], "test": []}, []
    blank = Image.new("RGB", (width, height), (128, 128, 128))
    todo = [("test", i, n) for i, n in enumerate(counts)] + [("train", 0, counts[0]), ("val", 0, counts[0])]
    for split, i, n in todo:
        pts, size = dense_layout(int(n), seed, width, height)
        name = f"dense_{split}_{i:04d}_{int(n)}.jpg"
        blank.save(os.path.join(image_dir, name), quality=95)
        boxes = [[[x - size / 2, y - size / 2], [x - size / 2, y + size / 2], [x + size / 2, y + size / 2],
                  [x + size / 2, y - size / 2]] for x, y in pts[:3].tolist()]
        annotations[name] = {"H": height, "W": width, "points": pts.tolist(), "box_examples_coordinates": boxes}
        split_lists[split].append(name)
        classes.append(f"{name}\tdots\n")
    _write_fsc147_files(out, annotations, split_lists, classes)
    return {"test": len(counts)}
