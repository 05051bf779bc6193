"""
Times the training step: the full step as train_vlm_regression.py runs it (DataLoader + collate, forward, loss,
backward, clipping, AdamW, scheduler) against a bare forward+backward of the same model on one fixed batch.

    python benchmarks/bench_train.py                                   # tiny model, CPU
    python benchmarks/bench_train.py --model_name Qwen/Qwen3-VL-4B-Thinking --random_weights --batch_size 4
    python benchmarks/bench_train.py --model_name Qwen/Qwen3-VL-4B-Thinking --random_weights --gradient_checkpointing
    python benchmarks/bench_train.py --model_name Qwen/Qwen3-VL-4B-Thinking --random_weights --load_in_4bit
    python benchmarks/bench_train.py --model_name tiny --batch_size 8 --malloc default   # glibc's own thresholds

--random_weights builds the architecture from its config (bundled for the 4B) with random weights, so no download
is needed; speed and memory are those of the real model. Data: the synthetic set at --image_size (square images,
224 px by default for the tiny model, 512 px for any other). Reports (one JSON line with --json): median full step, median bare
forward+backward, their ratio (target <= 1.15), the share of the full step spent waiting for data, peak memory.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import dataset as data  # noqa: E402
import model_vlm_regression as mvr  # noqa: E402
import train_data  # noqa: E402
import train_vlm_regression as tr  # noqa: E402
import utils  # noqa: E402
from synthetic_data import SyntheticConfig  # noqa: E402
from tiny_model import TINY_NAMES, random_weights_dir  # noqa: E402


def fwd_bwd(model, batch):
    loss = mvr.counting_loss(model(**batch).float(), batch["targets"], batch["done"])[0]
    loss.backward()
    return loss


def time_full_steps(model, ds, collate, optimizer, scheduler, args, device, sync):
    """(seconds per step, seconds of it spent waiting for the batch) of the training loop's work per batch."""
    params = [q for g in optimizer.param_groups for q in g["params"]]
    n = args.steps + args.warmup
    indices = [i % len(ds) for i in range(n * args.batch_size)]
    loader = train_data.make_loader(ds, indices, args.batch_size, collate, args.num_workers, 0)
    full, wait = [], []
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        t_ready = time.perf_counter()
        batch = train_data.to_device(batch, device)
        fwd_bwd(model, batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t1 = time.perf_counter()
        if i >= args.warmup:
            full.append(t1 - t0)
            wait.append(t_ready - t0)
        t0 = t1
    return full, wait


def time_bare_steps(model, batch, n, warmup, sync):
    """Seconds per bare forward + backward on one fixed batch already on the device."""
    bare = []
    for i in range(n):
        sync()
        t = time.perf_counter()
        fwd_bwd(model, batch)
        model.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            bare.append(time.perf_counter() - t)
    return bare


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- Model
    p.add_argument("--model_name", default="tiny-random", help="hub id, local folder, `tiny` (the pretrained tiny base) or `tiny-random`")
    p.add_argument("--random_weights", action="store_true", help="architecture from config, random weights")
    p.add_argument("--load_in_4bit", action="store_true", help="QLoRA: NF4 language model")
    p.add_argument("--dtype", default="auto", choices=tuple(mvr.DTYPES),
                   help="base weights (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    # ---- Data
    p.add_argument("--batch_size", type=int, default=4, help="samples per step")
    p.add_argument("--image_size", type=int, default=None, help="synthetic image side (default 224 for the tiny models, else 512)")
    p.add_argument("--num_workers", type=int, default=None, help="default: as training (4 with CUDA, 0 on CPU)")
    # ---- Timing
    p.add_argument("--steps", type=int, default=20, help="timed steps of each kind")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, caches)")
    p.add_argument("--malloc", default="keep", choices=("keep", "default"),
                   help="on CPU, keep: freed memory stays in the process, as training runs (utils.keep_freed_memory); "
                        "default: glibc's thresholds")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kept = device == "cpu" and args.malloc == "keep" and utils.keep_freed_memory()
    if args.num_workers is None:
        args.num_workers = train_data.default_num_workers()
    name = random_weights_dir(args.model_name) if args.random_weights else args.model_name
    model, processor = mvr.build_model(name, device=device, dtype=mvr.DTYPES[args.dtype],
                                       load_in_4bit=args.load_in_4bit,
                                       gradient_checkpointing=args.gradient_checkpointing)
    model.train()
    size = args.image_size or (224 if args.model_name in TINY_NAMES else 512)
    cfg = SyntheticConfig(image_size=size, num_train=max(64, args.batch_size * (args.steps + args.warmup)))
    records, _ = data.load_records("synthetic", split="train", synthetic=cfg)
    ds = data.CountingDataset(records, seed=0)
    collate = data.make_collate_fn(processor)
    optimizer = tr.build_optimizer(model, 1e-4, 5e-4, 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tr.lr_lambda(10, 1000))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    full, wait = time_full_steps(model, ds, collate, optimizer, scheduler, args, device, sync)
    batch = train_data.to_device(collate([ds[i] for i in range(args.batch_size)]), device)
    bare = time_bare_steps(model, batch, args.steps + args.warmup, args.warmup, sync)

    full_ms, bare_ms = statistics.median(full) * 1e3, statistics.median(bare) * 1e3
    out = {
        "model": args.model_name, "random_weights": args.random_weights, "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores",
        "dtype": str(mvr.DTYPES[args.dtype] or mvr.default_dtype(device)), "load_in_4bit": args.load_in_4bit,
        "gradient_checkpointing": args.gradient_checkpointing, "keep_freed_memory": kept,
        "batch_size": args.batch_size,
        "image_size": size, "tokens_per_sample": int(batch["input_ids"].shape[1]),
        "full_step_ms": round(full_ms, 1), "bare_fwd_bwd_ms": round(bare_ms, 1),
        "ratio": round(full_ms / bare_ms, 3), "data_wait_share": round(sum(wait) / sum(full), 3),
        "samples_per_s": round(args.batch_size / (full_ms / 1e3), 2),
        "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated() / 1024 ** 3, 2) if device == "cuda" else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:<24} {v}")
    return out


if __name__ == "__main__":
    main()
