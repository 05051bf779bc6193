"""Sequential counting evaluation: stop rules, Hungarian matching and metrics checked by hand with a scripted model
stand-in; the real tiny model from a real training run end to end through the CLI on FSC-147 and OmniCount fixtures;
batched counting gives the points of one-by-one counting."""
import itertools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dataset as data
import evaluate_vlm_regression as ev
import model_vlm_regression as mvr
import utils
from conftest import ROOT
from data_fixtures import write_fsc147, write_omnicount

# -----------------------------------------------------------------------------
# The fixture: four records with known points, each with its own object type so the stand-in can tell them apart.
# Sizes are in pixels of the image file; 64x64 is its own model-input frame, 100x60 becomes 96x64.

OFF_OBJECT = [(x, y) for y in (22, 34) for x in (6, 18, 30, 42, 54)] + [(6, 4)]  # > 8 px from every "coins" object
RECORDS = {  # type: (file size, ground-truth points)
    "eggs": ((64, 64), [(10, 10), (30, 12), (50, 40)]),
    "cups": ((100, 60), [(20, 20), (70, 40)]),
    "coins": ((64, 64), [(10, 50), (30, 50), (50, 50), (50, 10)]),
    "cells": ((64, 64), [(5, 5)]),
}


def script_points():
    """type -> the point (pixels of the model-input frame) the stand-in answers with k objects marked."""
    cups = np.array(RECORDS["cups"][1], np.float64) * [96 / 100, 64 / 60]
    return {
        "eggs": RECORDS["eggs"][1] + ["done"],  # counts all three, then answers (-1, -1)
        "cups": [tuple(cups[0]), tuple(cups[1]), tuple(cups[1] + [3, 0])],  # then points 3 px from mark 2: repeat
        "coins": RECORDS["coins"][1][:2] + OFF_OBJECT,  # two right, then never stops, never on an object
        "cells": ["done"],  # stops at once
    }


def make_records(root):
    records = []
    for i, (name, ((w, h), pts)) in enumerate(RECORDS.items()):
        path = os.path.join(root, f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(60, 200, (h, w, 3), dtype=np.uint8)).save(path)
        records.append(data.CountingRecord(f"img{i}", name, np.array(pts, np.float32), path, w, h))
    return records


class ScriptedModel(torch.nn.Module):
    """Stand-in for VLMRegressionModel.forward: reads the object type and the number marked back from each prompt and
    answers the scripted point. It also checks that each image is exactly the training-style marked image
    (prepare_image, then mark_objects of the points counted so far) and logs each call's batch size."""

    def __init__(self, processor, records, script, check_marks=True):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the stand-in a device
        self.processor, self.script, self.check_marks, self.calls = processor, script, check_marks, []
        self.frames = {r.object_type: data.prepare_image(r)[0] for r in records}

    def point(self, name, k):
        w, h = self.frames[name].size
        p = self.script[name][k]
        return np.array([-0.99, -0.98]) if p == "done" else utils.normalize_points(p, w, h)[0]

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, **_ignored):
        texts = self.processor.tokenizer.batch_decode(input_ids)
        sizes = image_grid_thw.prod(1).tolist()
        out = []
        for text, pixels in zip(texts, torch.split(pixel_values, sizes)):
            name = re.search(r"Count the (.+?) in this image", text).group(1)
            k = int(re.search(r"(\d+) objects? (?:is|are) already marked", text).group(1))
            image = self.frames[name]
            if not self.check_marks:  # teacher forcing: the marks are ground truth, not the script's points
                out.append(self.point(name, k))
                continue
            marks = utils.denormalize_points(np.array([self.point(name, j) for j in range(k)]), *image.size)
            expected = self.processor.image_processor(images=[utils.mark_objects(image, marks)], return_tensors="pt")
            assert torch.equal(pixels, expected["pixel_values"]), f"{name}: image differs from training's at k={k}"
            out.append(self.point(name, k))
        self.calls.append(len(texts))
        return torch.tensor(np.array(out), dtype=torch.float32)


@pytest.fixture(scope="module")
def fixture_records(tmp_path_factory):
    return make_records(tmp_path_factory.mktemp("eval_images"))


# -----------------------------------------------------------------------------
# Pure pieces


def test_stop_rule_each_reason():
    """Counting stops when the stop head's probability exceeds the threshold ('done', which wins), or, under the
    coordinate rule, on (-1, -1) within 0.05; on a point within the repeat radius of a mark ('repeat'); never on a
    position alone under the stop head; max_steps is 2 x the largest count + 5, capped."""
    marked = np.array([[20.0, 20.0]])
    norm = lambda x, y: utils.normalize_points([x, y], 64, 64)[0]  # noqa: E731
    assert ev.stop_reason([-0.97, -0.99], None, marked, 64, 64, 8) == "done"
    assert ev.stop_reason([-0.94, -0.99], None, marked, 64, 64, 8) is None  # 0.06 from -1: not within 0.05
    assert ev.stop_reason([-1.0, -1.0], 0.2, marked, 64, 64, 8) is None  # the head decides, not the corner
    assert ev.stop_reason([0.5, 0.5], 0.6, marked, 64, 64, 8) == "done"
    assert ev.stop_reason([0.5, 0.5], 0.6, marked, 64, 64, 8, done_threshold=0.7) is None
    assert ev.stop_reason(norm(27.9, 20), 0.0, marked, 64, 64, 8) == "repeat"
    assert ev.stop_reason(norm(28.1, 20), 0.0, marked, 64, 64, 8) is None
    assert ev.stop_reason(norm(20, 20), 0.0, marked, 64, 64, None) is None  # no scale yet: no repeat rule
    assert ev.stop_reason(norm(20, 20), None, np.zeros((0, 2)), 64, 64, 8) is None  # nothing marked to repeat
    assert ev.stop_reason([-1, -1], None, [[0.0, 0.0]], 64, 64, 8) == "done"  # done wins over repeat
    assert ev.stop_reason(norm(0, 0), 0.9, [[0.0, 0.0]], 64, 64, 8) == "done"
    assert ev.default_max_steps([data.CountingRecord("a", "t", np.zeros((4, 2)))]) == 13
    assert ev.default_max_steps([data.CountingRecord("a", "t", np.zeros((3731, 2)))]) == 2 * 3731 + 5
    assert ev.default_max_steps([data.CountingRecord("a", "t", np.zeros((5000, 2)))]) == ev.MAX_STEPS_CAP


def brute_force_matches(pred, gt, radius):
    """Largest number of one-to-one pairs within radius, by trying every assignment."""
    if len(pred) > len(gt):
        pred, gt = gt, pred
    best = 0
    for perm in itertools.permutations(range(len(gt)), len(pred)):
        best = max(best, sum(np.hypot(*np.subtract(pred[i], gt[j])) <= radius for i, j in enumerate(perm)))
    return best


def test_hungarian_matching_is_one_to_one_and_maximal():
    """match_points finds the largest one-to-one matching within the radius: it must agree with brute force."""
    # nearest-first greedy pairs (5,0) with (0,0) and leaves (0,4) unmatched; the best has 2 pairs
    assert ev.match_points([(5, 0), (0, 4)], [(0, 0), (10, 0)], 6) == 2
    # least total distance pairs (0,0)-(-50,0) and (100,0)-(5,0): 0 pairs within 6 px; the best has 1
    assert ev.match_points([(0, 0), (100, 0)], [(5, 0), (-50, 0)], 6) == 1
    # one object, three predictions on it: one match (one-to-one)
    assert ev.match_points([(1, 1), (2, 2), (0, 1)], [(1, 1)], 5) == 1
    assert ev.match_points(np.zeros((0, 2)), [(1, 1)], 5) == 0 and ev.match_points([(1, 1)], np.zeros((0, 2)), 5) == 0
    rng = np.random.default_rng(0)
    for _ in range(25):
        pred, gt = rng.uniform(0, 30, (rng.integers(1, 6), 2)), rng.uniform(0, 30, (rng.integers(1, 6), 2))
        assert ev.match_points(pred, gt, 7.0) == brute_force_matches(pred.tolist(), gt.tolist(), 7.0)


# -----------------------------------------------------------------------------
# Counting with the stand-in: every number computed by hand

EXPECTED = {  # type: (pred count, stop reason, forward passes, predictions within 8 px of an object)
    "eggs": (3, "done", 4, 3), "cups": (2, "repeat", 3, 2), "coins": (13, "max_steps", 13, 2),
    "cells": (0, "done", 1, 0)}


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_counting_metrics_by_hand(tiny_processor, fixture_records, batch_size):
    """Counting with a scripted model gives the counts, stop reasons, forward passes and metrics worked out by hand,
    whatever the batch size."""
    model = ScriptedModel(tiny_processor, fixture_records, script_points())
    out = ev.count_records(model, tiny_processor, fixture_records, batch_size=batch_size, train_mean_count=2.5)
    preds = {p["object_type"]: p for p in out["predictions"]}
    for name, (count, reason, steps, matched) in EXPECTED.items():
        p = preds[name]
        got = (p["pred_count"], p["stop_reason"], p["steps"], p["num_matched"])
        assert got == (count, reason, steps, matched), name
        assert p["gt_count"] == len(RECORDS[name][1]) and p["image"] == f"img{list(RECORDS).index(name)}"
    # points come back in the frame of the file (100x60), in counting order
    np.testing.assert_allclose(preds["cups"]["points"], RECORDS["cups"][1], atol=1e-3)
    np.testing.assert_allclose(preds["coins"]["points"], (RECORDS["coins"][1][:2] + OFF_OBJECT)[:13], atol=1e-3)
    m = out["metrics"]
    # |error| per image: eggs 0, cups 0, coins 13-4=9, cells 0-1=1
    assert m["num_images"] == 4
    assert m["mae"] == pytest.approx(10 / 4) and m["rmse"] == pytest.approx(np.sqrt(82 / 4))
    # 7 of 18 predicted points land on an object, 7 of 10 objects found
    assert m["precision"] == pytest.approx(7 / 18) and m["recall"] == pytest.approx(7 / 10)
    assert m["f1"] == pytest.approx(2 * (7 / 18) * (7 / 10) / (7 / 18 + 7 / 10))
    assert m["mean_steps"] == pytest.approx(21 / 4) and m["forward_passes"] == 21
    assert m["forwards_per_counted_object"] == pytest.approx(21 / 18)
    assert m["stop_reasons"] == {"done": 2, "repeat": 1, "max_steps": 1}
    # baseline: always 2.5 -> errors 0.5, 0.5, 1.5, 1.5
    assert m["baseline_mean_count_mae"] == pytest.approx(1.0)
    assert m["baseline_mean_count_rmse"] == pytest.approx(np.sqrt(1.25))
    assert m["settings"]["max_steps"] == 13 and m["images_per_s"] > 0
    # one forward per counted object plus the stopping one; never more than batch_size images at once
    assert sum(model.calls) == 21 and max(model.calls) <= batch_size
    if batch_size == 8:  # all four start together; an image that stops leaves the batch
        assert model.calls == [4, 3, 3, 2] + [1] * 9


def test_explicit_stop_settings(tiny_processor, fixture_records):
    """max_steps, stop_radius and match_radius given explicitly change the stop and the matches as they say."""
    model = ScriptedModel(tiny_processor, fixture_records, script_points())
    eggs, cups = fixture_records[0], fixture_records[1]
    p = ev.count_records(model, tiny_processor, [eggs], max_steps=2)["predictions"][0]
    assert (p["pred_count"], p["stop_reason"], p["steps"]) == (2, "max_steps", 2)
    # stop_radius 2 px: the point 3 px from mark 2 is counted; the script then runs out at k=3 -> make it stop there
    model.script["cups"] = model.script["cups"] + ["done"]
    p = ev.count_records(model, tiny_processor, [cups], stop_radius=2.0)["predictions"][0]
    assert (p["pred_count"], p["stop_reason"]) == (3, "done")
    # match radius 0.5 px still matches the exact points; a generous one matches the off-object ones too
    coins = fixture_records[2]
    assert ev.count_records(model, tiny_processor, [coins], max_steps=4, match_radius=0.5)["predictions"][0][
        "num_matched"] == 2
    assert ev.count_records(model, tiny_processor, [coins], max_steps=4, match_radius=100)["predictions"][0][
        "num_matched"] == 4


def test_next_point_metrics_by_hand(tiny_processor, fixture_records):
    """Teacher forcing: k ground-truth objects marked (CountingDataset's k); the stand-in always answers the same
    point per type, so each sample's error and hits follow from k alone."""
    answer = {"eggs": (30, 12), "cups": (20 * 0.96, 20 * 64 / 60), "coins": (6, 22), "cells": (5, 5)}
    model = ScriptedModel(tiny_processor, fixture_records, {t: [p] * 10 for t, p in answer.items()}, False)
    out = ev.next_point_records(model, tiny_processor, fixture_records, batch_size=3, seed=5)
    ds = data.CountingDataset(fixture_records, "reading_order", seed=5)
    errors, unmarked, target, marked = [], [], [], []
    for i, rec in enumerate(fixture_records):
        s = ds[i]
        k, a = s.num_marked, np.array(answer[rec.object_type])
        d = np.hypot(*(s.points - a).T)
        errors.append(d[k])
        unmarked.append(d[k:].min() <= 8)
        target.append(d[k] <= 8)
        marked.append(k > 0 and d[:k].min() <= 8)
        p = out["predictions"][i]
        assert (p["image"], p["num_marked"]) == (rec.image_id, k) and p["pixel_error"] == pytest.approx(d[k], abs=1e-3)
    m = out["metrics"]
    assert m["num_samples"] == 4
    assert m["pixel_error"] == pytest.approx(np.mean(errors), abs=1e-3)
    assert m["median_pixel_error"] == pytest.approx(np.median(errors), abs=1e-3)
    assert (m["hit_rate_unmarked"], m["hit_rate_target"], m["hit_rate_marked"]) == (
        np.mean(unmarked), np.mean(target), np.mean(marked))


def test_shift_image_moves_the_content_and_repeats_the_edge():
    """shift_image moves every pixel by (dx, dy), keeps the size, and fills the uncovered border with the edge."""
    a = np.zeros((20, 30, 3), np.uint8)
    a[:, 0] = 50  # the left edge column
    a[5, 10] = 255
    im = Image.fromarray(a)
    for dx, dy in ev.shift_offsets(4):
        b = np.asarray(ev.shift_image(im, dx, dy))
        assert b.shape == a.shape and b[5 + dy, 10 + dx, 0] == 255 and (b == 255).sum() == 3
    right = np.asarray(ev.shift_image(im, 3, 0))
    assert (right[:, :4, 0] == 50).all() and (right[:, 4:, 0] != 50).all()  # the edge column, repeated
    assert ev.shift_image(im, 0, 0) is im
    assert ev.shift_offsets(0) == [(0, 0)] and len(set(ev.shift_offsets(8))) == 9


class ShiftSeeingModel(torch.nn.Module):
    """Stand-in for a model that sees where things are: it recognises which of shift_offsets' moves its image got
    (by its exact pixels, from the real image processor) and answers a point that moves with the image: object A
    for four of the moves, B for three and C for two, as a model unsure of which object is next would."""

    def __init__(self, processor, image, shift, a, b, c):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.objects, self.size, self.calls = [np.array(a)] * 4 + [np.array(b)] * 3 + [np.array(c)] * 2, image.size, []
        self.moves = ev.shift_offsets(shift)
        self.seen = {(dx, dy): processor.image_processor(images=[ev.shift_image(image, dx, dy)],
                                                         return_tensors="pt")["pixel_values"] for dx, dy in self.moves}

    def forward(self, pixel_values, **_ignored):
        (move,) = [m for m, px in self.seen.items() if torch.equal(px, pixel_values)]
        self.calls.append(move)
        target = self.objects[self.moves.index(move)]
        xy = utils.normalize_points(target + move, *self.size)[0]
        return torch.tensor([[*xy, -10.0]])  # stop logit: keep counting


def test_test_time_shifts_move_each_point_back_and_take_the_largest_group(tiny_processor, fixture_records):
    """With tta_shift, each step predicts on the 9 moved images, moves each point back (a point that moved with the
    image returns to where the object is) and counts the largest group's object, exactly: A, seen by 4 moves, where
    the per-axis median of all nine would take x from B and y from A, the point of the minority C."""
    rec = fixture_records[3]  # 64 x 64: its own model-input frame
    image = data.prepare_image(rec)[0]
    model = ShiftSeeingModel(tiny_processor, image, 8, a=(10, 50), b=(50, 10), c=(50, 50))
    out = ev.count_records(model, tiny_processor, [rec], max_steps=1, tta_shift=8)
    np.testing.assert_allclose(out["predictions"][0]["points"], [[10, 50]], atol=1e-3)
    assert sorted(model.calls) == sorted(ev.shift_offsets(8))  # each move once, for the one step
    assert out["metrics"]["forward_passes"] == 9 and out["metrics"]["settings"]["tta_shift"] == 8


# -----------------------------------------------------------------------------
# The real tiny model, trained for one step by the training script, through the CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real training run on the FSC-147 fixture (left_to_right ordering and 256^2-pixel images, so the
    evaluation must take both from the checkpoint), plus an OmniCount fixture."""
    root = tmp_path_factory.mktemp("eval_real")
    fsc, omni, run = root / "fsc147", root / "omnicount", root / "run"
    fsc_info, omni_info = write_fsc147(str(fsc)), write_omnicount(str(omni))
    cmd = [sys.executable, str(ROOT / "train_vlm_regression.py"), "--model_name", "tiny-random", "--dataset", "fsc147",
           "--data_root", str(fsc), "--output_dir", str(run), "--epochs", "1", "--train_batches", "1", "--val_batches", "1",
           "--batch_size", "1", "--num_workers", "0", "--wandb_mode", "disabled", "--lora_r", "4", "--lora_alpha", "8",
           "--mlp_layers", "2", "--head_hidden_dim", "64", "--ordering", "left_to_right", "--max_pixels", str(256 * 256)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"run": run, "fsc": fsc, "omni": omni, "fsc_info": fsc_info, "omni_info": omni_info, "root": root}


def read_outputs(out):
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    with open(out / "predictions.jsonl") as f:
        preds = [json.loads(line) for line in f]
    return metrics, preds


def test_cli_fsc147_from_run_dir(trained):
    """The CLI on a run dir evaluates checkpoints/best with the run's data, ordering and pixel bounds, and writes
    predictions in the file's frame, metrics, visualisations."""
    out = trained["root"] / "eval_fsc"
    ev.main(["--checkpoint", str(trained["run"]), "--output_dir", str(out), "--max_steps", "3", "--num_vis", "1"])
    metrics, preds = read_outputs(out)
    (name, (cls, pts)), = trained["fsc_info"]["expected"]["test"].items()  # the fixture's one test image
    assert len(preds) == 1 and set(preds[0]) >= {"image", "object_type", "gt_count", "pred_count", "stop_reason",
                                                   "points"}
    p = preds[0]
    assert (p["image"], p["object_type"], p["gt_count"]) == (name, cls, len(pts))
    assert 0 <= p["pred_count"] <= 3 and len(p["points"]) == p["pred_count"] and p["stop_reason"] in ev.STOP_REASONS
    assert all(0 <= x <= 384 and 0 <= y <= 384 for x, y in p["points"])  # the file's frame, not the 256-px one
    for key in ("mae", "rmse", "num_images", "precision", "recall", "f1", "mean_steps", "images_per_s",
                "baseline_mean_count_mae", "baseline_mean_count_rmse"):
        assert metrics[key] is not None, key
    # baseline = the train split's mean count (corrupt image skipped, the clipped point kept)
    train_mean = np.mean([len(v[1]) for v in trained["fsc_info"]["expected"]["train"].values()])
    assert metrics["train_mean_count"] == pytest.approx(train_mean)
    assert metrics["baseline_mean_count_mae"] == pytest.approx(abs(train_mean - len(pts)))
    assert metrics["mae"] == abs(p["pred_count"] - len(pts))
    s = metrics["settings"]
    assert (s["ordering"], s["max_pixels"], s["max_steps"]) == ("left_to_right", 256 * 256, 3)
    assert (metrics["dataset"], metrics["split"]) == ("fsc147", "test")
    assert len(os.listdir(out / "vis")) == 1
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # atomic writes leave no temp files

    # teacher-forced mode on the same data
    out = trained["root"] / "eval_fsc_next"
    ev.main(["--checkpoint", str(trained["run"] / "checkpoints" / "last"), "--output_dir", str(out),
             "--mode", "next_point", "--num_vis", "1"])
    metrics, preds = read_outputs(out)
    assert metrics["num_samples"] == 1 and 0 <= preds[0]["num_marked"] < len(pts)
    assert metrics["pixel_error"] == pytest.approx(preds[0]["pixel_error"])
    assert len(os.listdir(out / "vis")) == 1


def test_cli_omnicount_and_checkpoint_resolution(trained):
    """A step-N folder resolves to its run; another dataset given on the command line replaces the run's data;
    --tta_shift counts with test-time shifts (9 forward passes a step); a negative one is refused."""
    run = trained["run"]
    step = os.path.realpath(run / "checkpoints" / "best")
    assert ev.resolve_checkpoint(str(run)) == (str(run / "checkpoints" / "best"), str(run))
    assert ev.resolve_checkpoint(step) == (step, str(run))
    with pytest.raises(FileNotFoundError):
        ev.resolve_checkpoint(str(trained["root"]))
    out = trained["root"] / "eval_omni"
    ev.main(["--checkpoint", step, "--dataset", "omnicount", "--data_root", str(trained["omni"]), "--split", "test",
             "--output_dir", str(out), "--max_steps", "2", "--batch_size", "4", "--num_vis", "2", "--tta_shift", "4"])
    metrics, preds = read_outputs(out)
    assert metrics["settings"]["tta_shift"] == 4 and metrics["forward_passes"] == 9 * (
        sum(p["pred_count"] for p in preds) + sum(p["stop_reason"] != "max_steps" for p in preds))
    expected = trained["omni_info"]["expected"]
    test = expected[("Fruits", "test")]  # Household has no test split
    assert sorted((p["image"].split("/")[-1], p["object_type"], p["gt_count"]) for p in preds) == sorted(
        (name, t, n) for (name, t), n in test.items())
    train_counts = list(expected[("Fruits", "train")].values()) + list(expected[("Household", "train")].values())
    assert metrics["train_mean_count"] == pytest.approx(np.mean(train_counts))
    assert metrics["num_images"] == len(test) and metrics["settings"]["ordering"] == "left_to_right"
    assert len(os.listdir(out / "vis")) == 2
    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--checkpoint", step, "--tta_shift", "-1"])
    assert e.value.code == 2


def test_batched_counting_equals_one_by_one(trained, fixture_records):
    """Counting images together gives each the points it gets counted alone (right padding, per-image marks)."""
    model, processor = mvr.VLMRegressionModel.from_pretrained(str(trained["run"] / "checkpoints" / "best"))
    kw = dict(max_steps=3, stop_radius=0.0, done_threshold=1.0)  # never stop before step 3: run all 3 steps
    batched = ev.count_records(model, processor, fixture_records, batch_size=4, **kw)["predictions"]
    single = [ev.count_records(model, processor, [r], batch_size=1, **kw)["predictions"][0] for r in fixture_records]
    assert all(b["stop_reason"] == "max_steps" for b in batched)  # every image runs all three steps
    for b, s in zip(batched, single):
        assert (b["pred_count"], b["stop_reason"]) == (s["pred_count"], s["stop_reason"])
        np.testing.assert_allclose(b["points"], s["points"], atol=0.05)
