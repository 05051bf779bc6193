"""
Counting forwards per second: the regression model in eval mode (no gradients) on a batch of marked images, as each
step of evaluate_vlm_regression.count_records runs it. Reports the model's forward alone (the batch already on the
device) and the processor's encoding of the batch (CPU), so a count's cost per step is their sum plus the marking.

    python benchmarks/bench_forward.py                                                     # tiny model, CPU
    python benchmarks/bench_forward.py --model_name Qwen/Qwen3-VL-4B-Thinking --random_weights --batch_size 16

Images: --width x --height (default 576 x 384, FSC-147's frame) of dense synthetic layouts (synthetic_data.dense_layout,
--objects per image) with the first half of the objects marked as the counting loop marks them (counting.draw_marks).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import counting  # noqa: E402
import model_vlm_regression as mvr  # noqa: E402
import synthetic_data as synth  # noqa: E402
import train_data  # noqa: E402
from prompt import encode_batch  # noqa: E402
from tiny_model import random_weights_dir  # noqa: E402


INT_ARGS = (  # (name, default, minimum, help)
    ("batch_size", 16, 1, "images per forward"), ("width", 576, 1, "image width (px)"),
    ("height", 384, 1, "image height (px)"), ("objects", 40, 2, "objects per image (half of them marked)"),
    ("steps", 10, 1, "timed forwards"), ("warmup", 2, 0, "untimed forwards first"))


def marked_images(n, width, height, objects):
    """n grey images with `objects` dense objects each, the first half of them marked; (images, numbers marked)."""
    images, ks = [], []
    for seed in range(n):
        pts, size = synth.dense_layout(objects, seed, width, height)
        k = objects // 2
        spec = counting.mark_spec(counting.protocol_scale(pts[:k], size), width, height, k)
        images.append(counting.draw_marks(Image.new("RGB", (width, height), (128, 128, 128)), pts[:k], spec))
        ks.append(k)
    return images, ks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default="tiny-random", help="hub id, local folder, `tiny` (the pretrained tiny base) or `tiny-random`")
    p.add_argument("--random_weights", action="store_true", help="architecture from config, random weights")
    p.add_argument("--dtype", default="auto", choices=tuple(mvr.DTYPES),
                   help="base weights (auto: bf16 on CUDA, fp32 on CPU)")
    for name, default, _, text in INT_ARGS:
        p.add_argument(f"--{name}", type=int, default=default, help=text)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    for name, _, minimum, _ in INT_ARGS:
        if getattr(args, name) < minimum:
            p.error(f"--{name} must be >= {minimum}, got {getattr(args, name)}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    name = random_weights_dir(args.model_name) if args.random_weights else args.model_name
    pixels = args.width * args.height
    torch.manual_seed(0)
    model, processor = mvr.build_model(name, device=device, dtype=mvr.DTYPES[args.dtype], stop_rule="head",
                                       min_pixels=pixels, max_pixels=pixels)
    model.eval()
    images, ks = marked_images(args.batch_size, args.width, args.height, args.objects)
    types = ["dots"] * args.batch_size
    encode_s = []
    for _ in range(3):
        t = time.perf_counter()
        batch = encode_batch(processor, images, types, ks)
        encode_s.append(time.perf_counter() - t)
    batch = train_data.to_device(batch, device)
    forward_s = []
    with torch.no_grad():
        for i in range(args.warmup + args.steps):
            sync()
            t = time.perf_counter()
            model(**batch)
            sync()
            if i >= args.warmup:
                forward_s.append(time.perf_counter() - t)
    fwd, enc = statistics.median(forward_s), statistics.median(encode_s)
    out = {
        "model": args.model_name, "random_weights": args.random_weights, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores",
        "dtype": str(mvr.DTYPES[args.dtype] or mvr.default_dtype(device)), "batch_size": args.batch_size,
        "image_size": [args.width, args.height], "tokens_per_sample": int(batch["input_ids"].shape[1]),
        "forward_ms": round(fwd * 1e3, 1), "forwards_per_s": round(args.batch_size / fwd, 2),
        "encode_ms": round(enc * 1e3, 1),
        "forwards_per_s_incl_encoding": round(args.batch_size / (fwd + enc), 2),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2) if device == "cuda" else None,
    }
    print(json.dumps(out) if args.json else "\n".join(f"{k:<30} {v}" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
