"""
Geometry and drawing helpers shared by the data pipeline, training and evaluation (numpy in, numpy out): coordinates,
the counting order, numbered marks, visualisation; the file helpers (atomic writes, DataError); and how a CPU run
keeps its freed memory (keep_freed_memory).

Coordinate convention (used everywhere in this repo)
----------------------------------------------------
Points are *continuous* pixel coordinates (x, y): x=0 is the left edge of the image and x=W its right edge, so the
centre of pixel column i is x = i + 0.5 (same for y). This is the convention of COCO boxes and FSC-147 points, and
it makes resizing exact: a point scales by new_w / W with no half-pixel offsets. Normalized coordinates are
    u = 2 * x / W - 1,   v = 2 * y / H - 1
so u=-1 is the left edge, u=+1 the right edge and u=0 the image centre. (-1, -1) doubles as the "all counted" target.

    python utils.py --demo out.png     # writes a marked example image at 224x224, 384x576 and 640x640
"""

import functools
import json
import os
import tempfile

import cv2
import numpy as np
from PIL import Image

# -----------------------------------------------------------------------------
# coordinates


def normalize_points(points, width, height):
    """Pixel points (N, 2) (continuous convention, see module docstring) -> [-1, 1] float32 (N, 2)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    scale = np.array([2.0 / width, 2.0 / height])
    return (p * scale - 1.0).astype(np.float32)


def denormalize_points(points, width, height):
    """[-1, 1] points (N, 2) -> continuous pixel coordinates, float32 (N, 2). Inverse of normalize_points."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    scale = np.array([width / 2.0, height / 2.0])
    return ((p + 1.0) * scale).astype(np.float32)


def densest_point(points, radius):
    """One point for several guesses (N, 2) at the same point: the per-axis median of the largest group, the
    guesses within `radius` of the one with the most such neighbours (ties: the smallest sum of distances to all).
    Where the guesses split between objects it lands on the likeliest one; a per-axis median of all of them can land
    on neither (with three groups, its x from one and its y from another)."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    d = np.linalg.norm(p[:, None] - p[None], axis=-1)
    near = d <= radius
    counts = near.sum(1)
    tied = np.flatnonzero(counts == counts.max())
    centre = tied[np.argmin(d[tied].sum(1))]
    return np.median(p[near[centre]], axis=0)


# -----------------------------------------------------------------------------
# counting order (the prompt's rule 3 states it: prompt.ORDERING_RULES)

ORDERINGS = ("reading_order", "left_to_right", "nearest_neighbor")


def order_points(points, strategy="reading_order"):
    """Permutation (int64 indices) that puts the points (N, 2) in counting order.

    reading_order: rows top-to-bottom, left-to-right inside a row. A row starts at the topmost point not yet placed
        and takes every remaining point whose y is within `band` below it; band = 0.5 x the median nearest-neighbour
        distance, so the rows follow the objects' own spacing (tiny dense objects -> thin rows, large sparse ones ->
        tall rows) instead of a fixed pixel band. On a grid with jitter under ~25% of the spacing this recovers the
        grid's rows exactly.
    left_to_right: by x, then y.
    nearest_neighbor: greedy path from the top-left-most point (smallest x + y), always to the nearest unvisited one.
    Ties always break by y, then x, then input index, so the result is deterministic.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(pts)
    if strategy not in ORDERINGS:
        raise ValueError(f"unknown ordering {strategy!r}; choose from {ORDERINGS}")
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    x, y = pts[:, 0], pts[:, 1]
    idx = np.arange(n)
    if strategy == "left_to_right":
        return np.lexsort((idx, y, x)).astype(np.int64)
    by_y = np.lexsort((idx, x, y))  # the tie-break order for everything below
    if strategy == "reading_order":
        band = 0.5 * _median_nn_distance(pts)
        ys = y[by_y]
        row = np.empty(n, dtype=np.int64)
        start, r = 0, 0
        while start < n:  # one iteration per row, each a binary search: cheap even for 3,731 points
            end = int(np.searchsorted(ys, ys[start] + band, side="right"))
            row[start:end] = r
            start, r = end, r + 1
        return by_y[np.lexsort((np.arange(n), x[by_y], row))].astype(np.int64)
    # nearest_neighbor: O(n^2) but each step is one vectorised pass over a shrinking candidate set
    p = pts[by_y]
    s = p[:, 0] + p[:, 1]
    cur = int(np.argmin(s))  # first minimum = topmost among equals
    remaining = np.ones(n, dtype=bool)
    remaining[cur] = False
    cand = np.flatnonzero(remaining)  # kept sorted, so argmin ties go to the top-most, then left-most point
    out = np.empty(n, dtype=np.int64)
    out[0] = cur
    px, py = p[:, 0].copy(), p[:, 1].copy()
    for step in range(1, n):
        cx, cy = px[cand], py[cand]
        d = (cx - px[cur]) ** 2 + (cy - py[cur]) ** 2
        j = int(np.argmin(d))
        cur = int(cand[j])
        out[step] = cur
        cand = np.delete(cand, j)
    return by_y[out].astype(np.int64)


def _median_nn_distance(pts):
    from scipy.spatial import cKDTree

    d, _ = cKDTree(pts).query(pts, k=2)
    nn = d[:, 1]
    nn = nn[nn > 0]  # duplicated points would make the band zero
    return float(np.median(nn)) if len(nn) else 1.0


# -----------------------------------------------------------------------------
# numbered marks

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_SHIFT = 4  # cv2 fixed-point bits: drawn points sit at sub-pixel positions instead of the nearest pixel
_FILL = (255, 255, 255)
_EDGE = (0, 0, 0)
_TEXT = (0, 0, 0)


def mark_radius(width, height):
    """Disc radius in pixels for an image of this size: ~2% of sqrt(area), at least 8 px so that two digits stay
    legible on the 224-px images of the tiny model (224 -> 8, 384x576 -> 9, 640x640 -> 13)."""
    return max(8, int(round(0.02 * np.sqrt(width * height))))


@functools.lru_cache(maxsize=64)
def _label_layout(radius, num_digits):
    """(font scale, thickness, text width, text height, half-width of the label) for a label of num_digits digits.
    The font is sized for two digits inside the disc; longer numbers widen the disc into a capsule rather than
    shrinking the digits below legibility."""
    (w1, h1), _ = cv2.getTextSize("00", _FONT, 1.0, 1)
    scale = 1.5 * radius / w1  # two digits fill ~75% of the disc's diameter
    thickness = max(1, int(round(radius / 8)))
    (tw, th), _ = cv2.getTextSize("0" * num_digits, _FONT, scale, thickness)
    half_width = max(radius, tw / 2 + radius * 0.35)
    return scale, thickness, tw, th, half_width


@functools.lru_cache(maxsize=16384)
def _label_sprite(radius, label):
    """(rgb uint8 (h, w, 3), mask bool (h, w, 3)) of one label, centred on the sprite's middle pixel.
    Rendered once with anti-aliasing and cached: text rendering dominates the cost of drawing a label, and the
    same few thousand labels are drawn again and again during training."""
    scale, thickness, tw, th, half_width = _label_layout(radius, len(label))
    hx, hy = int(np.ceil(half_width)) + 1, radius + 1
    size = (2 * hy + 1, 2 * hx + 1)
    rgb = np.full(size + (3,), 255, dtype=np.uint8)
    alpha = np.zeros(size, dtype=np.uint8)
    rim = max(1, radius // 8)
    dx = half_width - radius
    centres = [(hx - dx, hy), (hx + dx, hy)]

    def shape(img, r, colour):  # a disc, or a capsule when dx > 0
        for cx, cy in centres:
            cv2.circle(img, (int(round(cx * 16)), cy * 16), int(r * 16), colour, -1, cv2.LINE_AA, 4)
        if dx > 0:
            cv2.rectangle(img, (int(round(centres[0][0])), hy - r), (int(round(centres[1][0])), hy + r), colour, -1)

    shape(alpha, radius, 255)
    shape(rgb, radius, _EDGE)
    shape(rgb, radius - rim, _FILL)
    org = (int(round(hx - tw / 2)), int(round(hy + th / 2)))
    cv2.putText(rgb, label, org, _FONT, scale, _TEXT, thickness, cv2.LINE_AA)
    # a hard outer edge (alpha >= 50%) lets placement be one masked copy; the digits inside keep their AA
    rgb.setflags(write=False)
    # the mask is stored per channel: np.copyto with a broadcast mask is ~4x slower than with a full one
    mask = np.ascontiguousarray(np.repeat((alpha >= 128)[:, :, None], 3, axis=2))
    mask.setflags(write=False)
    return rgb, mask


@functools.lru_cache(maxsize=64)
def _dot_sprite(radius):
    """(rgb, mask) of an unnumbered mark: a white dot with a black rim (a black-ringed white pixel at radius 1), for
    objects packed too densely for a number (counting.mark_spec)."""
    hy = radius + 1
    size = (2 * hy + 1, 2 * hy + 1)
    rgb = np.full(size + (3,), 255, dtype=np.uint8)
    alpha = np.zeros(size, dtype=np.uint8)
    cv2.circle(alpha, (hy * 16, hy * 16), radius * 16, 255, -1, cv2.LINE_AA, 4)
    cv2.circle(rgb, (hy * 16, hy * 16), radius * 16, _EDGE, -1, cv2.LINE_AA, 4)
    if radius >= 2:
        cv2.circle(rgb, (hy * 16, hy * 16), (radius - max(1, radius // 4)) * 16, _FILL, -1, cv2.LINE_AA, 4)
    else:
        rgb[hy, hy] = _FILL
    rgb.setflags(write=False)
    mask = np.ascontiguousarray(np.repeat((alpha >= 128)[:, :, None], 3, axis=2))
    mask.setflags(write=False)
    return rgb, mask


def label_half_width(radius, num_digits):
    """Half the width in pixels of a numbered label of num_digits digits at this radius (its half-height is radius)."""
    return _label_layout(int(radius), int(num_digits))[4]


def _paste(canvas, points, sprites):
    """Paste (rgb, mask) sprites centred on the pixels holding the points, in order, clipped to the canvas."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    h, w = canvas.shape[:2]
    if not len(pts):
        return canvas
    # placement is computed for all marks at once; the loop below only copies (it is the whole cost at k=3000)
    size = np.array([s[1].shape[:2] for s in sprites])  # (n, 2) sprite (h, w)
    centres = np.floor(pts).astype(np.int64)  # continuous coords -> index of the pixel holding the point
    x0, y0 = centres[:, 0] - size[:, 1] // 2, centres[:, 1] - size[:, 0] // 2
    x1, y1 = x0 + size[:, 1], y0 + size[:, 0]
    inside = ((x0 >= 0) & (y0 >= 0) & (x1 <= w) & (y1 <= h)).tolist()
    for i, (rgb, mask), a, b, c, d in zip(range(len(pts)), sprites, x0.tolist(), y0.tolist(), x1.tolist(),
                                          y1.tolist()):
        if inside[i]:
            np.copyto(canvas[b:d, a:c], rgb, where=mask)
            continue
        # clip the sprite to the image (marks of objects on the border are cut, not shifted)
        ax, ay, bx, by = max(a, 0), max(b, 0), min(c, w), min(d, h)
        if ax < bx and ay < by:
            sl = np.s_[ay - b : by - b, ax - a : bx - a]
            np.copyto(canvas[ay:by, ax:bx], rgb[sl], where=mask[sl])
    return canvas


def _sprites(n, start_index, radius, dots):
    return [_dot_sprite(radius) if dots else _label_sprite(radius, str(start_index + i)) for i in range(n)]


def mark_objects(image, points, start_index=1, radius=None, dots=False):
    """Draw numbered labels start_index, start_index+1, ... at the pixel points (N, 2) on a copy of the RGB image
    (dots=True: unnumbered dots of that radius instead).

    Each label is a white disc with a black rim and the number in black (a capsule for 3+ digits); its size scales
    with the image (mark_radius) unless radius is given. Marks are pre-rendered sprites (cached) pasted with one
    masked copy each into a single numpy copy of the image, so marking k objects costs k small copies, never k
    whole-image passes. A mark is centred on the pixel that contains its point; later marks cover earlier ones.
    """
    canvas = np.array(image.convert("RGB"))  # the one copy; the caller's image is left untouched
    h, w = canvas.shape[:2]
    r = int(radius or mark_radius(w, h))
    n = len(np.asarray(points).reshape(-1, 2))
    return Image.fromarray(_paste(canvas, points, _sprites(n, start_index, r, dots)))


def mark_mask(width, height, points, start_index=1, radius=None, dots=False):
    """bool (height, width): the pixels mark_objects would cover with the same arguments."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    r = int(radius or mark_radius(width, height))
    sprites = [(np.full_like(m, 255, dtype=np.uint8), m)
               for _, m in _sprites(len(np.asarray(points).reshape(-1, 2)), start_index, r, dots)]
    return _paste(canvas, points, sprites)[:, :, 0] > 0


# -----------------------------------------------------------------------------
# visualisation (W&B, evaluation, dataset previews)


def draw_prediction(image, pred_xy, gt_xy=None):
    """Copy of the image with the predicted point as a red cross and the ground truth as a green circle.
    Points are continuous pixel coordinates (x, y); either may be None or off-image (then it is not drawn)."""
    canvas = np.array(image.convert("RGB"))
    h, w = canvas.shape[:2]
    size = max(4, int(round(0.015 * np.sqrt(w * h))))
    thickness = max(2, size // 4)

    def to_fixed(p):
        x, y = np.asarray(p, dtype=np.float64).reshape(2)
        return int(round((x - 0.5) * (1 << _SHIFT))), int(round((y - 0.5) * (1 << _SHIFT)))

    if gt_xy is not None:
        cv2.circle(canvas, to_fixed(gt_xy), (size + thickness) << _SHIFT, (0, 200, 0), thickness, cv2.LINE_AA, _SHIFT)
    if pred_xy is not None:
        x, y = to_fixed(pred_xy)
        d = size << _SHIFT
        for (ax, ay), (bx, by) in (((x - d, y - d), (x + d, y + d)), ((x - d, y + d), (x + d, y - d))):
            cv2.line(canvas, (ax, ay), (bx, by), (255, 0, 0), thickness, cv2.LINE_AA, _SHIFT)
    return Image.fromarray(canvas)


def side_by_side(left, right, gap=4):
    """Two images next to each other on a white background (heights may differ; tops aligned)."""
    left, right = left.convert("RGB"), right.convert("RGB")
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out


def add_caption(image, text, font_size=None):
    """The image above a white strip holding `text` (multi-line), for previews whose prompt should be readable."""
    from PIL import ImageDraw, ImageFont

    font_size = font_size or max(10, image.width // 45)
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow without FreeType sizes
        font = ImageFont.load_default()
    import textwrap

    per_line = max(20, int(image.width / (font_size * 0.55)))  # rough glyph width of the default font
    lines = [w for line in text.split("\n") for w in (textwrap.wrap(line, per_line) or [""])]
    line_h = int(font_size * 1.3)
    out = Image.new("RGB", (image.width, image.height + line_h * len(lines) + 8), (255, 255, 255))
    out.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, image.height + 4 + i * line_h), line, fill=(0, 0, 0), font=font)
    return out


# -----------------------------------------------------------------------------
# files


class DataError(ValueError):
    """Bad data on disk or bad data arguments; the message is one line naming the file/folder and the problem."""


def replace_atomic(path, write):
    """Call write(temp_path) and rename the result over `path`: readers never see a half-written file, and a crash
    leaves the previous file intact. The file gets the usual permissions (mkstemp's are private)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-",
                               suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    replace_atomic(path, write)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


# -----------------------------------------------------------------------------
# the process


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for the next tensor instead of handing it back to the OS: for a CPU run.

    By default glibc serves blocks above its mmap threshold (128 KiB, raised as blocks are freed) with a fresh mmap
    and gives freed heap tops back, so each step's activations are page-faulted in anew. On 2 cores the demo's
    training ran 15.0-15.2 steps/s with the thresholds below against 13.9-14.2 without (300 steps of
    configs/demo.yaml, runs alternated, docs/VLM_WORKFLOW.md §4b). Blocks of 32 MiB and up still come from mmap, so a
    large model's weights are not pinned in the heap. The arithmetic is unchanged. Returns whether the settings took
    (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):  # no such library, or a libc without mallopt
        mallopt = None
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a demo of the numbered marks at several image sizes.")
    parser.add_argument("--demo", default="marks_demo.png", help="output PNG")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    panels = []
    for w, h in ((224, 224), (576, 384), (640, 640)):
        img = Image.fromarray(rng.integers(60, 200, (h, w, 3), dtype=np.uint8))
        pts = np.stack([rng.uniform(0, w, 120), rng.uniform(0, h, 120)], 1)
        panels.append(mark_objects(img, pts[:12 if w == 224 else 120]))
    out = functools.reduce(side_by_side, panels)
    out.save(args.demo)
    print(f"wrote {args.demo}")

