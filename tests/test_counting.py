"""The counting protocol at every density: the oracle (a scripted perfect model) counts exactly through the same
marking, stop and metric code as a trained model, and marks never hide what is left to count."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import counting
import dataset as data
import evaluate_vlm_regression as ev
import synthetic_data as synth
from conftest import ROOT

W, H = 576, 384  # FSC-147's frame: 384 high, ~576 wide


def grid(spacing, jitter=0.0, seed=0, origin=1.0):
    """Points on a grid of the given spacing filling W x H from `origin` (an object at (1, 1) by default)."""
    xs = np.arange(origin, W - 1, spacing)
    ys = np.arange(origin, H - 1, spacing)
    pts = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    if jitter:
        pts = pts + np.random.default_rng(seed).uniform(-jitter, jitter, pts.shape) * spacing
    return np.clip(pts, 0, [W - 1, H - 1])


def hard_core(n, min_dist, seed=0):
    """n uniform random points with centres at least min_dist apart."""
    return synth.hard_core_points(n, min_dist, W, H, np.random.default_rng(seed))


@pytest.fixture(scope="module")
def blank(tmp_path_factory):
    path = tmp_path_factory.mktemp("oracle") / "blank.png"
    Image.new("RGB", (W, H), (128, 128, 128)).save(path)
    return str(path)


def records(blank, layouts, object_size=None):
    """One record per layout on the blank image; object_size: one for all, or one per layout."""
    sizes = object_size if isinstance(object_size, list) else [object_size] * len(layouts)
    return [data.CountingRecord(f"img{i}", "dots", pts.astype(np.float32), blank, W, H, object_size=size)
            for i, (pts, size) in enumerate(zip(layouts, sizes))]


def oracle_count(recs, noise_px=0.0, **kw):
    return ev.count_records(counting.Oracle(noise_px), None, recs, ordering="reading_order", min_pixels=W * H,
                            max_pixels=W * H, batch_size=4, **kw)


def test_spacing_is_a_low_percentile_of_nearest_neighbour_distances():
    pts = grid(10.0)[:200]
    assert counting.spacing(pts) == pytest.approx(10.0)
    assert counting.spacing(pts[:1]) is None
    assert counting.protocol_scale(pts[:1]) is None
    assert counting.protocol_scale(pts, object_size=6.0) == 6.0
    assert counting.repeat_radius(None) is None and counting.repeat_radius(8.0) == 4.0


def test_auto_marks_are_the_original_labels_where_they_fit_and_dots_where_they_do_not():
    full = ev.utils.mark_radius(W, H)
    assert counting.mark_spec(None, W, H, 5) == ("numbers", full)
    assert counting.mark_spec(200.0, W, H, 5) == ("numbers", full)
    kind, r = counting.mark_spec(30.0, W, H, 1234)  # 4 digits: a smaller label still fits a 30-px spacing
    assert kind == "numbers" and counting.MIN_LABEL_RADIUS <= r < full
    kind, r = counting.mark_spec(4.0, W, H, 3000)
    assert kind == "dots" and r == 1
    assert counting.mark_spec(4.0, W, H, 3000, style="numbers") == ("numbers", full)


@pytest.mark.parametrize("layout", ["grid", "jittered", "random"])
def test_marks_hide_at_most_one_percent_of_targets_at_3000_objects(layout):
    pts = {"grid": lambda: grid(8.6)[:3000], "jittered": lambda: grid(8.6, 0.25, seed=1)[:3000],
           "random": lambda: hard_core(3000, 4.0, seed=2)}[layout]()
    assert len(pts) == 3000 and np.min(np.linalg.norm(pts[:, None] - pts[None], axis=2)
                                      + np.eye(len(pts)) * 1e9) >= 4.0
    order = ev.utils.order_points(pts, "reading_order")
    ks = np.random.default_rng(0).integers(1, len(pts), 150)
    assert counting.hidden_share(pts, order, ks, None, W, H) <= 0.01
    # and the original fixed-size labels do hide them: the test would catch a regression to them
    assert counting.hidden_share(pts, order, ks, None, W, H, style="numbers") > 0.5


def test_oracle_counts_exactly_at_every_density_up_to_4000_objects(blank):
    """MAE 0 for the noiseless oracle from 10 to 4,000 objects with centres >= 3 px apart, including an object at
    (1, 1) px, where the old (-1, -1) stop rule stopped at 0. Grids need no object size (their spacing is the
    scale); random layouts carry one, as FSC-147's exemplars and OmniCount's boxes do (objects no closer than their
    size)."""
    layouts = [grid(3.0)[:4000], grid(8.0), grid(14.9, 0.2, seed=3), hard_core(4000, 3.0, seed=4),
               hard_core(1000, 3.0, seed=5), hard_core(10, 3.0, seed=6)]
    sizes = [None, None, None, 3.0, 3.0, 3.0]
    assert tuple(layouts[0][0]) == (1.0, 1.0)
    out = oracle_count(records(blank, layouts, sizes))
    m = out["metrics"]
    assert [p["pred_count"] for p in out["predictions"]] == [len(p) for p in layouts]
    assert m["mae"] == 0 and m["stop_reasons"] == {"done": len(layouts)}
    assert m["f1"] == 1.0 and m["point_to_nearest_object_px_median"] < 0.01
    assert m["f1_object_radius"] == 1.0 and m["images_with_object_size"] == 3  # the layouts given a size


def test_a_model_that_points_at_a_counted_object_is_stopped(blank):
    """The repeat rule: an oracle that gives its previous point again after 5 objects is stopped there."""

    class Repeats(counting.Oracle):
        def predict(self, states):
            xy, done = super().predict(states)
            for i, s in enumerate(states):
                if len(s["points"]) == 5:
                    xy[i] = ev.utils.normalize_points(np.asarray(s["points"][-1]) + 1.0, *s["size"])[0]
            return xy, done

    out = ev.count_records(Repeats(), None, records(blank, [grid(20.0)]), min_pixels=W * H, max_pixels=W * H)
    assert out["predictions"][0]["pred_count"] == 5 and out["predictions"][0]["stop_reason"] == "repeat"


def test_oracle_with_1px_noise_counts_exactly_at_12px_spacing(blank):
    layouts = [grid(12.0), grid(12.0, 0.1, seed=7), grid(16.0, 0.2, seed=8)]
    m = oracle_count(records(blank, layouts), noise_px=1.0)["metrics"]
    assert m["mae"] == 0, m
    assert 0.3 < m["point_to_nearest_object_px_median"] < 2  # the noise, seen by the point-error metric


def test_coordinate_stop_rule_reproduces_the_old_failure(blank):
    """--stop_rule coordinate: (-1, -1) means done, so an object at (1, 1) px ends the count at 0."""
    out = oracle_count(records(blank, [grid(40.0)]), stop_rule="coordinate")
    assert out["predictions"][0]["pred_count"] == 0 and out["predictions"][0]["stop_reason"] == "done"


def test_metrics_per_count_bin_and_per_class():
    preds = [{"gt_count": g, "pred_count": p, "object_type": t} for g, p, t in
             [(5, 6, "a"), (8, 8, "b"), (30, 20, "a"), (600, 650, "b")]]
    bins = counting.per_count_bin(preds)
    assert bins["1-10"] == {"num_images": 2, "mae": 0.5, "rmse": pytest.approx(np.sqrt(0.5)),
                            "mean_signed_error": 0.5}
    assert bins["11-50"]["mean_signed_error"] == -10 and bins["51-150"]["num_images"] == 0
    assert bins["501+"]["mae"] == 50
    cls = counting.per_group(preds, lambda p: p["object_type"])
    assert cls["groups"]["a"]["rmse"] == pytest.approx(np.sqrt((1 + 100) / 2))
    assert cls["mrmse"] == pytest.approx((np.sqrt(101 / 2) + np.sqrt(2500 / 2)) / 2)


def test_metrics_per_step():
    """per_step: the k-th points of all images, in counting order, against each image's own match radius."""
    preds = [{"nearest_object_px": [1.0, 9.0, 2.0, 3.0, 30.0], "match_radius_px": 8.0},
             {"nearest_object_px": [10.0], "match_radius_px": 12.0},
             {"nearest_object_px": [], "match_radius_px": 8.0}]
    s = counting.per_step(preds)
    assert s["1"] == {"points": 2, "within_radius": 1.0, "median_px": 5.5}
    assert s["2"] == {"points": 1, "within_radius": 0.0, "median_px": 9.0}
    assert s["4-10"] == {"points": 2, "within_radius": 0.5, "median_px": 16.5}
    assert s["11-50"] == {"points": 0, "within_radius": None, "median_px": None}


def run_cli(*args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_oracle_cli_on_a_dense_fsc147_set_and_marks_statistic(tmp_path):
    """`evaluate --oracle` needs no checkpoint: on an FSC-147-format set from 10 to 3,731 objects it counts exactly,
    writes metrics.json with the per-count-bin view, and `dataset.py --stats --json` reports marks hiding <= 1% of
    the training targets there, where the original numbered labels hide more."""
    root = tmp_path / "dense"
    synth.write_dense_fsc147(str(root), [10, 60, 400, 1200, 3731], seed=1)
    out = tmp_path / "oracle"
    proc = run_cli("evaluate_vlm_regression.py", "--oracle", "--dataset", "fsc147", "--data_root", str(root),
                   "--split", "test", "--output_dir", str(out), "--num_vis", "1")
    m = json.loads((out / "metrics.json").read_text())
    assert m["mae"] == 0 and m["num_images"] == 5 and m["stop_reasons"] == {"done": 5}
    assert m["per_count_bin"]["501+"]["num_images"] == 2 and m["per_count_bin"]["501+"]["mae"] == 0
    assert m["per_step"]["1"] == {"points": 5, "within_radius": 1.0, "median_px": 0.0}
    assert m["per_step"]["151+"]["points"] == (400 - 150) + (1200 - 150) + (3731 - 150)
    assert m["per_step"]["151+"]["within_radius"] == 1.0
    assert m["oracle"] == {"noise_px": 0.0} and m["checkpoint"] is None
    assert "by ground-truth count" in proc.stdout and (out / "vis").is_dir()
    stats = json.loads(run_cli("dataset.py", "--dataset", "fsc147", "--data_root", str(root), "--split", "test",
                               "--stats", "--json").stdout)
    assert 0 <= stats["targets_hidden_by_marks"] <= 0.01
    numbers = json.loads(run_cli("dataset.py", "--dataset", "fsc147", "--data_root", str(root), "--split", "test",
                                 "--stats", "--json", "--mark_style", "numbers").stdout)
    assert numbers["targets_hidden_by_marks"] > stats["targets_hidden_by_marks"]


def test_oracle_cli_on_the_synthetic_test_split(tmp_path):
    """The embedded default: the oracle counts the synthetic test split exactly, with and without 1 px noise."""
    for noise in ("0", "1"):
        out = tmp_path / f"noise{noise}"
        run_cli("evaluate_vlm_regression.py", "--oracle", "--oracle_noise_px", noise, "--split", "test",
                "--num_images", "60", "--output_dir", str(out), "--num_vis", "0")
        m = json.loads((out / "metrics.json").read_text())
        assert m["mae"] == 0 and m["num_images"] == 60 and m["f1"] == 1.0, (noise, m)


def test_oracle_cli_needs_an_output_dir_and_no_checkpoint():
    proc = subprocess.run([sys.executable, "evaluate_vlm_regression.py", "--oracle"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--oracle needs --output_dir" in proc.stderr
    proc = subprocess.run([sys.executable, "evaluate_vlm_regression.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "give --checkpoint, or --oracle" in proc.stderr
