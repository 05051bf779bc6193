"""The real Qwen3-VL-4B architecture end to end on CPU: random bf16 weights built from the bundled config (no
download), one LoRA training step with gradients reaching every trainable group, save + reload with identical
outputs, and one counting step through evaluate_vlm_regression.count_records.

Measured on the 2-core, 23 GB development machine (shared with other jobs, `nice -n 5`), with the random weights
already cached in $VLM_REGRESSION_CACHE: 154-178 s and a peak RSS of 11.5 GiB (the training step ~55 s, each
no-grad forward ~25 s; the weights are memory-mapped, so the trained model must be gone before the reload). Building
that cache first (tiny_model.random_weights_dir: the architecture initialised in bf16, then 8.9 GB written) adds about
85 s and peaks at 10.5 GB RSS, below the test's own peak: 258 s in all on a cold cache. The test prints its wall
time and peak RSS (run pytest with -s to see them).

It is skipped, saying so, only when the machine cannot run it: too little free memory (MIN_AVAILABLE_GIB), too little
disk for the cached weights, or a CPU whose bf16 matrix products are too slow (MIN_BF16_GFLOPS). The last is measured,
not guessed from CPU flags: on an AVX2-only CPU (no AVX-512), PyTorch 2.14's bf16 product of a gradient with a
frozen weight (`grad @ W`, the backward's input gradient through every Linear) ran at 0.16 GFLOP/s, against 33 GFLOP/s
for the same product in fp32, so the one LoRA step alone would take hours; CI once timed out on such a machine.
"""
import gc
import os
import shutil
import time
import weakref

import pytest
import torch

import dataset as data
import evaluate_vlm_regression as ev
import model_vlm_regression as mvr
import train_vlm_regression as tr
from synthetic_data import SyntheticConfig
from tiny_model import cache_dir, random_weights_dir

try:  # imported here, not first inside build_model: bitsandbytes logs a warning on import whose record (captured by
    import bitsandbytes  # noqa: F401  pytest) holds a traceback whose frames keep build_model's model alive: 8 GB more
except ImportError:
    pass

MODEL = "Qwen/Qwen3-VL-4B-Thinking"
SIDE = 64  # the processor's floor (MIN_PIXELS): 2x2 merged visual tokens per image
MIN_AVAILABLE_GIB = 14  # the measured peak RSS is about 12 GB
WEIGHTS_GIB = 9  # model.safetensors of the random-weight copy (bf16)
MIN_BF16_GFLOPS = 2.0  # the backward's bf16 products; an AVX2-only CPU gives 0.16, one with AVX-512 far more


def bf16_backward_gflops():
    """Speed of the backward's bf16 product (gradient [tokens, out] @ weight [out, in], the weight as nn.Linear stores
    it) on this CPU, in GFLOP/s: one warm-up and two timed products of a 64 x 2048 by 2048 x 1024 shape."""
    grad = torch.randn(64, 2048, dtype=torch.bfloat16)
    weight = torch.randn(2048, 1024, dtype=torch.bfloat16)
    grad @ weight
    t0 = time.perf_counter()
    for _ in range(2):
        grad @ weight
    return 2 * 2 * 64 * 2048 * 1024 / (time.perf_counter() - t0) / 1e9


def available_gib():
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 1024 ** 2


def reset_peak_rss():
    """Start VmHWM afresh (Linux: "5" to clear_refs), so the peak is this test's, not the earlier tests'."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak also covers what ran before in this process


def peak_rss_gib():
    """This process's peak resident set since reset_peak_rss (VmHWM, in GiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024 ** 2


def needs_room():
    """A skip reason when this machine cannot run the test, else None."""
    if available_gib() < MIN_AVAILABLE_GIB:
        return f"needs {MIN_AVAILABLE_GIB} GiB of available memory, {available_gib():.1f} GiB available"
    cached = os.path.isfile(os.path.join(cache_dir(), "random-" + MODEL.replace("/", "--"), "model.safetensors"))
    os.makedirs(cache_dir(), exist_ok=True)
    if not cached and shutil.disk_usage(cache_dir()).free / 1024 ** 3 < WEIGHTS_GIB + 1:
        return f"needs {WEIGHTS_GIB + 1} GiB free in {cache_dir()} for the random weights"
    gflops = bf16_backward_gflops()
    if gflops < MIN_BF16_GFLOPS:
        return (f"this CPU's bf16 backward products run at {gflops:.2f} GFLOP/s (needs {MIN_BF16_GFLOPS}): "
                f"one LoRA step of the 4B would take hours")
    return None


def test_4b_architecture_trains_saves_reloads_and_counts(tmp_path):
    reason = needs_room()
    if reason:
        pytest.skip(reason)
    reset_peak_rss()
    t0 = time.time()
    base = random_weights_dir(MODEL)
    t_weights = time.time() - t0
    torch.manual_seed(0)
    pixels = dict(min_pixels=SIDE * SIDE, max_pixels=SIDE * SIDE)
    model, processor = mvr.build_model(base, lora_dropout=0.0, dtype=torch.bfloat16, stop_rule="head", **pixels)
    assert base_param_count(model) == 4_437_815_808  # the architecture of MODEL_FACTS / --summary

    records, _ = data.load_records("synthetic", synthetic=SyntheticConfig(image_size=SIDE, num_train=2))
    ds = data.CountingDataset(records, seed=0, **pixels)
    batch = data.make_collate_fn(processor)([ds[0]])
    assert batch["done"].item() == 0.0  # the x/y heads get a loss, not only the stop head

    # (a) one training step: forward, loss, backward, every group has a gradient, AdamW updates
    model.train()
    pred = model(**batch)
    loss = mvr.counting_loss(pred.float(), batch["targets"], batch["done"])[0]
    loss.backward()
    norms = tr.gradient_flow(model)
    assert set(norms) >= {"x_head", "y_head", "done_head", "lora", "token_rows"}, norms
    assert all(v > 0 and v == v for v in norms.values()), norms
    optimizer = tr.build_optimizer(model, 1e-4, 5e-4, 0.01)
    optimizer.step()
    del optimizer
    model.zero_grad(set_to_none=True)
    gc.collect()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the step moved LoRA off its zero init: the reload test bites

    # (b) save, drop the model, reload in bf16: the same outputs on the same batch
    model.eval()
    with torch.no_grad():
        before = model(**batch)
    model.save_pretrained(str(tmp_path / "ckpt"), processor)
    alive = weakref.ref(model)
    del model, pred, loss, lora_b
    gc.collect()
    assert alive() is None, "the trained model outlived its deletion: the reload would double the memory"
    model, processor = mvr.VLMRegressionModel.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.bfloat16)
    with torch.no_grad():
        after = model(**batch)
    assert torch.equal(before, after), (before, after)

    # (c) one counting step: a forward over the marked image, a point or a stop
    out = ev.count_records(model, processor, records[:1], max_steps=1, batch_size=1)
    pred0 = out["predictions"][0]
    assert pred0["steps"] == 1 and out["metrics"]["forward_passes"] == 1, out
    seconds, rss = time.time() - t0, peak_rss_gib()
    print(f"\n4B real architecture: {seconds:.0f} s ({t_weights:.0f} s getting the random weights), "
          f"peak RSS {rss:.1f} GiB")
    assert rss < MIN_AVAILABLE_GIB


def base_param_count(model):
    return sum(p.numel() for n, p in mvr.base_of(model.vlm).named_parameters()
               if "lora_" not in n and "trainable_tokens" not in n)
