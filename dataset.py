"""
Counting data: FSC-147, OmniCount-191 (COCO) and a synthetic default (synthetic_data.py), turned into
sequential-counting samples (image with the first k objects marked 1..k, target = normalized (x, y) of object k+1).
See docs/DATA.md.

    python dataset.py --stats                                             # the embedded synthetic data
    python dataset.py --dataset fsc147 --data_root data/FSC147 --split val --stats --json
    python dataset.py --dataset omnicount --data_root data/OmniCount-191 --categories Fruits Supermarket \\
        --object_types apples --split valid --stats
    python dataset.py --dataset fsc147 --data_root data/FSC147 --preview 8 --out previews/
    python dataset.py --make_synthetic --format omnicount --out data/synth_omni --num_images 200
"""

import argparse
import json
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import counting
import synthetic_data as synth
import utils
from prompt import encode_batch, object_names, prompt_text
from utils import DataError

# Qwen3-VL sees 16-px patches merged 2x2, so image sides are multiples of 32 (the processor's smart resize).
RESIZE_FACTOR = 32
MIN_PIXELS = 32 * 32 * 4  # the processor's own floor; tiny images are upscaled to at least 2x2 merged tokens
MAX_PIXELS = 640 * 640  # FSC-147 (384 x ~576) and OmniCount (640x640) keep their size: no detail lost before marking
DATASETS = ("synthetic", "fsc147", "omnicount")
# Share of training samples with every object marked, the stop head's positive class. 0.25 is about the share of
# counting steps that end a count on the demo's 1-3 objects; with it the stop head of the demo on tiny-random reached
# validation accuracy 0.94, precision 0.87, recall 0.93 and stopped 88% of 200 test counts, and on the pretrained
# base it stopped 98% (docs/VLM_WORKFLOW.md 4b).
DONE_FRACTION = 0.25


# -----------------------------------------------------------------------------
# records: one (image, object type) pair with its points


@dataclass
class CountingRecord:
    image_id: str
    object_type: str
    points: np.ndarray  # (N, 2) float32, continuous pixel coords in the image as loaded (no EXIF rotation), unordered
    image_path: str | None = None
    width: int | None = None  # size of the image as loaded
    height: int | None = None
    synthetic_seed: tuple | None = None  # synthetic images are re-rendered from (seed, split, index) when loaded
    synthetic: synth.SyntheticConfig | None = None
    # typical object size in pixels of the image as loaded (median shorter box side; synthetic: median diameter), from
    # the data where it gives one (FSC-147's exemplar boxes, OmniCount's boxes); it sizes marks and the repeat rule
    object_size: float | None = None

    def load_image(self):
        """The RGB PIL image the points refer to. Raises OSError for a missing, unreadable or truncated file."""
        if self.synthetic_seed is not None:
            return synth.render_synthetic(synth.synthetic_layout(self.synthetic_seed, self.synthetic))
        with Image.open(self.image_path) as im:
            return im.convert("RGB")  # convert() decodes fully, so a truncated file fails here, not later


def _split_name(dataset, split):
    if dataset == "omnicount":
        return "valid" if split == "val" else split
    return "val" if split == "valid" else split


def load_records(dataset, data_root=None, split="train", categories=None, object_types=None, min_objects=1,
                 max_objects=None, seed=0, synthetic=None, annotation_file=None):
    """(records, skipped) for one split. `skipped` maps a reason to a count (images skipped, points clipped, ...).
    Raises DataError with a one-line message for anything that makes the request itself wrong. annotation_file:
    FSC-147 only, a points file in annotation_FSC147_384.json's format to use instead of it (e.g. corrected points)."""
    skipped = Counter()
    split = _split_name(dataset, split)
    if dataset == "synthetic":
        if categories:
            raise DataError("--categories applies to --dataset omnicount only")
        records = _synthetic_records(synthetic or synth.SyntheticConfig(), split, seed)
    elif dataset in ("fsc147", "omnicount"):
        if not data_root:
            raise DataError(f"--dataset {dataset} needs --data_root")
        if not os.path.isdir(data_root):
            raise DataError(f"{data_root}: data root not found")
        if dataset == "fsc147":
            if categories:
                raise DataError("--categories applies to --dataset omnicount only (FSC-147 has no categories)")
            records = _fsc147_records(data_root, split, skipped, annotation_file)
        else:
            if annotation_file:
                raise DataError("--annotation_file applies to --dataset fsc147 only")
            records = _omnicount_records(data_root, split, categories, skipped)
    else:
        raise DataError(f"unknown dataset {dataset!r}; choose from {DATASETS}")
    if object_types:
        records = _filter_object_types(records, object_types, dataset, skipped)
    kept = []
    for r in records:
        n = len(r.points)
        if n < max(min_objects, 1):  # a sample needs at least one object to point at
            skipped["too_few_objects"] += 1
        elif max_objects is not None and n > max_objects:
            skipped["too_many_objects"] += 1
        else:
            kept.append(r)
    if skipped:
        warnings.warn(f"{dataset} {split}: " + ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())),
                      stacklevel=2)
    return kept, dict(skipped)


def _type_key(name):
    # 'apples', 'Apple' and 'apple' name the same type: compare lower-cased plurals
    return object_names(name.lower())[1]


def _filter_object_types(records, object_types, dataset, skipped):
    present = sorted({r.object_type for r in records})
    known = {_type_key(t) for t in present}
    if dataset == "synthetic":
        known |= {_type_key(t) for t in synth.SYNTHETIC_TYPES}
        present = sorted(set(present) | set(synth.SYNTHETIC_TYPES))
    wanted = {_type_key(t) for t in object_types}
    unknown = [t for t in object_types if _type_key(t) not in known]
    if unknown:
        raise DataError(f"unknown object type(s) {unknown} in {dataset}; known: {present}")
    kept = [r for r in records if _type_key(r.object_type) in wanted]
    skipped["other_object_type"] += len(records) - len(kept)  # kept out by the filter, not broken
    return kept


def _read_json(path):
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None


def _image_size(path, skipped):
    """(w, h) from the file header, or None (counted) when the file is missing or not an image."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        skipped["missing_image"] += 1
        warnings.warn(f"{path}: image file not found, skipped")
    except (OSError, ValueError, SyntaxError) as e:
        skipped["unreadable_image"] += 1
        warnings.warn(f"{path}: unreadable image ({e}), skipped")
    return None


def _as_points(points, where):
    """float32 (N, 2) from a JSON list of [x, y] pairs; DataError naming `where` when it is not one."""
    try:
        pts = np.asarray(points, dtype=np.float64)
        if pts.size and (pts.ndim != 2 or pts.shape[1] != 2):
            raise ValueError(f"shape {pts.shape}")
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: points are not a list of [x, y] pairs ({e})") from None
    return pts.reshape(-1, 2)


def _clip_points(points, w, h, skipped):
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    finite = np.isfinite(pts).all(axis=1)
    if not finite.all():  # a NaN or infinite point is no object: dropped, counted
        skipped["nonfinite_points"] += int((~finite).sum())
        pts = pts[finite]
    pts = pts.astype(np.float32)
    clipped = np.clip(pts, 0, [w, h]).astype(np.float32)
    n = int(np.any(clipped != pts, axis=1).sum())
    if n:
        skipped["points_clipped"] += n
    return clipped


def _fsc147_records(root, split, skipped, annotation_file=None):
    ann_path = annotation_file or os.path.join(root, "annotation_FSC147_384.json")
    split_path = os.path.join(root, "Train_Test_Val_FSC_147.json")
    class_path = os.path.join(root, "ImageClasses_FSC147.txt")
    image_dir = os.path.join(root, "images_384_VarV2")
    for p in (split_path, ann_path, class_path):
        if not os.path.isfile(p):
            raise DataError(f"{p}: FSC-147 file not found")
    if not os.path.isdir(image_dir):
        raise DataError(f"{image_dir}: FSC-147 image folder not found")
    splits = _read_json(split_path)
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise DataError(f"{split_path}: expected {{split name: [image names]}}, got {type(splits).__name__}")
    if split not in splits:
        raise DataError(f"{split_path}: no split {split!r} (has {sorted(splits)})")
    _check_split_lists(split_path, splits)
    annotations = _read_json(ann_path)
    if not isinstance(annotations, dict):
        raise DataError(f"{ann_path}: expected {{image name: annotation}}, got {type(annotations).__name__}")
    classes = {}
    with open(class_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            name, sep, cls = line.rstrip("\r\n").partition("\t")
            if not sep or not cls.strip():
                raise DataError(f"{class_path}: line {lineno} is not '<image>\\t<class>': {line.strip()[:60]!r}")
            classes[name.strip()] = cls.strip()
    records = []
    for name in splits[split]:
        ann = annotations.get(name)
        if ann is None:
            skipped["no_annotation"] += 1
            continue
        if name not in classes:
            skipped["no_class"] += 1
            continue
        path = os.path.join(image_dir, name)
        size = _image_size(path, skipped)
        if size is None:
            continue
        if not isinstance(ann, dict):
            raise DataError(f"{ann_path}: image {name}: annotation is a {type(ann).__name__}, not an object")
        # points are in the frame of the file on disk; ann["H"], ann["W"] are the ORIGINAL size and never used
        pts = _clip_points(_as_points(ann.get("points", []), f"{ann_path}: image {name}"), *size, skipped)
        records.append(CountingRecord(name, classes[name], pts, path, *size,
                                      object_size=_exemplar_size(ann.get("box_examples_coordinates"))))
    return records


def _check_split_lists(path, splits):
    """An image listed twice in a split, or in two of train/val/test (a leak: validation on training images), is an
    error. The real file's val_coco and test_coco are subsets of val and test, so they are checked on their own."""
    for split_name, names in splits.items():
        seen = {}
        for name in names:
            if name in seen:
                raise DataError(f"{path}: image {name} is listed twice in split {split_name!r}")
            seen[name] = split_name
    seen = {}
    for split_name in ("train", "val", "test"):
        for name in splits.get(split_name, []):
            if name in seen:
                raise DataError(f"{path}: image {name} is listed in splits {seen[name]!r} and {split_name!r} (a leak "
                                f"between splits)")
            seen[name] = split_name


def _exemplar_size(boxes):
    """Median shorter side of FSC-147's exemplar boxes (4 corners each, corner 0 = (x1, y1), corner 2 = (x2, y2)),
    or None when there are none."""
    sides = []
    for b in boxes or []:
        try:
            (x1, y1), (x2, y2) = b[0], b[2]
        except (TypeError, ValueError, IndexError):
            continue
        side = min(abs(float(x2) - float(x1)), abs(float(y2) - float(y1)))
        if np.isfinite(side) and side > 0:
            sides.append(side)
    return float(np.median(sides)) if sides else None


def _omnicount_records(root, split, categories, skipped):
    present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    present = [d for d in present if any(os.path.isdir(os.path.join(root, d, s)) for s in ("train", "valid", "test"))]
    if not present:
        raise DataError(f"{root}: no OmniCount category folders (expected <category>/{{train,valid,test}}/)")
    if categories:
        unknown = [c for c in categories if c not in present]
        if unknown:
            raise DataError(f"{root}: unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; present: {present}")
    records = []
    for cat in categories or present:
        split_dir = os.path.join(root, cat, split)
        if not os.path.isdir(split_dir):
            warnings.warn(f"{split_dir}: category {cat} has no {split!r} split, skipped")
            skipped["category_without_split"] += 1
            continue
        ann_path = os.path.join(split_dir, "_annotations.coco.json")
        if not os.path.isfile(ann_path):
            raise DataError(f"{ann_path}: COCO annotation file not found")
        coco = _read_json(ann_path)
        try:
            records += _coco_records(coco, split_dir, f"{cat}/{split}/", skipped, ann_path)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{ann_path}: not COCO annotations as expected ({type(e).__name__}: {e})") from None
    return records


def _coco_images(coco, path):
    """{image id: image entry}; an id or a file listed twice is an error (one image would get another's boxes)."""
    if not isinstance(coco, dict) or not isinstance(coco.get("images", []), list):
        raise DataError(f"{path}: expected a COCO object with an 'images' list")
    images, files = {}, {}
    for im in coco.get("images", []):
        if im["id"] in images:
            raise DataError(f"{path}: image id {im['id']} is listed twice ({images[im['id']]['file_name']}, "
                            f"{im['file_name']})")
        if im["file_name"] in files:
            raise DataError(f"{path}: image {im['file_name']} is listed twice (ids {files[im['file_name']]}, {im['id']})")
        images[im["id"]], files[im["file_name"]] = im, im["id"]
    return images


def _coco_box(a, skipped):
    """(x, y, w, h) of an annotation, or None (counted) when it has no usable box."""
    box = a.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        skipped["annotation_without_bbox"] += 1
        return None
    try:
        box = [float(v) for v in box]
    except (TypeError, ValueError):
        box = [float("nan")]
    if not all(np.isfinite(box)) or box[2] < 0 or box[3] < 0:
        skipped["annotation_bad_bbox"] += 1
        return None
    return box


def _coco_records(coco, image_dir, id_prefix, skipped, path="COCO annotations"):
    """One record per (image, category) with the box centres of that category only (images are multi-label). Boxes
    are in the frame of the image size the JSON states; when the file on disk has another size they are rescaled."""
    images = _coco_images(coco, path)
    names = {c["id"]: c["name"] for c in coco.get("categories", [])}
    centres = {}  # (image id, category id) -> list of centres
    for a in coco.get("annotations", []):
        if a.get("image_id") not in images:
            skipped["annotation_without_image"] += 1
            continue
        if a.get("category_id") not in names:
            skipped["unknown_category_id"] += 1
            continue
        box = _coco_box(a, skipped)
        if box is None:
            continue
        x, y, w, h = box
        centres.setdefault((a["image_id"], a["category_id"]), []).append((x + w / 2, y + h / 2, min(w, h)))
    by_image = {}
    for (image_id, cat_id), pts in centres.items():
        by_image.setdefault(image_id, []).append((cat_id, pts))
    records = []
    for image_id, im in images.items():
        groups = by_image.get(image_id)
        if not groups:
            skipped["image_without_objects"] += 1
            continue
        path = os.path.join(image_dir, im["file_name"])
        size = _image_size(path, skipped)
        if size is None:
            continue
        scale = np.ones(2)
        if (im.get("width"), im.get("height")) != tuple(size):
            # the file is what gets marked and shown to the model: boxes move into its frame
            skipped["size_mismatch_rescaled"] += 1
            if isinstance(im.get("width"), (int, float)) and isinstance(im.get("height"), (int, float)) and \
                    im["width"] > 0 and im["height"] > 0:
                scale = np.array([size[0] / im["width"], size[1] / im["height"]])
        for cat_id, objs in sorted(groups, key=lambda g: names[g[0]]):
            sides = [o[2] * min(scale) for o in objs if o[2] > 0]
            pts = np.array([o[:2] for o in objs], np.float64).reshape(-1, 2) * scale
            records.append(CountingRecord(id_prefix + im["file_name"], names[cat_id],
                                          _clip_points(pts, *size, skipped), path, *size,
                                          object_size=float(np.median(sides)) if sides else None))
    records.sort(key=lambda r: (r.image_id, r.object_type))
    return records


def _synthetic_records(cfg, split, seed):
    if split not in synth.SPLIT_SEEDS:
        raise DataError(f"synthetic split must be one of {sorted(synth.SPLIT_SEEDS)}, got {split!r}")
    n = {"train": cfg.num_train, "val": cfg.num_val, "test": cfg.num_test}[split]
    records = []
    for i in range(n):
        key = (int(seed), synth.SPLIT_SEEDS[split], i)
        layout = synth.synthetic_layout(key, cfg)
        for t, pts in synth.synthetic_points(layout).items():
            size = float(np.median([2 * o[3] for o in layout["objects"] if o[0] == t]))
            records.append(CountingRecord(f"synthetic-{split}-{i:06d}", t, pts, None, cfg.image_size,
                                          cfg.image_size, synthetic_seed=key, synthetic=cfg, object_size=size))
    return records


# -----------------------------------------------------------------------------
# samples


def model_input_size(width, height, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """(new_w, new_h): Qwen3-VL's smart resize (sides multiples of 32, pixel count within bounds). Marking the image
    at exactly this size means the processor does not resize it again, so marks keep their drawn size."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    h, w = smart_resize(int(height), int(width), factor=RESIZE_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    return int(w), int(h)


def prepare_image(record, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """(RGB image resized to model_input_size, the record's points scaled into that frame, float32 (N, 2))."""
    image = record.load_image()
    w, h = image.size
    nw, nh = model_input_size(w, h, min_pixels, max_pixels)
    points = (np.asarray(record.points, np.float64) * [nw / w, nh / h]).astype(np.float32)
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)  # bicubic, like the processor would have done
    return image, points


def object_size_in(record, model_size):
    """The record's object size in pixels of the model-input frame of size (w, h), or None."""
    if record.object_size is None:
        return None
    w, h = (record.width, record.height) if record.width and record.height else record.load_image().size
    return float(record.object_size) * float(np.sqrt(model_size[0] / w * model_size[1] / h))


@dataclass
class CountingSample:
    image: Image.Image  # resized to the model's input size, first num_marked objects marked 1..k
    object_type: str
    num_marked: int
    target: np.ndarray  # float32 (2,) normalized (x, y) of the next object; (-1, -1) when done
    points: np.ndarray  # (N, 2) all points in counting order, pixels of the resized image
    image_id: str
    done: bool = False


class CountingDataset(torch.utils.data.Dataset):
    """One sample per record per epoch: k ~ U{0..N-1} objects marked, target = object k (0-based) in `ordering`.

    Randomness comes from np.random.default_rng([seed, epoch, index]) only, so a sample is the same whatever the
    worker count, order of access or resume point. Validation sets simply never call set_epoch.
    Unreadable images are warned about once, counted in `self.skipped` (per process: DataLoader workers keep their
    own counts) and replaced by another record, so an epoch never crashes on one bad file.
    """

    def __init__(self, records, ordering="reading_order", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                 done_fraction=0.0, seed=0, mark_style="auto", mark_jitter=0.0):
        if ordering not in utils.ORDERINGS:
            raise ValueError(f"unknown ordering {ordering!r}; choose from {utils.ORDERINGS}")
        if not records:
            raise DataError("no records to build samples from (check the split and the filters)")
        self.records, self.ordering = list(records), ordering
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.done_fraction, self.seed, self.epoch = float(done_fraction), int(seed), 0
        if mark_style not in counting.MARK_STYLES:
            raise ValueError(f"unknown mark style {mark_style!r}; choose from {counting.MARK_STYLES}")
        self.mark_style = mark_style
        self.mark_jitter = float(mark_jitter)
        self.skipped = 0
        self._bad = set()
        self._orders = {}

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.records)

    def order(self, i):
        if i not in self._orders:
            self._orders[i] = utils.order_points(self.records[i].points, self.ordering)
        return self._orders[i]

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        j = int(i)
        for _ in range(20):
            if j not in self._bad:
                try:
                    return self.make_sample(j, rng)
                except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for missing/corrupt/truncated files
                    self._bad.add(j)
                    self.skipped += 1
                    warnings.warn(f"{self.records[j].image_path or self.records[j].image_id}: unreadable image "
                                  f"({e}); replaced by another sample")
            j = int(rng.integers(len(self.records)))
        raise DataError("20 unreadable images in a row; is the data folder intact?")

    def make_sample(self, j, rng):
        rec = self.records[j]
        n = len(rec.points)
        k = int(rng.integers(0, n))  # drawn before `done` so done_fraction does not change the other samples
        done = bool(rng.random() < self.done_fraction)
        image, pts = prepare_image(rec, self.min_pixels, self.max_pixels)
        pts = pts[self.order(j)]
        if done:
            k, target = n, np.array([-1.0, -1.0], np.float32)
        else:
            target = utils.normalize_points(pts[k], *image.size)[0]
        size = object_size_in(rec, image.size)
        marked = pts[:k]
        scale = counting.protocol_scale(marked, size) if self.mark_jitter and k else None
        if scale:  # marks where a model would have put them: off the centres by up to a share of the object's scale
            marked = np.clip(marked + rng.normal(0.0, self.mark_jitter * scale, marked.shape), 0,
                             [image.size[0] - 1, image.size[1] - 1]).astype(pts.dtype)
        return CountingSample(self.mark(image, marked, size), rec.object_type, k, target, pts, rec.image_id, done)

    def mark(self, image, marked, object_size):
        """The image with `marked` drawn as evaluation draws them after counting those points (counting.mark_spec:
        the scale is min(object size, spacing of the marked points))."""
        spec = counting.mark_spec(counting.protocol_scale(marked, object_size), *image.size, len(marked),
                                  self.mark_style)
        return counting.draw_marks(image, marked, spec)


def make_collate_fn(processor, ordering="reading_order"):
    """collate(list[CountingSample]) -> dict of tensors: every key the processor returns (input_ids,
    attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, ...) plus targets float32 (B, 2)."""

    def collate(samples):
        out = encode_batch(processor, [s.image for s in samples], [s.object_type for s in samples],
                           [s.num_marked for s in samples], ordering)
        out["targets"] = torch.from_numpy(np.stack([s.target for s in samples]).astype(np.float32))
        out["done"] = torch.tensor([float(s.done) for s in samples], dtype=torch.float32)
        return out

    return collate


# -----------------------------------------------------------------------------
# arguments shared by every command


def add_data_args(parser):
    """The data arguments of every command (dataset, training, evaluation): what to load and how to make samples."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=DATASETS, help="where the images come from")
    g.add_argument("--data_root", default=None, help="dataset folder (fsc147, omnicount)")
    g.add_argument("--categories", nargs="+", default=None, help="omnicount category folders (default: all)")
    g.add_argument("--object_types", nargs="+", default=None, help="keep only these object types")
    g.add_argument("--min_objects", type=int, default=1, help="drop samples with fewer objects")
    g.add_argument("--max_objects", type=int, default=None, help="drop samples with more objects (default: no cap)")
    g.add_argument("--ordering", default="reading_order", choices=utils.ORDERINGS, help="the counting order")
    g.add_argument("--min_pixels", type=int, default=MIN_PIXELS, help="images below this many pixels are enlarged")
    g.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help="images above this many pixels are shrunk")
    g.add_argument("--done_fraction", type=float, default=DONE_FRACTION,
                   help="share of 'all marked' training samples (the stop head's positives)")
    g.add_argument("--mark_jitter", type=float, default=0.0,
                   help="training marks drawn off their objects' centres by a normal offset of this share of the "
                        "protocol's scale (std per axis): teaches that a mark near an object counts it, as the marks of "
                        "an imperfect model's own points do at counting time (validation marks stay exact)")
    g.add_argument("--mark_style", default="auto", choices=counting.MARK_STYLES,
                   help="numbered labels, dots, or labels where they fit and dots where they would hide objects")
    g.add_argument("--annotation_file", default=None,
                   help="fsc147: points file to use instead of annotation_FSC147_384.json (e.g. corrected points)")
    g = parser.add_argument_group("synthetic data (--dataset synthetic)")
    d = synth.SyntheticConfig()
    g.add_argument("--synthetic_image_size", type=int, default=d.image_size, help="image side in pixels")
    g.add_argument("--synthetic_min_count", type=int, default=d.min_count, help="fewest objects of a type")
    g.add_argument("--synthetic_max_count", type=int, default=d.max_count, help="most objects of a type")
    g.add_argument("--synthetic_num_train", type=int, default=d.num_train, help="images in the train split")
    g.add_argument("--synthetic_num_val", type=int, default=d.num_val, help="images in the val split")
    g.add_argument("--synthetic_num_test", type=int, default=d.num_test, help="images in the test split")
    g.add_argument("--synthetic_distractor_types", type=int, default=d.max_distractor_types,
                   help="up to this many other shape/colour types in each image")
    g.add_argument("--synthetic_min_radius", type=float, default=d.min_radius, help="object radius, px at 224 px")
    g.add_argument("--synthetic_max_radius", type=float, default=d.max_radius, help="object radius, px at 224 px")
    g.add_argument("--synthetic_background", default=d.background, choices=synth.BACKGROUNDS,
                   help="plain grey, or a random grey level, tint and brightness ramp")
    return parser


def check_data_args(parser, args):
    """parser.error (one line, exit 2) for data arguments no run can use."""
    for name, low in (("min_objects", 0), ("max_objects", 1), ("min_pixels", 1), ("max_pixels", 1),
                      ("synthetic_image_size", 32), ("synthetic_min_count", 1), ("synthetic_max_count", 1),
                      ("synthetic_num_train", 0), ("synthetic_num_val", 0), ("synthetic_num_test", 0),
                      ("synthetic_distractor_types", 0)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            parser.error(f"--{name} must be >= {low}, got {value}")
    pairs = (("min_pixels", "max_pixels"), ("min_objects", "max_objects"), ("synthetic_min_count", "synthetic_max_count"),
             ("synthetic_min_radius", "synthetic_max_radius"))
    for low, high in pairs:
        a, b = getattr(args, low, None), getattr(args, high, None)
        if a is not None and b is not None and a > b:
            parser.error(f"--{high} ({b}) must be >= --{low} ({a})")
    if getattr(args, "synthetic_min_radius", None) is not None and not args.synthetic_min_radius > 0:
        parser.error(f"--synthetic_min_radius must be > 0, got {args.synthetic_min_radius}")
    if getattr(args, "mark_jitter", None) is not None and not 0 <= args.mark_jitter <= 1:
        parser.error(f"--mark_jitter must be in [0, 1], got {args.mark_jitter}")
    if getattr(args, "done_fraction", None) is not None and not 0 <= args.done_fraction < 1:
        parser.error(f"--done_fraction must be in [0, 1), got {args.done_fraction}")


def synthetic_config_from_args(args):
    return synth.SyntheticConfig(image_size=args.synthetic_image_size, min_count=args.synthetic_min_count,
                                 max_count=args.synthetic_max_count, num_train=args.synthetic_num_train,
                                 num_val=args.synthetic_num_val, num_test=args.synthetic_num_test,
                                 max_distractor_types=args.synthetic_distractor_types,
                                 min_radius=args.synthetic_min_radius, max_radius=args.synthetic_max_radius,
                                 background=args.synthetic_background)


def records_from_args(args, split):
    return load_records(args.dataset, args.data_root, split, categories=args.categories,
                        object_types=args.object_types, min_objects=args.min_objects, max_objects=args.max_objects,
                        seed=getattr(args, "seed", 0), synthetic=synthetic_config_from_args(args),
                        annotation_file=getattr(args, "annotation_file", None))


def targets_hidden_by_marks(ds, num_samples=200, seed=0):
    """Share of sampled training targets whose pixel lies under the marks of the objects counted before them, with
    marks laid out as ds draws them (its mark style and min/max pixels)."""
    rng = np.random.default_rng([seed, 13])
    ks, hidden = 0, 0
    for i in rng.choice(len(ds), min(num_samples, len(ds)), replace=False).tolist():
        rec = ds.records[i]
        if len(rec.points) < 2:
            continue
        w, h = model_input_size(rec.width, rec.height, ds.min_pixels, ds.max_pixels) if rec.width else \
            prepare_image(rec, ds.min_pixels, ds.max_pixels)[0].size
        pts = np.asarray(rec.points, np.float64) * [w / (rec.width or w), h / (rec.height or h)]
        k = int(np.random.default_rng([seed, i]).integers(1, len(pts)))
        hidden += counting.hidden_share(pts, ds.order(i), [k], object_size_in(rec, (w, h)), w, h, ds.mark_style)
        ks += 1
    return hidden / ks if ks else 0.0


def dataset_stats(records, skipped, dataset, split):
    counts = np.array([len(r.points) for r in records], dtype=np.int64)
    types = {}
    for r in records:
        t = types.setdefault(r.object_type, {"samples": 0, "objects": 0})
        t["samples"] += 1
        t["objects"] += len(r.points)
    return {"dataset": dataset, "split": split, "num_images": len({r.image_id for r in records}),
            "num_samples": len(records), "num_objects": int(counts.sum()),
            "count_min": int(counts.min()) if len(counts) else 0, "count_max": int(counts.max()) if len(counts) else 0,
            "count_mean": round(float(counts.mean()), 3) if len(counts) else 0.0,
            "object_types": dict(sorted(types.items())), "skipped": dict(sorted(skipped.items()))}


def _print_stats(s):
    print(f"{s['dataset']} / {s['split']}: {s['num_images']} images, {s['num_samples']} samples, "
          f"{s['num_objects']} objects, count per sample min {s['count_min']} / mean {s['count_mean']:.1f} / "
          f"max {s['count_max']}")
    width = max([len(t) for t in s["object_types"]] + [11])
    print(f"  {'object type':<{width}}  {'samples':>8}  {'objects':>8}")
    for t, v in s["object_types"].items():
        print(f"  {t:<{width}}  {v['samples']:>8}  {v['objects']:>8}")
    if s["skipped"]:
        print("  skipped/clipped: " + ", ".join(f"{k} {v}" for k, v in s["skipped"].items()))
    if "targets_hidden_by_marks" in s:
        print(f"  targets hidden by earlier marks: {100 * s['targets_hidden_by_marks']:.1f}% of sampled targets")


def write_previews(ds, num, out, seed=0):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for n, i in enumerate(rng.choice(len(ds), min(num, len(ds)), replace=False).tolist()):
        s = ds[i]
        gt = None if s.done else utils.denormalize_points(s.target, *s.image.size)[0]
        img = utils.draw_prediction(s.image, None, gt)
        text = f"[{s.image_id}] k={s.num_marked} target={np.round(s.target, 3).tolist()}\n"
        img = utils.add_caption(img, text + prompt_text(s.object_type, s.num_marked, ds.ordering)[1])
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s.image_id)[-60:]
        paths.append(os.path.join(out, f"preview_{n:03d}_{safe}.png"))
        img.save(paths[-1])
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- Data
    add_data_args(parser)
    parser.add_argument("--split", default="train", help="train, val (valid) or test")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data and sample draws")
    # ---- What to do
    parser.add_argument("--stats", action="store_true", help="print counts per object type")
    parser.add_argument("--json", action="store_true", help="--stats as one JSON object")
    parser.add_argument("--preview", type=int, default=0, help="write this many marked sample PNGs to --out")
    parser.add_argument("--make_synthetic", action="store_true", help="write a synthetic dataset to --out")
    parser.add_argument("--format", choices=("fsc147", "omnicount"), default="fsc147", help="--make_synthetic's layout")
    parser.add_argument("--num_images", type=int, default=100, help="--make_synthetic: images over all splits")
    parser.add_argument("--out", default=None, help="output folder of --preview and --make_synthetic")
    parser.add_argument("--overwrite", action="store_true",
                        help="--make_synthetic: replace the files of a non-empty --out (refused without it)")
    args = parser.parse_args(argv)
    check_data_args(parser, args)
    if args.preview < 0 or args.num_images < 1:
        parser.error(f"--preview must be >= 0 and --num_images >= 1, got {args.preview} and {args.num_images}")
    try:
        if args.make_synthetic:
            if not args.out:
                parser.error("--make_synthetic needs --out")
            if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
                raise DataError(f"{args.out} is not empty ({len(os.listdir(args.out))} entries); --overwrite "
                                f"replaces its dataset files, or choose another --out")
            cfg = synthetic_config_from_args(args)
            sizes = synth.write_synthetic(args.out, args.format, args.num_images, args.seed, cfg)
            print(f"wrote {args.format} dataset to {args.out}: {sizes}")
            return 0
        if not (args.stats or args.preview):
            args.stats = True
        with warnings.catch_warnings():
            if args.json:  # keep stdout pure JSON and stderr quiet; skips are in the JSON
                warnings.simplefilter("ignore")
            records, skipped = records_from_args(args, args.split)
        if args.stats:
            s = dataset_stats(records, skipped, args.dataset, _split_name(args.dataset, args.split))
            ds = CountingDataset(records, args.ordering, args.min_pixels, args.max_pixels, seed=args.seed,
                                 mark_style=args.mark_style)
            s["targets_hidden_by_marks"] = round(targets_hidden_by_marks(ds, seed=args.seed), 4)
            print(json.dumps(s)) if args.json else _print_stats(s)
        if args.preview:
            if not args.out:
                parser.error("--preview needs --out")
            ds = CountingDataset(records, args.ordering, args.min_pixels, args.max_pixels, args.done_fraction,
                                 args.seed, args.mark_style)
            paths = write_previews(ds, args.preview, args.out, args.seed)
            print(f"wrote {len(paths)} previews to {args.out}" + (f" ({ds.skipped} unreadable images)" if ds.skipped else ""))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only folder: one line, not a traceback
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
