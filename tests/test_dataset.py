"""Loading FSC-147 and OmniCount from their real layouts (traps included), samples, collate, and the CLI."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

import dataset
import utils
from conftest import ROOT
from data_fixtures import write_fsc147, write_omnicount
from synthetic_data import SyntheticConfig


@pytest.fixture(scope="module")
def fsc(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsc147")
    return str(root), write_fsc147(str(root))


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    root = tmp_path_factory.mktemp("omnicount")
    return str(root), write_omnicount(str(root))


def load(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dataset.load_records(*args, **kwargs)


# ----------------------------------------------------------------------------- FSC-147


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_fsc147_records_match_annotations(fsc, split):
    """Each split's records are the annotation's points in the frame of the file on disk (never rescaled by the
    annotation's H/W); the corrupt image and the clipped point are counted."""
    root, info = fsc
    records, skipped = load("fsc147", root, split)
    expected = info["expected"][split]
    assert {r.image_id for r in records} == set(expected)
    for r in records:
        cls, pts = expected[r.image_id]
        assert r.object_type == cls
        assert r.points.dtype == np.float32 and r.points.shape == pts.shape
        # points stay in the frame of the file on disk: never scaled by the annotation's H/W
        np.testing.assert_allclose(r.points, pts, atol=1e-3)
        assert (r.width, r.height) == r.load_image().size
    if split == "train":
        assert skipped == {"unreadable_image": 1, "points_clipped": info["num_clipped"]}


def test_fsc147_filters(fsc):
    """--object_types matches plural or singular names; --min_objects/--max_objects drop records and count them."""
    root, info = fsc
    records, skipped = load("fsc147", root, "train", object_types=["egg"], max_objects=12)
    assert [r.image_id for r in records] == ["4.jpg"]  # 2.jpg has 13 eggs, 3.jpg is sea shells
    assert skipped["too_many_objects"] == 1 and skipped["other_object_type"] == 1
    records, skipped = load("fsc147", root, "train", min_objects=13)
    assert [r.image_id for r in records] == ["2.jpg", "3.jpg"]


def test_fsc147_errors_name_the_file(fsc, tmp_path):
    """A missing or malformed file is a DataError naming the file (and the line and column of bad JSON)."""
    root, _ = fsc
    with pytest.raises(dataset.DataError, match="nope.*not found"):
        dataset.load_records("fsc147", os.path.join(root, "nope"))
    with pytest.raises(dataset.DataError, match="unknown object type.*'elephants'.*known:.*sea shells"):
        load("fsc147", root, "val", object_types=["elephants"])
    with pytest.raises(dataset.DataError, match="Train_Test_Val_FSC_147.json.*no split 'dev'"):
        load("fsc147", root, "dev")
    bad = tmp_path / "bad"
    write_fsc147(str(bad))
    os.remove(bad / "Train_Test_Val_FSC_147.json")
    with pytest.raises(dataset.DataError, match=r"Train_Test_Val_FSC_147\.json: FSC-147 file not found"):
        load("fsc147", str(bad), "train")
    write_fsc147(str(bad))
    text = (bad / "annotation_FSC147_384.json").read_text()
    (bad / "annotation_FSC147_384.json").write_text(text[:200] + "}{" + text[200:])
    with pytest.raises(dataset.DataError, match=r"annotation_FSC147_384\.json: malformed JSON at line 1 column 20"):
        load("fsc147", str(bad), "train")


# ----------------------------------------------------------------------------- OmniCount


def test_omnicount_multilabel_counts_per_type(omni):
    """One record per (image, object type): each type's box count, Roboflow's placeholder category no type."""
    root, info = omni
    records, skipped = load("omnicount", root, "train")
    expected = {("Fruits/train/" + f, t): n for (f, t), n in info["expected"][("Fruits", "train")].items()}
    expected |= {("Household/train/" + f, t): n for (f, t), n in info["expected"][("Household", "train")].items()}
    got = {(r.image_id, r.object_type): len(r.points) for r in records}
    assert got == expected
    assert any(n > 1 for n in Counter(r.image_id for r in records).values())  # multi-label images
    assert "fruits-xyz" not in {r.object_type for r in records}  # Roboflow's placeholder category is no type
    assert skipped == {"unreadable_image": 1}


def test_omnicount_box_centres(omni):
    """Each record's points are the centres of its type's COCO boxes in its image, in the annotation's order."""
    root, info = omni
    coco = json.load(open(os.path.join(root, "Fruits", "valid", "_annotations.coco.json")))
    records, _ = load("omnicount", root, "val", categories=["Fruits"])  # "val" means Roboflow's "valid"
    assert len(records) == len(info["expected"][("Fruits", "valid")]) > 0  # the loop below must check something
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    for r in records:
        boxes = [a["bbox"] for a in coco["annotations"]
                 if "Fruits/valid/" + files[a["image_id"]] == r.image_id and names[a["category_id"]] == r.object_type]
        centres = np.array([[x + w / 2, y + h / 2] for x, y, w, h in boxes], np.float32)
        np.testing.assert_allclose(r.points, centres, atol=1e-4)


def test_omnicount_missing_split_warns_and_counts(omni):
    """A category without the requested split is warned about and counted, the others load."""
    root, info = omni
    with pytest.warns(UserWarning, match="Household.*has no 'test' split"):
        records, skipped = dataset.load_records("omnicount", root, "test")
    assert skipped["category_without_split"] == 1
    assert len(records) == len(info["expected"][("Fruits", "test")])


def test_omnicount_filters_and_errors(omni):
    """Types filter case-insensitively in either number; unknown categories, types or roots are one-line errors."""
    root, info = omni
    records, _ = load("omnicount", root, "train", object_types=["apples", "Cups"])  # plural/case-insensitive
    exp = sum(1 for (_, t) in info["expected"][("Fruits", "train")] if t == "apple")
    exp += sum(1 for (_, t) in info["expected"][("Household", "train")] if t == "cup")
    assert len(records) == exp and {r.object_type for r in records} <= {"apple", "cup"}
    with pytest.raises(dataset.DataError, match=r"unknown category \['Pets'\]; present: \['Fruits', 'Household'\]"):
        load("omnicount", root, "train", categories=["Pets"])
    with pytest.raises(dataset.DataError, match=r"unknown object type.*'kiwis'.*known: \['apple', 'banana'"):
        load("omnicount", root, "train", object_types=["kiwis"])
    with pytest.raises(dataset.DataError, match="missing.*data root not found"):
        load("omnicount", os.path.join(root, "missing"), "train")


# ----------------------------------------------------------------------------- samples, collate


def test_model_input_size_and_prepare_image(fsc):
    """Images are resized once to the processor's own smart-resize size, and their points move with them."""
    assert dataset.model_input_size(576, 384) == (576, 384)  # FSC-147 keeps its size
    assert dataset.model_input_size(640, 640) == (640, 640)
    assert dataset.model_input_size(224, 224) == (224, 224)
    w, h = dataset.model_input_size(1300, 1065)
    assert w % 32 == 0 and h % 32 == 0 and w * h <= dataset.MAX_PIXELS
    root, _ = fsc
    records, _ = load("fsc147", root, "val")
    r = next(r for r in records if r.image_id == "10.jpg")  # 469 x 384 on disk
    img, pts = dataset.prepare_image(r, max_pixels=256 * 256)
    nw, nh = dataset.model_input_size(469, 384, dataset.MIN_PIXELS, 256 * 256)
    assert img.size == (nw, nh)
    # the same object has the same normalized position in both frames
    np.testing.assert_allclose(utils.normalize_points(pts, nw, nh), utils.normalize_points(r.points, 469, 384),
                               atol=1e-5)


def test_counting_dataset_samples(fsc):
    """A sample is a function of (seed, epoch, index): k objects marked in counting order, the target object k."""
    root, _ = fsc
    records, _ = load("fsc147", root, "train")
    ds = dataset.CountingDataset(records, "reading_order", seed=3)
    s = ds[1]
    again = ds[1]
    assert (s.num_marked, s.target.tolist()) == (again.num_marked, again.target.tolist())
    assert np.array_equal(np.array(s.image), np.array(again.image))
    rec = records[1]
    assert 0 <= s.num_marked < len(rec.points) and not s.done
    ordered = rec.points[utils.order_points(rec.points, "reading_order")]
    np.testing.assert_allclose(s.points, ordered, atol=1e-4)  # 576x384/512x384 keep their size
    np.testing.assert_allclose(s.target, utils.normalize_points(ordered[s.num_marked], *s.image.size)[0], atol=1e-6)
    ks = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        ks.add(ds[1].num_marked)
    assert len(ks) > 3  # k changes with the epoch
    done = dataset.CountingDataset(records, done_fraction=1.0)[0]
    assert done.done and done.num_marked == len(records[0].points) and done.target.tolist() == [-1.0, -1.0]


def test_mark_jitter_moves_the_marks_only(fsc):
    """--mark_jitter draws the marks off the objects' centres (the image changes where k > 0) while the sample's k,
    target and points stay those of the unjittered dataset; 0 leaves every image as it was."""
    root, _ = fsc
    records, _ = load("fsc147", root, "train")
    plain = dataset.CountingDataset(records, seed=3)
    zero = dataset.CountingDataset(records, seed=3, mark_jitter=0.0)
    jittered = dataset.CountingDataset(records, seed=3, mark_jitter=0.3)
    moved = 0
    for i in range(len(records)):
        a, b, c = plain[i], zero[i], jittered[i]
        assert np.array_equal(np.array(a.image), np.array(b.image))
        assert (a.num_marked, a.target.tolist()) == (c.num_marked, c.target.tolist())
        np.testing.assert_array_equal(a.points, c.points)
        if a.num_marked:
            moved += not np.array_equal(np.array(a.image), np.array(c.image))
        else:
            assert np.array_equal(np.array(a.image), np.array(c.image))
    assert moved > 0


def test_counting_dataset_survives_corrupt_image(fsc, tmp_path):
    """An image that fails to decode is warned about once and replaced by another sample; the epoch goes on."""
    root, _ = fsc
    copy = tmp_path / "fsc"
    shutil.copytree(root, copy)
    records, _ = load("fsc147", str(copy), "train")
    with open(records[0].image_path, "r+b") as f:  # truncate after loading: only decoding can find it
        f.truncate(300)
    ds = dataset.CountingDataset(records)
    with pytest.warns(UserWarning, match="unreadable image"):
        s = ds[0]
    assert s.image_id != records[0].image_id and ds.skipped == 1
    ds[0]
    assert ds.skipped == 1  # the bad record is remembered, warned about once


def test_collate_with_tiny_processor(tiny_processor):
    """collate gives every tensor the model needs, float32 targets, and images at the size they were marked."""
    cfg = SyntheticConfig(num_train=4)
    records, _ = dataset.load_records("synthetic", synthetic=cfg)
    ds = dataset.CountingDataset(records)
    samples = [ds[i] for i in range(3)]
    batch = dataset.make_collate_fn(tiny_processor)(samples)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "targets"):
        assert torch.is_tensor(batch[key]), key
    assert batch["targets"].dtype == torch.float32 and batch["targets"].shape == (3, 2)
    # the processor keeps our size: 224 px -> a 14x14 patch grid (7x7 merged tokens), no second resize
    assert batch["image_grid_thw"].tolist() == [[1, 14, 14]] * 3


# ----------------------------------------------------------------------------- CLI


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "dataset.py"), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_cli_stats_json(fsc):
    """--stats --json counts images, samples, objects and skips exactly; a bad root is a one-line error, exit 2."""
    root, info = fsc
    p = run_cli("--dataset", "fsc147", "--data_root", root, "--split", "train", "--stats", "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    exp = info["expected"]["train"]
    counts = [len(pts) for _, pts in exp.values()]
    assert s["dataset"] == "fsc147" and s["split"] == "train"
    assert (s["num_images"], s["num_samples"], s["num_objects"]) == (len(exp), len(exp), sum(counts))
    assert (s["count_min"], s["count_max"]) == (min(counts), max(counts))
    assert s["count_mean"] == pytest.approx(np.mean(counts), abs=1e-3)
    assert s["object_types"] == {"eggs": {"samples": 2, "objects": 20}, "sea shells": {"samples": 1, "objects": 40}}
    assert s["skipped"] == {"points_clipped": 1, "unreadable_image": 1}
    p = run_cli("--dataset", "fsc147", "--data_root", root + "/nope", "--stats")
    assert p.returncode == 2 and "nope: data root not found" in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["fsc147", "omnicount"])
def test_make_synthetic_then_real_loader(fmt, tmp_path):
    """Synthetic data written in a real layout loads back through the real loader with the same points."""
    out = str(tmp_path / fmt)
    p = run_cli("--make_synthetic", "--format", fmt, "--out", out, "--num_images", "20", "--seed", "5",
                "--synthetic_distractor_types", "2")  # several types per image: OmniCount's multi-label case
    assert p.returncode == 0, p.stderr
    cfg = SyntheticConfig(max_distractor_types=2)
    for split in ("train", "val", "test"):
        real, skipped = load(fmt, out, split)
        synth = {(r.image_id.split("-")[-1], r.object_type): r.points for r in
                 load("synthetic", split=split, seed=5, synthetic=cfg)[0]}
        assert real and not skipped
        written = set()
        for r in real:
            idx = r.image_id.split("/")[-1].split("_")[0 if fmt == "omnicount" else 1].split("-")[-1][:6]
            np.testing.assert_allclose(r.points, synth[(idx, r.object_type)], atol=1e-3)
            written.add(idx)
        if fmt == "omnicount":  # every type of every image is annotated: one sample per (image, type)
            assert len(real) == sum(1 for idx, _ in synth if idx in written)


def test_cli_preview(tmp_path):
    """--preview writes the asked number of captioned sample images."""
    out = tmp_path / "prev"
    p = run_cli("--preview", "3", "--out", str(out), "--synthetic_num_train", "10")
    assert p.returncode == 0, p.stderr
    assert len(list(out.glob("*.png"))) == 3
