"""
The README's demo on several seeds: runs `train_vlm_regression.py --config configs/demo.yaml --seed S` for each
seed (skipping a seed whose run folder holds a completed run, resuming one that holds an unfinished run) and prints one row per seed: wall times, the
held-out count against the demo's bars, and how far the counted points land against the match radius.

    python benchmarks/demo_seeds.py --out_root runs/demo-seeds                  # seeds 42 (the demo's), 0, 1; ~10 min each
    python benchmarks/demo_seeds.py --out_root runs/demo-reading --ordering reading_order   # a variant
    (--json: one JSON object on stdout; any other flag goes to train_vlm_regression.py; training's own output: stderr)

The bars (docs/VLM_WORKFLOW.md section 4b): count MAE <= 0.5 x the mean-count baseline's, localisation F1 >= 0.8 at
the mark radius, >= 80% of the images stopped by the stop head.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_seed(seed, out_dir, extra):
    """Train + count one seed (unless done); returns the wall seconds of this call (None when skipped)."""
    results = os.path.join(out_dir, "results.json")
    status = json.load(open(results)).get("status") if os.path.exists(results) else None
    if status == "completed":
        return None
    t = time.time()
    cmd = [sys.executable, os.path.join(ROOT, "train_vlm_regression.py"), "--config",
           os.path.join(ROOT, "configs", "demo.yaml"), "--seed", str(seed), "--output_dir", out_dir, *extra]
    if status is not None:  # an interrupted or failed run: continue from its checkpoint (or start it again)
        cmd.append("--resume")
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=sys.stderr)  # stdout: only the report
    return time.time() - t


def row(seed, out_dir, wall):
    with open(os.path.join(out_dir, "results.json")) as f:
        r = json.load(f)
    c = r["count_eval"]
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        epochs = [m for m in map(json.loads, f) if m.get("epoch_end")]
    best = min(epochs, key=lambda m: m["val/loss"])
    return {
        "seed": seed, "wall_s": None if wall is None else round(wall, 1), "epochs": r["epochs_completed"],
        "steps": r["step"],
        "train_s": round(r["wall_time_s"] - c["seconds"], 1), "count_s": round(c["seconds"], 1),
        "best_val_loss": r["best_val_loss"], "baseline_val_loss": r["baseline_val_loss"],
        "val_pixel_error_at_best": best.get("val/pixel_error"),
        "count_images": c["num_images"], "mae": c["mae"], "baseline_mae": c["baseline_mean_count_mae"],
        "mae_ratio": c["mae"] / c["baseline_mean_count_mae"], "f1": c["f1"], "precision": c["precision"],
        "recall": c["recall"], "stopped_by_head": c["stop_reasons"].get("done", 0) / c["num_images"],
        "stop_reasons": c["stop_reasons"], "point_px_median": c.get("point_to_nearest_object_px_median"),
        "match_radius_px": c.get("match_radius_px_mean"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1], help="42 is the demo's own seed")
    p.add_argument("--out_root", default="runs/demo-seeds", help="seed S runs in OUT_ROOT/seed-S")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args, extra = p.parse_known_args(argv)  # anything else goes to train_vlm_regression.py
    rows = []
    for seed in args.seeds:
        out_dir = os.path.join(args.out_root, f"seed-{seed}")
        rows.append(row(seed, out_dir, run_seed(seed, out_dir, extra)))
    if args.json:
        print(json.dumps({"rows": rows, "extra_args": extra}, indent=2))
        return
    print("seed  epochs  train s  count s  val px  MAE   baseline  ratio  F1    by head  point px (radius)")
    for r in rows:
        print(f"{r['seed']:>4}  {r['epochs']:>6}  {r['train_s']:>7.0f}  {r['count_s']:>7.0f}  "
              f"{r['val_pixel_error_at_best']:>6.1f}  "
              f"{r['mae']:.3f} {r['baseline_mae']:>8.3f}  {r['mae_ratio']:>5.2f}  {r['f1']:.2f}  "
              f"{r['stopped_by_head']:>7.0%}  {r['point_px_median']:.1f} ({r['match_radius_px']:.0f})")


if __name__ == "__main__":
    main()
