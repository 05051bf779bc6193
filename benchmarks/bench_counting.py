"""
What the counting protocol itself costs, measured with the oracle (a scripted perfect model, counting.Oracle) through
evaluate_vlm_regression.count_records: count error on the synthetic test split and on a dense FSC-147-format set,
with and without noise; count error against object spacing on jittered grids; and the time of one counted object at
n = 1,000 with the tiny model (one forward, one mark).

    python benchmarks/bench_counting.py                       # everything, JSON to stdout
    python benchmarks/bench_counting.py --skip_timing         # protocol figures only (no model)

Dense set: synthetic_data.write_dense_fsc147 at 384 x 576 (hard-core random centres, exemplar boxes of the objects'
size). Spacing sweep: jittered grids (10% of the spacing) with no object size, so the protocol's scale comes from the
spacing of the counted points alone.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import counting  # noqa: E402
import dataset as data  # noqa: E402
import evaluate_vlm_regression as ev  # noqa: E402
import synthetic_data as synth  # noqa: E402

W, H = 576, 384
DENSE_COUNTS = (10, 30, 100, 300, 1000, 2000, 3731)


def oracle(records, noise, **kw):
    m = ev.count_records(counting.Oracle(noise), None, records, batch_size=8, **kw)["metrics"]
    return {k: m[k] for k in ("num_images", "mae", "rmse", "mean_count_error", "f1", "stop_reasons")} | {
        "per_count_bin": {b: s for b, s in m["per_count_bin"].items() if s["num_images"]}}


def jittered_grid(spacing, seed, origin=None, extent=None):
    """A grid of the given spacing from `origin` (default: half a spacing) to `extent` px (default: the image),
    each point jittered by up to 10% of the spacing."""
    origin = spacing / 2 if origin is None else origin
    xs = np.arange(origin, min(W, extent or W), spacing)
    ys = np.arange(origin, min(H, extent or H), spacing)
    pts = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    pts += np.random.default_rng(seed).uniform(-0.1, 0.1, pts.shape) * spacing
    return np.clip(pts, 0, [W - 1, H - 1]).astype(np.float32)


def spacing_sweep(blank, noises=(1.0, 2.0), spacings=(4, 6, 8, 10, 12, 14, 16), seeds=3):
    out = {}
    for noise in noises:
        for s in spacings:
            # a 200 x 200 px patch of the image: 2,500 objects at 4 px, 144 at 16 px
            recs = [data.CountingRecord(f"grid{s}-{k}", "dots", jittered_grid(s, k, origin=10.0, extent=210.0),
                                        blank, W, H) for k in range(seeds)]
            m = ev.count_records(counting.Oracle(noise), None, recs, min_pixels=W * H, max_pixels=W * H)
            gt = np.mean([len(r.points) for r in recs])
            out[f"noise {noise:g} px, spacing {s} px"] = {
                "objects": gt, "mae": m["metrics"]["mae"], "relative_error": m["metrics"]["mae"] / gt,
                "mean_signed_error": m["metrics"]["mean_count_error"], "stop_reasons": m["metrics"]["stop_reasons"]}
    return out


def original_protocol(blank):
    """The three failures of the original protocol (--stop_rule coordinate: done = (-1, -1) within 0.05, repeat
    radius = the mark radius; numbered labels at the image's mark radius) next to the current one, both counted by
    the noiseless oracle: a grid whose first object sits at (7.4, 7.4) px, jittered grids at shrinking spacing, and
    the share of training targets hidden under earlier labels."""
    out = {"grid_first_object_at_7px": {}, "jittered_grid_share_counted": {}, "targets_hidden": {}}
    xs, ys = np.arange(7.4, W, 14.8), np.arange(7.4, H, 14.8)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.float32)
    for name, kw in (("original", {"stop_rule": "coordinate", "mark_style": "numbers"}), ("current", {})):
        rec = [data.CountingRecord("grid", "dots", grid, blank, W, H)]
        m = ev.count_records(counting.Oracle(0.0), None, rec, min_pixels=W * H, max_pixels=W * H, **kw)
        out["grid_first_object_at_7px"][name] = {"objects": len(grid), "counted": m["predictions"][0]["pred_count"]}
        for s in (14.9, 12.1, 10.5):
            # starts 20 px in, clear of the (-1, -1) corner, so the repeat rule alone is measured
            recs = [data.CountingRecord(f"g{s}", "dots", jittered_grid(s, 0, origin=20.0), blank, W, H)]
            p = ev.count_records(counting.Oracle(0.0), None, recs, min_pixels=W * H, max_pixels=W * H,
                                 **kw)["predictions"][0]
            out["jittered_grid_share_counted"].setdefault(name, {})[f"spacing {s} px"] = {
                "objects": p["gt_count"], "share_counted": p["pred_count"] / p["gt_count"]}
    for n in (500, 1000, 2000, 3000):
        pts, _ = synth.dense_layout(n, 1, W, H)
        order = counting.utils.order_points(pts, "reading_order")
        ks = np.random.default_rng(n).integers(1, n, 200)
        out["targets_hidden"][f"n={n}"] = {style: counting.hidden_share(pts, order, ks, None, W, H, style)
                                           for style in ("numbers", "auto")}
    return out


def timing(n=1000, repeats=20):
    """ms of one tiny-model forward on a 384 x 576 image with n marks, and ms of one counting step's marking."""
    import torch

    import model_vlm_regression as mvr
    from prompt import encode_batch

    torch.manual_seed(0)
    model, processor = mvr.build_model("tiny-random", stop_rule="head")
    model.eval()
    pts, size = synth.dense_layout(n, 0, W, H)
    image = Image.new("RGB", (W, H), (128, 128, 128))
    spec = counting.mark_spec(counting.protocol_scale(pts, size), W, H, n)
    marked = counting.draw_marks(image, pts, spec)
    batch = encode_batch(processor, [marked], ["dots"], [n])
    with torch.no_grad():
        model(**batch)
        t = time.perf_counter()
        for _ in range(repeats):
            model(**encode_batch(processor, [marked], ["dots"], [n]))
        forward_ms = (time.perf_counter() - t) / repeats * 1000
    t = time.perf_counter()
    for k in range(1, 201):  # one new mark pasted onto the marked image, as count_records does when the style holds
        counting.draw_marks(marked, pts[k - 1:k], spec, start_index=k)
    mark_ms = (time.perf_counter() - t) / 200 * 1000
    t = time.perf_counter()
    for _ in range(5):
        counting.draw_marks(image, pts, spec)  # all n redrawn: what a change of scale costs
    redraw_ms = (time.perf_counter() - t) / 5 * 1000
    return {"objects": n, "mark_style": spec, "forward_ms_incl_processor": forward_ms, "mark_ms": mark_ms,
            "redraw_all_ms": redraw_ms, "threads": torch.get_num_threads()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic_images", type=int, default=200, help="synthetic test images counted by the oracle")
    p.add_argument("--skip_timing", action="store_true", help="protocol figures only")
    p.add_argument("--only", choices=("original", "timing"), default=None, help="just one part")
    args = p.parse_args(argv)
    out = {}
    if args.only:
        with tempfile.TemporaryDirectory() as tmp:
            blank = os.path.join(tmp, "blank.png")
            Image.new("RGB", (W, H), (128, 128, 128)).save(blank)
            out = original_protocol(blank) if args.only == "original" else timing()
        print(json.dumps(out, indent=1))
        return
    with tempfile.TemporaryDirectory() as tmp:
        synth_test = data.load_records("synthetic", split="test", seed=42)[0][: args.synthetic_images]
        out["synthetic_test"] = {f"noise {n:g} px": oracle(synth_test, n) for n in (0.0, 1.0, 2.0)}
        synth.write_dense_fsc147(tmp, DENSE_COUNTS, seed=0)
        dense = data.load_records("fsc147", tmp, "test")[0]
        out["dense_fsc147"] = {f"noise {n:g} px": oracle(dense, n) for n in (0.0, 1.0, 2.0)}
        blank = os.path.join(tmp, "blank.png")
        Image.new("RGB", (W, H), (128, 128, 128)).save(blank)
        out["spacing_sweep"] = spacing_sweep(blank)
        out["original_vs_current"] = original_protocol(blank)
    if not args.skip_timing:
        out["timing"] = timing()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
