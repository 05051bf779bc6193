"""Model core: tokens, LoRA, heads, gradients, save/load, 4-bit, batching, errors, summary, the tiny model's cache."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import model_vlm_regression as mvr
from conftest import ROOT
from prompt import encode_batch
from tiny_model import tiny_model_dir


def random_image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_batch(processor, images, names=("eggs", "apple", "sea shells"), ks=(0, 1, 5)):
    n = len(images)
    return encode_batch(processor, images, [names[i % len(names)] for i in range(n)], [ks[i % len(ks)] for i in range(n)])


@pytest.fixture()
def tiny_model():
    torch.manual_seed(0)
    return mvr.build_model("tiny-random", lora_r=8, lora_alpha=16, mlp_layers=2, head_hidden_dim=64)


def test_special_tokens_added_without_dropping_qwen_ones(tiny_processor):
    """<x> and <y> join the tokenizer's special tokens; Qwen's own stay registered."""
    tok = tiny_processor.tokenizer
    specials = set(tok.all_special_tokens)
    for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<x>", "<y>"):
        assert t in specials, t
    assert tok.convert_tokens_to_ids("<|image_pad|>") == tiny_processor.image_token_id


def test_embedding_is_never_shrunk(tiny_processor):
    """The embedding grows to fit <x>/<y> when it must, keeping every old row, and never loses its padded rows."""
    base = mvr.load_base_model("tiny-random")
    rows = base.get_input_embeddings().weight.shape[0]
    ids = mvr.coordinate_token_ids(tiny_processor)
    assert len(tiny_processor.tokenizer) < rows  # padded like Qwen's matrix
    assert mvr.ensure_token_rows(base, ids) is False
    assert base.get_input_embeddings().weight.shape[0] == rows
    # a matrix exactly as long as the old vocabulary must grow to fit the new ids, keeping every old row
    base.resize_token_embeddings(min(ids))
    old = base.get_input_embeddings().weight[: min(ids)].clone()
    assert mvr.ensure_token_rows(base, ids) is True
    weight = base.get_input_embeddings().weight
    assert weight.shape[0] > max(ids) and torch.equal(weight[: min(ids)], old)


def test_lora_targets_language_model_only(tiny_model):
    """LoRA adapts the language model's seven projections; the vision tower stays frozen; the heads are fp32."""
    model, _ = tiny_model
    lora_names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    kinds = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in lora_names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any(p.requires_grad for p in model.vlm.get_base_model().model.visual.parameters())
    assert model.x_head[-2].weight.dtype == torch.float32


def test_gradients_reach_heads_lora_and_token_rows(tiny_model):
    """Every trainable group (both heads, LoRA A and B, the <x>/<y> rows) receives a gradient."""
    model, processor = tiny_model
    batch = make_batch(processor, [random_image(224, 224, 1), random_image(160, 288, 2)])
    pred = model(**batch)
    assert pred.shape == (2, 2) and pred.abs().max() <= 1
    # LoRA B starts at zero, so LoRA A only gets gradient after one update; two steps exercise both
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        mvr.regression_loss(model(**batch), torch.tensor([[0.5, -0.5], [-0.2, 0.3]]))[0].backward()
        opt.step()
    groups = model.trainable_groups()
    assert set(groups) == {"x_head", "y_head", "lora", "token_rows"}
    for name, params in groups.items():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name
    x_id, y_id = mvr.coordinate_token_ids(processor)
    rows = model.vlm.get_base_model().get_input_embeddings()
    assert rows.token_adapter.trainable_tokens_delta["default"].grad.abs().sum(1).gt(0).all()


def test_save_load_round_trip_is_identical(tiny_model, tmp_path):
    """A trained model saved and loaded back predicts exactly what it predicted before saving."""
    model, processor = tiny_model
    batch = make_batch(processor, [random_image(224, 224, 3), random_image(192, 256, 4)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # move LoRA B, token rows and heads away from their init
        opt.zero_grad()
        mvr.regression_loss(model(**batch), torch.full((2, 2), 0.4))[0].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(tmp_path / "ckpt", processor)
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"adapter", "heads.safetensors", "regression_config.json", "processor"} <= files
    assert (tmp_path / "ckpt/adapter/adapter_model.safetensors").exists()
    cfg = json.loads((tmp_path / "ckpt/regression_config.json").read_text())
    assert cfg["base_model"] == "tiny-random" and "transformers" in cfg["versions"]
    loaded, processor2 = mvr.VLMRegressionModel.from_pretrained(tmp_path / "ckpt")
    loaded.eval()
    with torch.no_grad():
        after = loaded(**make_batch(processor2, [random_image(224, 224, 3), random_image(192, 256, 4)]))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    assert not torch.allclose(before, torch.zeros_like(before), atol=1e-3)


def test_batched_equals_one_by_one(tiny_model):
    """Right padding: a sample's prediction does not depend on the other samples of its batch."""
    model, processor = tiny_model
    model.eval()
    images = [random_image(224, 224, 5), random_image(128, 320, 6), random_image(288, 192, 7)]
    with torch.no_grad():
        batched = model(**make_batch(processor, images))
        single = torch.cat([model(**make_batch(processor, [im], names=(n,), ks=(k,)))
                            for im, n, k in zip(images, ("eggs", "apple", "sea shells"), (0, 1, 5))])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_malformed_sample_is_a_clear_error(tiny_model):
    """A prompt that lost its <y> is an error naming the sample, not a silent read of the wrong token."""
    model, processor = tiny_model
    batch = make_batch(processor, [random_image(64, 64, 8), random_image(64, 64, 9)])
    x_id, y_id = mvr.coordinate_token_ids(processor)
    ids = batch["input_ids"].clone()
    ids[1][ids[1] == y_id] = processor.tokenizer.pad_token_id  # sample 1 lost its <y>, as if truncated
    with pytest.raises(ValueError, match=r"sample 1 of the batch has 0 <y> tokens"):
        model(**dict(batch, input_ids=ids))


def test_4bit_forward_backward_on_cpu_keeps_vision_unquantized():
    """QLoRA quantizes the language model only; gradients still reach the heads and the token rows."""
    import bitsandbytes as bnb

    model, processor = mvr.build_model("tiny-random", load_in_4bit=True, lora_r=8, mlp_layers=2, head_hidden_dim=64,
                                       gradient_checkpointing=True)
    base = model.vlm.get_base_model()
    quantized = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all("language_model" in n for n in quantized)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.model.visual.modules())
    model.train()
    batch = make_batch(processor, [random_image(96, 96, 10), random_image(64, 128, 11)])
    loss = mvr.regression_loss(model(**batch), torch.zeros(2, 2))[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.trainable_groups()["x_head"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_groups()["token_rows"])


def test_summary_cli_for_the_4b_architecture():
    """The 4B's parameter counts, from the bundled config alone (no download)."""
    out = subprocess.run([sys.executable, "model_vlm_regression.py", "--model_name", "Qwen/Qwen3-VL-4B-Thinking",
                          "--summary", "--json"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    s = json.loads(out[out.index("{"):])
    assert s["total_params"] == 4_437_815_808
    assert s["vision_params"] == 415_347_712
    assert s["lora_params"] == 33_030_144
    assert s["memory_gib"]["4bit"] < s["memory_gib"]["bf16"]


def test_building_the_tiny_model_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """A run that builds the cache must train exactly like one that finds it: building may not reseed torch."""
    monkeypatch.setenv("VLM_REGRESSION_CACHE", str(tmp_path))
    torch.manual_seed(42)
    expected = torch.rand(4)
    torch.manual_seed(42)
    path = tiny_model_dir()  # builds it: the cache folder is empty
    assert path.startswith(str(tmp_path))
    assert torch.equal(torch.rand(4), expected)


def test_checkpoint_saved_before_the_head_rename_loads(tiny_model, tmp_path):
    """regression_config.json written before --head_dim became --head_hidden_dim (key `head_dim`) still loads, to
    the same predictions."""
    model, processor = tiny_model
    model.eval()
    model.save_pretrained(tmp_path / "ckpt", processor)
    path = tmp_path / "ckpt" / "regression_config.json"
    cfg = json.loads(path.read_text())
    cfg["head_dim"] = cfg.pop("head_hidden_dim")
    path.write_text(json.dumps(cfg))
    loaded, processor2 = mvr.VLMRegressionModel.from_pretrained(tmp_path / "ckpt")
    loaded.eval()
    batch = make_batch(processor, [random_image(96, 96, 12)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), model(**batch), rtol=0, atol=0)
    assert loaded.config["head_hidden_dim"] == 64 and "head_dim" not in loaded.config


def test_coordinate_losses_and_their_mask():
    """MSE is the mean squared error per axis, L1 the mean absolute error; masked rows count 0 but stay in the
    divisor. Where either of two objects may be the target, MSE's best constant lies between them and L1's is the
    likelier object: L1 does not pull a prediction off an object towards the middle."""
    pred = torch.tensor([[0.5, -0.5], [0.0, 0.2]])
    target = torch.tensor([[0.0, 0.0], [0.4, 0.2]])
    total, lx, ly = mvr.regression_loss(pred, target)
    assert torch.allclose(torch.stack([lx, ly]), torch.tensor([(0.25 + 0.16) / 2, 0.25 / 2]))
    total, lx, ly = mvr.regression_loss(pred, target, kind="l1")
    assert torch.allclose(torch.stack([lx, ly]), torch.tensor([0.9 / 2, 0.5 / 2])) and torch.isclose(total, lx + ly)
    total, lx, ly = mvr.regression_loss(pred, target, mask=torch.tensor([False, True]), kind="l1")
    assert torch.allclose(torch.stack([lx, ly]), torch.tensor([0.4 / 2, 0.0]))
    # the next object is A (x -0.5) in two samples of three, B (x 0.5) in one: MSE's best constant is their mean,
    # a point between them; L1's is A itself
    targets = torch.tensor([[-0.5, 0.0], [-0.5, 0.0], [0.5, 0.0]])
    loss = lambda x, kind: mvr.regression_loss(torch.tensor([[x, 0.0]] * 3), targets, kind=kind)[0]  # noqa: E731
    mean = -1 / 6
    assert loss(mean, "mse") < loss(-0.5, "mse") and loss(-0.5, "l1") < loss(mean, "l1")
    with pytest.raises(ValueError, match="unknown coordinate loss"):
        mvr.regression_loss(pred, target, kind="huber")


def test_patch_embedding_runs_as_a_matmul_of_the_same_weights():
    """load_base_model runs the ViT's stride-equals-kernel Conv3d as a matmul: the same result as the convolution
    (float rounding), gradients reach its weight and bias, and the state dict is untouched."""
    torch.manual_seed(0)
    base = mvr.load_base_model("tiny")
    embed = base.model.visual.patch_embed
    assert isinstance(embed.proj, torch.nn.Conv3d) and "model.visual.patch_embed.proj.weight" in base.state_dict()
    rows = torch.randn(2 * 196, embed.in_channels * embed.temporal_patch_size * embed.patch_size ** 2)
    conv = embed.proj(rows.view(-1, embed.in_channels, embed.temporal_patch_size, embed.patch_size,
                                embed.patch_size)).view(-1, embed.embed_dim)
    out = embed(rows)
    torch.testing.assert_close(out, conv, rtol=1e-5, atol=1e-4)
    out.square().sum().backward()
    assert embed.proj.weight.grad.abs().sum() > 0 and embed.proj.bias.grad.abs().sum() > 0
