"""Reliability: a bad argument, bad data, a second training or a broken checkpoint ends in a one-line error, and a
start that fails never touches the run already in the output folder; --overwrite replaces it, --resume checks what
it resumes. Through the public CLIs, with the real libraries."""
import glob
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import dataset as data
import train_data
from conftest import ROOT
from data_fixtures import write_fsc147, write_omnicount

SMALL = ["--model_name", "tiny-random", "--dataset", "synthetic", "--synthetic_num_train", "16", "--synthetic_num_val", "8",
         "--batch_size", "2", "--num_workers", "0", "--wandb_mode", "disabled", "--lora_r", "8",
         "--head_hidden_dim", "64", "--warmup_steps", "1", "--num_val_images", "0", "--train_batches", "2",
         "--val_batches", "1", "--epochs", "1"]


def train(out, *extra, **popen):
    return subprocess.run([sys.executable, "train_vlm_regression.py", *SMALL, "--output_dir", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, **popen)


def snapshot(folder):
    """{relative path: md5} of every file (links as their target), the lock file left out."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True)):
        rel = os.path.relpath(path, folder)
        if os.path.islink(path):
            out[rel] = "-> " + os.readlink(path)
        elif os.path.isfile(path) and rel != ".lock":
            out[rel] = hashlib.md5(open(path, "rb").read()).hexdigest()
    return out


def one_line_error(proc, code, *words):
    """The process failed with `code`, its stderr's last line is `error: ...` holding the words, no traceback."""
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "error: " in last and all(w in last for w in words), last
    return last


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed one-epoch run; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = train(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_run(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst, symlinks=True)
    return dst


@pytest.mark.parametrize("extra,code,words", [
    ((), 2, ["already holds a run", "--resume", "--overwrite"]),
    (("--batch_size", "0"), 2, ["--batch_size must be >= 1"]),
    (("--epochs", "0"), 2, ["--epochs must be >= 1"]),
    (("--lr", "-1"), 2, ["--lr must be a positive number"]),
    (("--resume", "--lora_r", "4", "--mlp_layers", "2"), 2, ["other model settings", "lora_r 8 vs 4", "mlp_layers"]),
    (("--resume", "--ordering", "left_to_right"), 2, ["ordering 'reading_order' vs 'left_to_right'"]),
    (("--resume", "--coord_loss", "l1"), 2, ["coord_loss 'mse' vs 'l1'"]),
    (("--resume", "--overwrite"), 2, ["give one of them"]),
    (("--resume", "/nonexistent/ckpt"), 2, ["no such checkpoint folder"]),
    (("--resume", "--dataset", "fsc147", "--data_root", "/nonexistent"), 1, ["/nonexistent: data root not found"]),
])
def test_a_failed_start_leaves_a_finished_run_untouched(finished, tmp_path, extra, code, words):
    """Refused starts (a folder holding a run, bad arguments, a checkpoint of other model settings, bad data) end
    in one line and leave every file of the finished run byte-identical (config, metrics, results, checkpoints)."""
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    one_line_error(train(run, *extra), code, *words)
    assert snapshot(run) == before


def test_overwrite_replaces_the_run_and_keeps_foreign_files(finished, tmp_path):
    """--overwrite clears the previous run (new checkpoint, metrics of the new run only) but not files that are not
    a run's (a job log kept in the folder)."""
    run = copy_run(finished, tmp_path)
    (run / "job.log").write_text("slurm log\n")
    (run / "checkpoints" / "step-0000099").mkdir()  # a folder of the old run that must not survive
    old_heads = (run / "checkpoints" / "last" / "heads.safetensors").read_bytes()
    proc = train(run, "--overwrite", "--seed", "7")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "job.log").read_text() == "slurm log\n"
    assert sorted(os.listdir(run / "checkpoints")) == ["best", "last", "step-0000002"]
    assert (run / "checkpoints" / "last" / "heads.safetensors").read_bytes() != old_heads
    assert json.loads((run / "config.json").read_text())["seed"] == 7
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("epoch_end")] == [2]


def test_a_second_training_in_the_same_folder_fails_at_once(tmp_path):
    """While one training holds the folder, a second (even with --resume) exits 2 within seconds of its start,
    naming the holder's pid and host; the first goes on with its own files (here until SIGTERM stops it with its
    checkpoint: 200 epochs leave it running long after the second has been refused, on a fast machine too)."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train_vlm_regression.py", *SMALL, "--output_dir", str(out),
                              "--epochs", "200"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.time() + 120
        while not ((out / ".lock").exists() and (out / ".lock").read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)
        second = train(out, "--resume", "--epochs", "200")
        one_line_error(second, 2, "in use by another training", f"pid {first.pid}")
        assert first.poll() is None, "the first training ended before the second was refused"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=600) == 75, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "preempted" and (out / "checkpoints" / "last" / "state.json").exists()


def test_resume_falls_back_from_a_cut_checkpoint_and_cleans_temp_files(finished, tmp_path):
    """A truncated checkpoints/last falls back to the newest intact step-N (said on the console); temp files an
    interrupted write left are removed; with no intact checkpoint left, --resume is a one-line error."""
    run = copy_run(finished, tmp_path)
    ckpt = run / "checkpoints"
    shutil.copytree(ckpt / "step-0000002", ckpt / "step-0000001")  # an older intact checkpoint
    heads = ckpt / "step-0000002" / "heads.safetensors"
    heads.write_bytes(heads.read_bytes()[:1000])
    (ckpt / ".tmp-abc123").mkdir()
    (run / ".tmp-xyz.json").write_text("{")
    proc = train(run, "--resume", "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is not usable (heads.safetensors unreadable" in proc.stdout + proc.stderr
    assert "step-0000001, the newest intact checkpoint" in proc.stdout + proc.stderr
    assert not glob.glob(str(ckpt / ".tmp-*")) and not glob.glob(str(run / ".tmp-*"))
    assert json.loads((run / "results.json").read_text())["status"] == "completed"

    run2 = copy_run(finished, tmp_path / "b")
    state = run2 / "checkpoints" / "last" / "training_state.pt"
    state.write_bytes(state.read_bytes()[:5000])
    before = snapshot(run2)
    one_line_error(train(run2, "--resume", "--epochs", "2"), 2, "no intact checkpoint",
                   "training_state.pt unreadable")
    one_line_error(train(run2, "--resume", str(run2 / "checkpoints" / "last"), "--epochs", "2"), 2,
                   "not a complete checkpoint")
    assert snapshot(run2) == before


def test_retraining_from_an_older_checkpoint_replaces_its_later_step_folder(finished, tmp_path):
    """Resuming from a checkpoint older than a step folder already in the run writes that step anew: the folder of
    the abandoned branch is replaced, never reused."""
    run = copy_run(finished, tmp_path)
    ckpt = run / "checkpoints"
    shutil.copytree(ckpt / "step-0000002", ckpt / "step-0000004")
    (ckpt / "step-0000004" / "state.json").write_text(json.dumps({"stale": True}))
    proc = train(run, "--resume", str(ckpt / "step-0000002"), "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((ckpt / "last" / "state.json").read_text())["step"] == 4


def test_a_full_disk_is_one_line_and_leaves_no_temp_files(tmp_path):
    """A write that fails (here the file-size limit, EFBIG, as a full disk gives ENOSPC) ends the run with one line
    naming the folder; no half-written checkpoint folder or temp file remains."""
    out = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # config.json fits, training_state.pt not

    proc = train(out, preexec_fn=limit)
    one_line_error(proc, 1, str(out / "checkpoints"))
    assert not glob.glob(str(out / "**" / ".tmp-*"), recursive=True)
    assert not glob.glob(str(out / "checkpoints" / "step-*"))


@pytest.mark.parametrize("argv,words", [
    (["--lora_r", "0"], "--lora_r must be >= 1"),
    (["--train_batches", "-5"], "--train_batches must be >= 0"),
    (["--min_pixels", "500000", "--max_pixels", "100000"], "--max_pixels (100000) must be >= --min_pixels"),
    (["--done_fraction", "1"], "--done_fraction must be in [0, 1)"),
    (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    (["--grad_accum", "0"], "--grad_accum must be >= 1"),
    (["--mlp_lr", "0"], "--mlp_lr must be a positive number"),
    (["--max_grad_norm", "nan"], "--max_grad_norm must be >= 0"),
    (["--max_minutes", "-1"], "--max_minutes must be >= 0"),
    (["--max_minutes", "9", "--warmup_steps", "1"], "--max_minutes needs --warmup_steps >= 2"),
    (["--synthetic_min_count", "5", "--synthetic_max_count", "2"], "--synthetic_max_count (2) must be >="),
])
def test_training_arguments_are_checked(argv, words, capsys):
    """Each value no run can use is an argparse error (exit 2, one line naming the argument) before anything runs."""
    import train_vlm_regression as tr

    with pytest.raises(SystemExit) as e:
        tr.parse_args(argv)
    assert e.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv,words", [
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--num_images", "-1"], "--num_images must be >= 0"),
    (["--done_threshold", "1"], "--done_threshold must be in (0, 1)"),
    (["--oracle_noise_px", "-2"], "--oracle_noise_px must be >= 0"),
    (["--max_steps", "0"], "--max_steps must be >= 1"),
    (["--match_radius", "0"], "--match_radius must be > 0"),
])
def test_evaluation_arguments_are_checked(argv, words, capsys, tmp_path):
    """The evaluation's counts, batch and thresholds are checked the same way."""
    import evaluate_vlm_regression as ev

    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--oracle", "--output_dir", str(tmp_path), *argv])
    assert e.value.code == 2
    assert words in capsys.readouterr().err.strip().splitlines()[-1]


def test_model_and_dataset_cli_arguments_are_checked(capsys):
    """The model's and the dataset's own CLIs reject the same values with the same one-line errors."""
    import model_vlm_regression as mvr

    for main, argv, words in ((mvr.main, ["--model_name", "tiny-random", "--summary", "--head_hidden_dim", "0"],
                               "--head_hidden_dim must be >= 1"),
                              (data.main, ["--num_images", "0", "--make_synthetic", "--out", "x"],
                               "--num_images >= 1"),
                              (data.main, ["--max_objects", "0"], "--max_objects must be >= 1")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and words in capsys.readouterr().err.strip().splitlines()[-1]


# -----------------------------------------------------------------------------
# Data anomalies: a one-line DataError naming the file and the id, or a counted skip


def fsc(tmp_path, edit):
    root = tmp_path / "fsc"
    write_fsc147(root)
    for name in ("annotation_FSC147_384.json", "Train_Test_Val_FSC_147.json"):
        doc = json.loads((root / name).read_text())
        doc = edit(name, doc)
        (root / name).write_text(json.dumps(doc))
    return root


def test_fsc147_anomalies(tmp_path):
    """FSC-147: NaN points are dropped and counted; points of the wrong shape, a file of the wrong shape, an image
    twice in a split or in two splits (a leak) are errors naming the file and the image."""
    def nan_point(name, doc):
        if name.startswith("annotation"):
            doc["2.jpg"]["points"][0] = [float("nan"), 3.0]
        return doc
    records, skipped = data.load_records("fsc147", fsc(tmp_path / "a", nan_point), "train")
    assert skipped["nonfinite_points"] == 1
    assert all(np.isfinite(r.points).all() for r in records)

    cases = [
        (lambda n, d: ({**d, "3.jpg": {**d["3.jpg"], "points": [1, 2, 3]}} if n.startswith("annotation") else d),
         "annotation_FSC147_384.json: image 3.jpg: points are not a list of [x, y] pairs"),
        (lambda n, d: list(d.values()) if n.startswith("annotation") else d,
         "annotation_FSC147_384.json: expected {image name: annotation}, got list"),
        (lambda n, d: {**d, "train": d["train"] + ["2.jpg"]} if n.startswith("Train") else d,
         "image 2.jpg is listed twice in split 'train'"),
        (lambda n, d: {**d, "val": d["val"] + ["3.jpg"]} if n.startswith("Train") else d,
         "image 3.jpg is listed in splits 'train' and 'val' (a leak between splits)"),
    ]
    for i, (edit, words) in enumerate(cases):
        with pytest.raises(data.DataError, match=None) as e:
            data.load_records("fsc147", fsc(tmp_path / str(i), edit), "train")
        assert words in str(e.value) and "\n" not in str(e.value)


def coco(tmp_path, edit):
    root = tmp_path / "omni"
    write_omnicount(root)
    path = root / "Fruits" / "train" / "_annotations.coco.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return root


def test_coco_anomalies(tmp_path):
    """OmniCount: an annotation without a bbox (or with a NaN one) is a counted skip; a duplicate image id or file,
    or JSON of the wrong shape, is an error naming the file and the id."""
    def no_bbox(d):
        del d["annotations"][0]["bbox"]
        d["annotations"][1]["bbox"] = [float("nan"), 1, 2, 3]
        return d
    _, skipped = data.load_records("omnicount", coco(tmp_path / "a", no_bbox), "train", categories=["Fruits"])
    assert skipped["annotation_without_bbox"] == 1 and skipped["annotation_bad_bbox"] == 1

    def dup_id(d):
        d["images"][1]["id"] = d["images"][0]["id"]
        return d

    def dup_file(d):
        d["images"][1]["file_name"] = d["images"][0]["file_name"]
        return d
    for i, (edit, words) in enumerate([(dup_id, "image id 0 is listed twice"), (dup_file, "is listed twice (ids 0, 1)"),
                                       (lambda d: [d], "expected a COCO object"),
                                       (lambda d: {**d, "images": [{"file": "x"}]}, "not COCO annotations as expected")]):
        with pytest.raises(data.DataError) as e:
            data.load_records("omnicount", coco(tmp_path / str(i), edit), "train", categories=["Fruits"])
        assert "_annotations.coco.json" in str(e.value) and words in str(e.value), str(e.value)


def test_coco_boxes_are_rescaled_to_the_files_frame(tmp_path):
    """Boxes of an image whose JSON size differs from the file's are moved into the file's frame (counted)."""
    def half_size(d):
        for im in d["images"]:
            im["width"], im["height"] = 320, 320  # files are 640x640: every box doubles
        return d
    plain, _ = data.load_records("omnicount", coco(tmp_path / "a", lambda d: d), "train", categories=["Fruits"])
    scaled, skipped = data.load_records("omnicount", coco(tmp_path / "b", half_size), "train", categories=["Fruits"])
    assert skipped["size_mismatch_rescaled"] >= len({r.image_id for r in scaled})
    for a, b in zip(plain, scaled):
        np.testing.assert_allclose(b.points, np.clip(a.points * 2, 0, 640), rtol=1e-6)


def test_an_image_in_both_training_splits_is_an_error(tmp_path):
    """The same image file in the train and the validation records is a leak: DataError naming it."""
    root = tmp_path / "omni"
    write_omnicount(root)
    records, _ = data.load_records("omnicount", str(root), "train", categories=["Fruits"])
    with pytest.raises(data.DataError, match="in both the 'train' and the 'valid' split"):
        train_data.check_disjoint(records, records[:1], "train", "valid")


def test_make_synthetic_refuses_a_non_empty_folder(tmp_path, capsys):
    """--make_synthetic does not write into a folder holding files unless --overwrite; those files are kept."""
    out = tmp_path / "ds"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert data.main(["--make_synthetic", "--out", str(out), "--num_images", "10"]) == 2
    assert "is not empty" in capsys.readouterr().err and os.listdir(out) == ["mine.txt"]
    assert data.main(["--make_synthetic", "--out", str(out), "--num_images", "10", "--overwrite"]) == 0
    assert (out / "mine.txt").read_text() == "keep" and (out / "annotation_FSC147_384.json").exists()
