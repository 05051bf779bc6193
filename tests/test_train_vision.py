"""--train_vision none|merger|all and --vision_lr: which weights train, their gradients, save/load, export, and a
training run that resumes with the vision side's weights and optimizer state."""
import json

import pytest
import torch

import model_vlm_regression as mvr
from test_model import make_batch, random_image
from test_train import epoch_rows, kill_after_checkpoint, run_train


def trained_vision(model):
    """{name: parameter} of the vision side's trained weights (peft's trainable copies), and nothing else trainable
    in the vision tower."""
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".visual." in n and "modules_to_save" not in n)
    return {n: p for n, p in model.named_parameters() if ".visual." in n and "modules_to_save" in n}


@pytest.mark.parametrize("mode", ["merger", "all"])
def test_train_vision_trains_exactly_its_modules_and_round_trips(mode, tmp_path):
    """merger trains the patch and DeepStack mergers only, all the whole ViT; both get gradients and move, and a
    saved checkpoint loads back predicting the same, with the trained vision weights, not the base's."""
    torch.manual_seed(0)
    model, processor = mvr.build_model("tiny-random", lora_r=8, mlp_layers=2, head_hidden_dim=64, train_vision=mode)
    vision = trained_vision(model)
    assert all(p.requires_grad for p in vision.values())
    if mode == "merger":
        assert vision and all("merger" in n for n in vision)
        assert not any("blocks" in n or "patch_embed" in n for n in vision)
    else:
        assert any("blocks" in n for n in vision) and any("patch_embed" in n for n in vision)
        assert any("merger" in n for n in vision)
    assert set(model.trainable_groups()) == {"x_head", "y_head", "done_head", "lora", "token_rows", "vision"} - \
        ({"done_head"} if model.done_head is None else set())
    # the tiny model adds its last DeepStack merger's features after its last layer, where nothing reads them (the
    # 4B adds them at layers 0-2 of 36): that merger alone gets no gradient here
    vision = {n: p for n, p in vision.items() if "deepstack_merger_list.1." not in n}
    start = {n: p.detach().clone() for n, p in vision.items()}

    batch = make_batch(processor, [random_image(224, 224, 1), random_image(160, 288, 2)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        mvr.regression_loss(model(**batch), torch.full((2, 2), 0.4))[0].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in vision.items() if "bias" not in n)
        opt.step()
    assert all(not torch.equal(p, start[n]) for n, p in vision.items() if "bias" not in n)

    model.eval()
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(tmp_path / "ckpt", processor)
    assert json.loads((tmp_path / "ckpt/regression_config.json").read_text())["train_vision"] == mode
    loaded, processor2 = mvr.VLMRegressionModel.from_pretrained(tmp_path / "ckpt")
    loaded.eval()
    with torch.no_grad():
        after = loaded(**make_batch(processor2, [random_image(224, 224, 1), random_image(160, 288, 2)]))
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # what was restored is the trained copy of each vision module, not the base's weights
    loaded_vision = trained_vision(loaded)
    assert vision.keys() <= loaded_vision.keys()
    assert all(torch.equal(loaded_vision[n], p) for n, p in vision.items())
    originals = {n.replace("modules_to_save.default", "original_module"): p for n, p in vision.items()}
    frozen = dict(loaded.named_parameters())
    assert all(not torch.equal(frozen[n], p) for n, p in originals.items() if "bias" not in n)

def test_merged_export_keeps_the_trained_vision(tmp_path):
    """export --merge folds the trained merger into the saved base: the merged folder predicts what the run did."""
    out = tmp_path / "run"
    run_train(out, "--epochs", "1", "--train_batches", "3", "--val_batches", "1", "--train_vision", "merger",
              "--vision_lr", "5e-3", "--lr", "5e-3")
    model, processor = mvr.VLMRegressionModel.from_pretrained(out / "checkpoints/last")
    merged_dir = mvr.export(str(out), str(tmp_path / "merged"), merge=True)
    merged, processor2 = mvr.VLMRegressionModel.from_pretrained(merged_dir)
    model.eval(), merged.eval()
    images = [random_image(224, 224, 5), random_image(192, 256, 6)]
    with torch.no_grad():
        a, b = model(**make_batch(processor, images)), merged(**make_batch(processor2, images))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_vision_training_is_recorded_and_resumes_exactly(tmp_path):
    """A --train_vision merger run records its settings, has the vision group at --vision_lr, and one killed
    mid-epoch and resumed logs what an uninterrupted run logs (vision weights and their AdamW state restored)."""
    args = ["--epochs", "2", "--train_batches", "12", "--val_batches", "2", "--checkpoint_every", "4",
            "--train_vision", "merger", "--vision_lr", "2e-3"]
    straight = tmp_path / "straight"
    proc = run_train(straight, *args)
    assert "vision" in proc.stdout.split("gradient flow on the first step")[1].splitlines()[0]
    cfg = json.loads((straight / "config.json").read_text())
    assert cfg["train_vision"] == "merger" and cfg["vision_lr"] == 2e-3
    out = tmp_path / "killed"
    kill_after_checkpoint(out, args, step=4)
    run_train(out, *args, "--resume")
    a, b = epoch_rows(straight), epoch_rows(out)
    keys = ("epoch", "step", "train/loss", "val/loss", "val/pixel_error")
    assert [r[k] for r in b for k in keys] == pytest.approx([r[k] for r in a for k in keys], rel=1e-5)
    # a resume that asks for another vision setting is refused (one line, exit 2), the run's files untouched
    before = (out / "results.json").read_text()
    bad = run_train(out, *[a if a != "merger" else "all" for a in args], "--resume", check=False)
    assert bad.returncode == 2 and "train_vision 'merger' vs 'all'" in bad.stderr
    assert (out / "results.json").read_text() == before


def test_vision_lr_without_vision_training_is_refused(tmp_path):
    """--vision_lr with a frozen vision tower is a one-line argument error, before anything is written."""
    proc = run_train(tmp_path / "run", "--vision_lr", "1e-4", check=False)
    assert proc.returncode == 2 and "--vision_lr needs --train_vision" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_summary_counts_the_vision_weights_that_train():
    """--summary --train_vision counts exactly the weights the built model trains on the vision side."""
    for mode in ("merger", "all"):
        model, _ = mvr.build_model("tiny-random", lora_r=8, mlp_layers=2, head_hidden_dim=64, train_vision=mode)
        built = sum(p.numel() for p in trained_vision(model).values())
        s = mvr.summarize("tiny-random", 8, 16, 2, 64, train_vision=mode)
        assert s["vision_trainable_params"] == built > 0 and s["train_vision"] == mode
    assert mvr.summarize("tiny-random", 8, 16, 2, 64)["vision_trainable_params"] == 0
