"""The pretrained tiny base (pretrain_tiny.py): its data, its reproducibility, and the integrity of the shipped copy."""
import json
import os

import numpy as np
import pytest
import torch

import pretrain_tiny as pt
from conftest import ROOT

SHIPPED = ROOT / "tiny_base"


def test_named_sample_has_exactly_one_object_of_the_named_type():
    """'Point at the red circle.' is answerable: one object of that type, the target at its centre."""
    for i in range(50):
        rng = np.random.default_rng([0, i])
        layout, ti, text, labelled = pt.pointing_layout(rng, "named", ("plain", "varied")[i % 2])
        named = text[len("Point at the "):-1]
        types = [o[0] for o in layout["objects"]]
        assert types.count(named + "s") == 1 and types[ti] == named + "s"
        assert 1 <= len(types) <= 5 and labelled == []


def test_extreme_sample_targets_the_object_furthest_that_way_by_a_margin():
    """'Point at the leftmost object.' is answerable: the target leads every other object by >= the margin."""
    for i in range(50):
        layout, ti, text, labelled = pt.pointing_layout(np.random.default_rng([1, i]), "extreme", "plain")
        axis, sign = pt.EXTREMES[text.split()[3]]
        key = [sign * o[1 + axis] for o in layout["objects"]]
        assert all(key[ti] - k >= pt.EXTREME_MARGIN for j, k in enumerate(key) if j != ti) and labelled == []


def test_extreme_unmarked_sample_skips_labelled_objects():
    """'Point at the leftmost object that has no white label.': the target is unlabelled and leads every other
    unlabelled object by >= the margin; labelled ones may lie further that way (the model must skip them), and over
    many samples some do. The labels are drawn on the image (white pixels appear)."""
    skipped = 0
    for i in range(200):
        layout, ti, text, labelled = pt.pointing_layout(np.random.default_rng([2, i]), "extreme_unmarked", "plain", 2)
        axis, sign = pt.EXTREMES[text.split()[3]]
        assert text.endswith("object that has no white label.") and ti not in labelled
        key = [sign * o[1 + axis] for o in layout["objects"]]
        assert all(key[ti] - key[j] >= pt.EXTREME_MARGIN for j in range(len(key)) if j != ti and j not in labelled)
        skipped += any(key[j] > key[ti] for j in labelled)
        assert 1 <= len(key) <= 3
    assert skipped >= 20
    image, _, _ = pt.pointing_sample([2, 0, 0], "extreme_unmarked", "plain", 2)
    plain, _, _ = pt.pointing_sample([2, 0, 0], "extreme", "plain", 2)
    counts = [(np.asarray(im) == 255).all(-1).sum() for im in (image, plain)]
    assert counts[1] == 0 and (counts[0] > 0) == bool(pt.pointing_layout(np.random.default_rng([2, 0, 0]),
                                                                           "extreme_unmarked", "plain", 2)[3])


def test_sample_is_a_pure_function_of_its_key():
    a, b = pt.pointing_sample([3, 5, 1], "unmarked", "varied"), pt.pointing_sample([3, 5, 1], "unmarked", "varied")
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert np.all(np.abs(a[2]) < 1)


def _short_run(out, *extra):
    return pt.train(pt.parse_args(["--out", str(out), "--steps", "6", "--batch_size", "2", "--warmup", "3",
                                   "--eval_every", "3", "--val_images", "4", "--unmarked_fraction", "0.4",
                                   "--extreme_unmarked_fraction", "0.3",
                                   "--curriculum_steps", "4", "--threads", "1", *extra]))


def test_a_cut_run_is_rebuilt_from_its_recipe(tmp_path):
    """--stop_after replays a schedule cut short (as --max_minutes cuts it): the recipe says how, and a base continued
    from it with --init_std 0 keeps its weights as the start and records the first stage's recipe."""
    r = _short_run(tmp_path / "cut", "--stop_after", "4")
    assert r["steps_done"] == 4 and r["steps_planned"] == 6 and "--steps 6 --stop_after 4" in r["rebuild"]
    r2 = _short_run(tmp_path / "cut2", "--stop_after", "4")
    assert r2["weights_sha256"] == r["weights_sha256"]
    stage2 = pt.train(pt.parse_args(["--out", str(tmp_path / "stage2"), "--init_dir", str(tmp_path / "cut"),
                                     "--init_std", "0", "--steps", "2", "--batch_size", "2", "--warmup", "1",
                                     "--eval_every", "2", "--val_images", "4", "--threads", "1"]))
    assert stage2["init"]["recipe"]["weights_sha256"] == r["weights_sha256"]
    from safetensors.torch import load_file

    model, _ = pt.build(pt.parse_args(["--init_dir", str(tmp_path / "cut"), "--init_std", "0"]), torch.device("cpu"))
    saved = load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(p, saved[n]) for n, p in model.base.state_dict().items() if n in saved) and len(saved) > 10


def test_pretraining_is_bit_identical_for_a_seed_and_records_its_hash(tmp_path):
    """Two CPU runs with the same seed write the same weights, and recipe.json holds their sha256. A counting model
    built on such a base keeps the base's trained <x>/<y> rows (they are re-initialised only when the tokens are new)."""
    r1, r2 = _short_run(tmp_path / "a"), _short_run(tmp_path / "b")
    for out, r in ((tmp_path / "a", r1), (tmp_path / "b", r2)):
        assert pt.sha256_file(out / "model.safetensors") == r["weights_sha256"]
        with open(out / "recipe.json") as f:
            assert json.load(f)["weights_sha256"] == r["weights_sha256"]
        assert sorted(os.listdir(out)) == sorted(r["files"]) and len(r["files"]) <= 8  # a GPU run's $OUT takes 8
    assert r1["weights_sha256"] == r2["weights_sha256"]
    assert r1["final_val_px"] == r2["final_val_px"]
    assert r1["steps_done"] == 6 and r1["settings"]["seed"] == 0
    assert set(r1["final_val_px"]) == {"named", "unmarked", "extreme", "extreme_unmarked"}  # a validation set per task

    from safetensors.torch import load_file

    import model_vlm_regression as mvr

    model, processor = mvr.build_model(str(tmp_path / "a"), lora_r=4, head_hidden_dim=32)
    ids = mvr.coordinate_token_ids(processor)
    saved = load_file(tmp_path / "a" / "model.safetensors")
    rows = saved[next(k for k in saved if k.endswith("embed_tokens.weight"))][ids]
    built = mvr.base_of(model.vlm).get_input_embeddings()
    torch.testing.assert_close(built(torch.tensor(ids)), rows, rtol=0, atol=0)
    fresh = built.weight[: min(ids)].mean(0) if hasattr(built, "weight") else None
    assert fresh is None or not torch.allclose(rows[0], fresh)


@pytest.mark.skipif(not (SHIPPED / "recipe.json").exists(), reason="no tiny_base/ in the repository (not shipped yet)")
def test_shipped_base_matches_its_recipe():
    """The shipped weights are the ones the recipe names, and the shipped config is the recipe's architecture."""
    with open(SHIPPED / "recipe.json") as f:
        recipe = json.load(f)
    assert pt.sha256_file(SHIPPED / recipe["weights_file"]) == recipe["weights_sha256"]
    with open(SHIPPED / "config.json") as f:
        config = json.load(f)
    for part in ("text_config", "vision_config"):
        shipped, recorded = config[part], recipe["config"][part]
        keys = set(shipped) & set(recorded) - {"transformers_version", "dtype", "torch_dtype"}
        assert keys and {k: shipped[k] for k in keys} == {k: recorded[k] for k in keys}, part
    for name in recipe["files"]:
        assert (SHIPPED / name).exists(), name


@pytest.mark.skipif(not (SHIPPED / "recipe.json").exists(), reason="no tiny_base/ in the repository (not shipped yet)")
def test_model_name_tiny_is_the_shipped_base_and_keeps_its_token_rows(tmp_path):
    """--model_name tiny loads tiny_base/ (not the random init), keeps its trained <x>/<y> rows, and trains with
    LoRA and --train_vision merger through the CLI."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    import model_vlm_regression as mvr

    model, processor = mvr.build_model("tiny", lora_r=4, head_hidden_dim=32)
    ids = mvr.coordinate_token_ids(processor)
    saved = load_file(SHIPPED / "model.safetensors")
    rows = saved[next(k for k in saved if k.endswith("embed_tokens.weight"))][ids]
    torch.testing.assert_close(mvr.base_of(model.vlm).get_input_embeddings()(torch.tensor(ids)), rows, rtol=0, atol=0)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train_vlm_regression.py", "--model_name", "tiny", "--dataset", "synthetic",
                           "--synthetic_num_train", "16", "--synthetic_num_val", "4", "--epochs", "1",
                           "--train_batches", "2", "--val_batches", "1", "--batch_size", "2", "--num_workers", "0",
                           "--train_vision", "merger", "--wandb_mode", "disabled", "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "checkpoints/last/regression_config.json").read_text())
    assert cfg["base_model"] == "tiny" and cfg["train_vision"] == "merger"
