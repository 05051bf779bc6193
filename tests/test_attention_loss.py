"""--attention_loss: the last layer's attention from <x> and <y> trained towards the target's image tokens. The loss
equals what the layer's own (eager) attention weights give, skips finished samples, trains LoRA (with gradient
checkpointing too), and a run records it
and refuses a resume that changes it."""
import json

import numpy as np
import pytest
import torch

import model_vlm_regression as mvr
from test_model import make_batch, random_image
from test_train import epoch_rows, run_train


@pytest.fixture()
def model_and_batch():
    torch.manual_seed(0)
    model, processor = mvr.build_model("tiny-random", lora_r=8, lora_dropout=0.0, mlp_layers=2, head_hidden_dim=64,
                                       stop_rule="head")
    model.config["attention_loss"] = 0.1
    batch = make_batch(processor, [random_image(224, 224, 1), random_image(224, 224, 2)])
    targets = torch.tensor([[-0.5, 0.3], [0.6, -0.7]])
    return model, processor, batch, targets


def eager_share_loss(model, batch, targets, rows):
    """The loss from the layer's attention weights themselves: -log(share of <x>'s and <y>'s image attention on the
    tokens whose centre is within 24 px of the target), mean over heads, the two tokens and the rows."""
    base = mvr.base_of(model.vlm)
    shipped = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = base.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                      "mm_token_type_ids")}, use_cache=False, output_attentions=True)
    finally:
        base.set_attn_implementation(shipped)
    att = out.attentions[-1]
    _, x_pos, y_pos = model.token_positions(batch["input_ids"])
    centres = np.array([[(c + 0.5) * 32, (r + 0.5) * 32] for r in range(7) for c in range(7)])  # 224 px: 7x7 tokens
    terms = []
    for b in rows:
        image = (batch["input_ids"][b] == base.config.image_token_id).nonzero().flatten()
        assert len(image) == 49
        target = (targets[b].numpy() + 1) / 2 * 224
        near = torch.from_numpy(np.linalg.norm(centres - target, axis=1) < 24)
        for q in (x_pos[b], y_pos[b]):
            a = att[b, :, q, image].double()
            terms.append(-(a[:, near].sum(-1) / a.sum(-1)).log().mean())
    return torch.stack(terms).mean().item()


def test_attention_loss_is_the_share_of_the_layers_own_attention(model_and_batch):
    """The loss from q and k equals the eager attention's; finished samples are left out; it trains LoRA's q and k of
    the last layer, with gradient checkpointing as without; evaluation and attention_loss 0 compute nothing."""
    model, processor, batch, targets = model_and_batch
    model.train()
    model(**batch, targets=targets, done=torch.zeros(2))
    both = model.attention_loss
    assert both.item() == pytest.approx(eager_share_loss(model, batch, targets, [0, 1]), rel=1e-4)
    model(**batch, targets=targets, done=torch.tensor([1.0, 0.0]))
    assert model.attention_loss.item() == pytest.approx(eager_share_loss(model, batch, targets, [1]), rel=1e-4)
    assert model.attention_loss.item() != pytest.approx(both.item(), rel=1e-3)
    model.zero_grad()
    both.backward()
    last = model.vlm.get_base_model().model.language_model.layers[-1].self_attn
    for proj in (last.q_proj, last.k_proj):
        assert proj.lora_B["default"].weight.grad.abs().sum() > 0
    # gradient checkpointing (the layers recomputed in backward): the same loss and the same gradients
    torch.manual_seed(0)
    checkpointed, _ = mvr.build_model("tiny-random", lora_r=8, lora_dropout=0.0, mlp_layers=2, head_hidden_dim=64,
                                      stop_rule="head", gradient_checkpointing=True)
    checkpointed.config["attention_loss"] = 0.1
    checkpointed.train()
    checkpointed(**batch, targets=targets, done=torch.zeros(2))
    assert checkpointed.attention_loss.item() == pytest.approx(both.item(), rel=1e-5)
    checkpointed.attention_loss.backward()
    recomputed = checkpointed.vlm.get_base_model().model.language_model.layers[-1].self_attn
    for proj, again in ((last.q_proj, recomputed.q_proj), (last.k_proj, recomputed.k_proj)):
        assert torch.allclose(again.lora_B["default"].weight.grad, proj.lora_B["default"].weight.grad, rtol=1e-4,
                              atol=1e-7)
    # images of different sizes in one batch: each row's own tokens, so the loss is the mean of the single images'
    images = [random_image(224, 224, 1), random_image(160, 288, 2)]
    singles = []
    for i, image in enumerate(images):
        one = make_batch(processor, [image], names=(("eggs", "apple")[i],), ks=((0, 1)[i],))
        model(**one, targets=targets[i:i + 1], done=torch.zeros(1))
        singles.append(model.attention_loss.item())
    model(**make_batch(processor, images), targets=targets, done=torch.zeros(2))
    assert model.attention_loss.item() == pytest.approx(np.mean(singles), rel=1e-4)
    model(**batch, targets=targets, done=torch.ones(2))
    assert model.attention_loss is None
    model.eval()
    model(**batch, targets=targets, done=torch.zeros(2))
    assert model.attention_loss is None
    model.train()
    model.config["attention_loss"] = 0.0
    model(**batch, targets=targets, done=torch.zeros(2))
    assert model.attention_loss is None


def test_attention_loss_run_is_recorded_changes_training_and_is_kept_on_resume(tmp_path):
    """A run with --attention_loss records it (config.json, the checkpoint), trains differently from one without,
    and a resume that changes it is refused with one line, the run's files untouched; a negative weight is refused."""
    args = ["--epochs", "1", "--train_batches", "6", "--val_batches", "2", "--stop_rule", "head", "--seed", "3"]
    on, off = tmp_path / "on", tmp_path / "off"
    run_train(on, *args, "--attention_loss", "0.5")
    run_train(off, *args)
    assert json.loads((on / "config.json").read_text())["attention_loss"] == 0.5
    assert json.loads((on / "checkpoints/last/regression_config.json").read_text())["attention_loss"] == 0.5
    assert epoch_rows(on)[0]["val/loss"] != pytest.approx(epoch_rows(off)[0]["val/loss"], rel=1e-6)
    before = (on / "results.json").read_text()
    bad = run_train(on, *args, "--attention_loss", "0.2", "--epochs", "2", "--resume", check=False)
    assert bad.returncode == 2 and "attention_loss 0.5 vs 0.2" in bad.stderr
    assert (on / "results.json").read_text() == before
    neg = run_train(tmp_path / "neg", *args, "--attention_loss", "-1", check=False)
    assert neg.returncode == 2 and "--attention_loss must be >= 0" in neg.stderr
