"""
Times what the data pipeline does per training sample, on one core.

    python benchmarks/bench_data.py            # add --json for one JSON object

1. One marked sample at k = 10, 100, 1000, 3000 on a 384x576 image (FSC-147's size): mark_objects alone (warm label
   cache, as after the first few batches; the first-call cost of rendering the label sprites is shown as `cold`),
   and the whole CountingDataset.__getitem__ (JPEG decode + resize check + ordering cache + marking).
   Target: k = 3000 under 20 ms.
2. order_points for n = 100, 1000, 3731 (FSC-147's largest image) per strategy. Target: nearest_neighbor at 3731
   under 200 ms.
"""

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the target says
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import dataset  # noqa: E402
import utils  # noqa: E402

torch.set_num_threads(1)


class FixedK:
    """Stands in for the sample's rng so that exactly k objects are marked."""

    def __init__(self, k):
        self.k = k

    def integers(self, *args, **kwargs):
        return self.k

    def random(self):
        return 1.0


def best_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times), 1000 * float(np.median(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w, h = 576, 384
    results = {"marking": {}, "sample": {}, "ordering": {}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "img.jpg")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        image = Image.open(path).convert("RGB")
        for k in (10, 100, 1000, 3000):
            pts = rng.uniform(0, [w, h], (k + 1, 2)).astype(np.float32)
            utils._label_sprite.cache_clear()
            t = time.perf_counter()
            utils.mark_objects(image, pts[:k])
            cold = 1000 * (time.perf_counter() - t)
            best, med = best_ms(lambda: utils.mark_objects(image, pts[:k]), args.repeat)
            results["marking"][k] = {"cold_ms": round(cold, 2), "best_ms": round(best, 2), "median_ms": round(med, 2)}
            # a whole sample with exactly k marked: a one-record dataset whose draw of k is forced
            rec = dataset.CountingRecord("bench", "objects", pts, path, w, h)
            ds = dataset.CountingDataset([rec], "reading_order")
            ds[0]  # fills the ordering cache, like the first epoch does
            best, med = best_ms(lambda: ds.make_sample(0, FixedK(k)), args.repeat)
            results["sample"][k] = {"best_ms": round(best, 2), "median_ms": round(med, 2)}
    for n in (100, 1000, 3731):
        pts = rng.uniform(0, [w, h], (n, 2))
        results["ordering"][n] = {}
        for s in utils.ORDERINGS:
            utils.order_points(pts, s)  # imports (scipy) out of the timing
            best, med = best_ms(lambda: utils.order_points(pts, s), max(3, args.repeat // 2))
            results["ordering"][n][s] = round(med, 2)
    if args.json:
        print(json.dumps(results))
        return
    print(f"marked sample on a {w}x{h} image, one core (ms; mark = mark_objects only, sample = __getitem__ incl. "
          "JPEG decode)")
    print(f"{'k':>6} {'mark cold':>10} {'mark warm':>10} {'sample':>10}")
    for k in results["marking"]:
        m, s = results["marking"][k], results["sample"][k]
        print(f"{k:>6} {m['cold_ms']:>10.2f} {m['median_ms']:>10.2f} {s['median_ms']:>10.2f}")
    print("\norder_points (median ms)")
    print(f"{'n':>6} " + " ".join(f"{s:>17}" for s in utils.ORDERINGS))
    for n, row in results["ordering"].items():
        print(f"{n:>6} " + " ".join(f"{row[s]:>17.2f}" for s in utils.ORDERINGS))


if __name__ == "__main__":
    main()
