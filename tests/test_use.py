"""Using a trained counter: counting your own images (a folder of PNG and JPEG files, an unreadable one, a grayscale
one), exporting it as one folder (a merged export predicts what the adapter model predicts and loads with neither the
adapter nor the base model's files), and going from a sweep's best run to its test score. The model is the real tiny
one, trained for 2 epochs x 3 batches by the training script."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import analyze_hparam_results as ahr
import dataset as data
import evaluate_vlm_regression as ev
import model_vlm_regression as mvr
import utils
from conftest import ROOT
from prompt import encode_batch
from synthetic_data import SyntheticConfig

SYNTHETIC = ["--synthetic_num_train", "16", "--synthetic_num_val", "4", "--synthetic_num_test", "4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real training run on the synthetic data with the stop head. No warmup and lr 1e-2, so that in 6 steps LoRA's
    B matrices and the <x>/<y> rows move well away from their start: a merge that dropped either would show."""
    root = tmp_path_factory.mktemp("use")
    cmd = [sys.executable, str(ROOT / "train_vlm_regression.py"), "--model_name", "tiny-random", "--dataset", "synthetic",
           *SYNTHETIC, "--output_dir", str(root / "run"), "--epochs", "2", "--train_batches", "3", "--val_batches",
           "1", "--batch_size", "2", "--num_workers", "0", "--wandb_mode", "disabled", "--lora_r", "4",
           "--lora_alpha", "8", "--mlp_layers", "2", "--head_hidden_dim", "64", "--lr", "1e-2", "--warmup_steps", "0"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    mvr.main(["--export", str(run), str(out), "--merge"])
    return out


# -----------------------------------------------------------------------------
# Counting your own images


def test_count_a_folder_of_own_images(run, tmp_path, capsys):
    """--images on a folder counts every PNG and JPEG in it (a grayscale one too), skips an unreadable one with a
    one-line message, and writes counts.json (count, points in the image's own frame, stop reason, steps) and one PNG
    of the marks per counted image; count_image from Python gives the same result."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (240, 160, 3), dtype=np.uint8)).save(folder / "b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8), mode="L").save(folder / "gray.jpeg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "counts"
    counts = ev.main(["--checkpoint", str(run), "--images", str(folder), "--object", "red circle", "--output_dir",
                      str(out), "--max_steps", "3"])
    printed = capsys.readouterr()
    sizes = {"a.png": (300, 200), "b.jpg": (160, 240), "gray.jpeg": (128, 128)}
    assert json.loads((out / "counts.json").read_text()) == counts
    assert sorted(os.path.basename(p) for p in counts) == sorted(sizes)
    for path, c in counts.items():
        assert set(c) == {"count", "points", "stop_reason", "steps", "marks"}
        assert 0 <= c["count"] <= 3 and len(c["points"]) == c["count"] and c["stop_reason"] in ev.STOP_REASONS
        assert c["steps"] == c["count"] + (c["stop_reason"] != "max_steps")
        w, h = sizes[os.path.basename(path)]
        assert all(0 <= x <= w and 0 <= y <= h for x, y in c["points"])  # the file's frame
        assert (out / c["marks"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{path}: {c['count']} red circles (stop: {c['stop_reason']}" in printed.out
    assert len(os.listdir(out / "marks")) == 3 and len(printed.out.strip().splitlines()) == 3
    skipped = [line for line in printed.err.splitlines() if "broken.jpg" in line]
    assert len(skipped) == 1 and skipped[0].startswith(f"{folder / 'broken.jpg'}: skipped, unreadable image")

    model, processor = mvr.VLMRegressionModel.from_pretrained(str(run / "checkpoints" / "best"))
    one = ev.count_image(model, processor, str(folder / "gray.jpeg"), "red circles", max_steps=3)
    cli = counts[str(folder / "gray.jpeg")]
    assert (one["count"], one["stop_reason"], one["steps"]) == (cli["count"], cli["stop_reason"], cli["steps"])
    np.testing.assert_allclose(np.reshape(one["points"], (-1, 2)), np.reshape(cli["points"], (-1, 2)), atol=0.05)
    with Image.open(folder / "gray.jpeg") as im:  # an image in memory, and the singular name: the same count
        assert ev.count_image(model, processor, im.copy(), "red circle", max_steps=3) == one
    with pytest.raises(OSError, match="broken.jpg"):
        ev.count_image(model, processor, str(folder / "broken.jpg"), "red circles")


# -----------------------------------------------------------------------------
# Export


def predictions(folder, dtype):
    """The model's (B, 3) outputs on a batch of 4 synthetic validation images with 0-3 objects marked."""
    model, processor = mvr.VLMRegressionModel.from_pretrained(str(folder), dtype=dtype)
    records, _ = data.load_records("synthetic", split="val", synthetic=SyntheticConfig(num_val=4))
    images = []
    for k, r in enumerate(records[:4]):
        image, points = data.prepare_image(r)
        images.append(utils.mark_objects(image, points[:k]))
    batch = encode_batch(processor, images, [r.object_type for r in records[:4]], [0, 1, 2, 3],
                         model.config["ordering"])
    with torch.no_grad():
        return model.eval()(**batch).float().numpy(), model


def test_merged_export_predicts_what_the_adapter_model_predicts(run, merged):
    """The merged export holds the trained <x>/<y> rows and LoRA merged in, and its outputs (x, y and the stop logit)
    equal the adapter model's: max |diff| within 1e-5 in fp32 (measured 9.5e-7), and within 2% of the outputs' scale
    with both loaded in torch.bfloat16 (measured 1.1e-3 and 1.1e-2 on two trainings: bf16 keeps 8 bits of mantissa,
    and the merged W + BA is rounded once where the adapter model rounds W and adds BA in its own precision)."""
    ckpt = run / "checkpoints" / "best"
    cfg = json.loads((merged / "regression_config.json").read_text())
    assert cfg["merged"] is True and not (merged / "adapter").exists()
    assert {"config.json", "model.safetensors", "heads.safetensors", "processor", "README.md",
            mvr.TRAINING_CONFIG, mvr.TRAINING_RESULTS} <= set(os.listdir(merged))
    adapter, adapter_model = predictions(ckpt, torch.float32)
    exported, merged_model = predictions(merged, torch.float32)
    diff = np.abs(adapter - exported).max()
    print(f"merged export vs adapter model, fp32: max |diff| {diff:.2e}")
    assert diff <= 1e-5
    assert merged_model.trainable_groups().keys() == {"x_head", "y_head", "done_head"}  # the base is frozen

    ids = [cfg["x_token_id"], cfg["y_token_id"]]
    rows = merged_model.vlm.get_input_embeddings().weight[ids]
    trained = adapter_model.vlm.get_input_embeddings().token_adapter.trainable_tokens_delta["default"]
    base = mvr.load_base_model("tiny-random")
    mvr.ensure_token_rows(base, ids)
    mvr.init_token_rows(base, ids)
    assert torch.equal(rows, trained.detach())  # the trained rows, not the base's initial ones
    assert (rows - base.get_input_embeddings().weight[ids]).abs().max() > 1e-3

    adapter16, _ = predictions(ckpt, torch.bfloat16)
    exported16, merged16 = predictions(merged, torch.bfloat16)
    assert merged16.vlm.dtype == torch.bfloat16
    diff16 = np.abs(adapter16 - exported16).max()
    scale = max(1.0, float(np.abs(adapter16).max()))  # the stop logit is not bounded like x and y
    print(f"merged export vs adapter model, bf16: max |diff| {diff16:.2e}, outputs up to {scale:.2f}")
    assert diff16 <= 2e-2 * scale


def test_export_card_and_unmerged_export(run, merged, tmp_path):
    """Both exports carry the heads, config, processor with <x>/<y> and a model card in the Hugging Face layout (YAML
    front matter, the training command, the validation figures); the unmerged one holds the adapter and loads."""
    card = (merged / "README.md").read_text()
    front = card.split("---\n")[1]
    assert "base_model: tiny" in front and "library_name: transformers" in front and "tags:" in front
    results = json.loads((run / "results.json").read_text())
    command = json.loads((run / "config.json").read_text())["command"]
    for section in ("## Model description", "## Training data", "## Training command", "## Validation results",
                    "## How to load and count"):
        assert section in card
    assert command in card and f"{results['best_val_loss']:.4g}" in card
    out = tmp_path / "adapter_export"
    mvr.main(["--export", str(run / "checkpoints" / "best"), str(out)])
    assert {"adapter", "heads.safetensors", "regression_config.json", "processor", "README.md"} <= set(os.listdir(out))
    assert "library_name: peft" in (out / "README.md").read_text()
    model, processor = mvr.VLMRegressionModel.from_pretrained(str(out))
    assert processor.tokenizer.convert_tokens_to_ids(["<x>", "<y>"]) == [model.x_token_id, model.y_token_id]
    with pytest.raises(FileExistsError):
        mvr.export(str(run), str(out))


def test_merged_export_evaluates_without_adapter_or_base_model(merged, tmp_path):
    """evaluate_vlm_regression.py --checkpoint EXPORT runs on the test split of the run's own data (from the export's
    training_config.json) with adapter/ deleted and an empty model cache, which stays empty: nothing but the export
    is loaded."""
    bare = tmp_path / "bare"
    shutil.copytree(merged, bare)
    shutil.rmtree(bare / "adapter", ignore_errors=True)
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    out = tmp_path / "eval"
    env = {**os.environ, "VLM_REGRESSION_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "evaluate_vlm_regression.py"), "--checkpoint", str(bare),
                          "--split", "test", "--num_images", "4", "--max_steps", "3", "--output_dir", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 4 and metrics["dataset"] == "synthetic" and metrics["mae"] is not None
    assert metrics["train_mean_count"] is not None  # the run's synthetic settings: 16 train images
    assert os.listdir(cache) == []


# -----------------------------------------------------------------------------
# From sweep to test score


def test_evaluate_best_scores_the_best_run_on_the_test_split(run, tmp_path, capsys):
    """On a sweep of two runs (the real one best, a worse one without checkpoints), the analysis prints the best
    run's checkpoint and its exact test command, and --evaluate_best runs it and writes the test metrics."""
    from test_hparam import write_run

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    best = sweep / "lr1e-2_r4_a8_mlp2"
    shutil.copytree(run, best, symlinks=True)
    write_run(sweep, "lr1e-3_r8_a16_mlp2", 1e-3, 8, 16, 2)  # best val loss >= 0.2 (test_hparam.fake_loss)
    res = json.loads((best / "results.json").read_text())
    (best / "results.json").write_text(json.dumps(dict(res, best_val_loss=0.01)))  # ranked first, whatever it got
    out = tmp_path / "analysis"
    ahr.main(["--sweep_dir", str(sweep), "--out_dir", str(out), "--evaluate_best",
              "--evaluate_args", "--num_images 2 --max_steps 2"])
    printed = capsys.readouterr().out
    ckpt = str(best / "checkpoints" / "best")
    assert f"Best run {best.name}: checkpoint {ckpt}" in printed
    command = printed.split("Its test score: ")[1].splitlines()[0]
    assert command.split() == [sys.executable, str(ROOT / "evaluate_vlm_regression.py"), "--checkpoint", ckpt,
                               "--split", "test", "--output_dir", str(out / "best_test"), "--num_images", "2",
                               "--max_steps", "2"]
    saved = json.loads((out / "best_test_metrics.json").read_text())
    assert (saved["run"], saved["checkpoint"], saved["command"]) == (best.name, os.path.realpath(ckpt), command)
    m = saved["metrics"]
    assert (m["split"], m["num_images"], m["dataset"]) == ("test", 2, "synthetic") and m["mae"] is not None
    assert f"{best.name} on the test split: count MAE {m['mae']:.3f}" in printed
