"""
Rank the runs of a hyperparameter sweep (run_hparam_search.sh) and plot what the grid says.

    python analyze_hparam_results.py --sweep_dir runs/hparam_search
    python analyze_hparam_results.py --sweep_dir runs/hparam_search --sort_by pixel_error --top 10
    python analyze_hparam_results.py --wandb_project vlm-sequential-counting --wandb_group hparam_search \
        --out_dir runs/hparam_search/analysis          # the same, from the W&B API instead of the files
    python analyze_hparam_results.py --sweep_dir runs/hparam_search --evaluate_best   # + the best run's test score

Each run folder holds train_vlm_regression.py's outputs: config.json (the hyperparameters), results.json (status,
best/final validation loss, maybe count_eval) and metrics.jsonl (lines with "epoch_end": true carry the per-epoch
losses and pixel error). Runs are ranked by their validation count MAE where they recorded one (training's
--eval_count_images), else by best validation loss (or --sort_by); the table shows the loss, the pixel error at
the best epoch and the count MAE. Runs that are unfinished, failed or unreadable are listed, not
ranked: a run is completed only when its results.json parses, says "completed" and has a finite best_val_loss (a
file cut short is not, whatever text it holds). A --sweep_dir that does not exist is a one-line error (exit 1).

Writes into --out_dir (default SWEEP_DIR/analysis), each file atomically (temp file + rename):
    summary.csv               every run, ranked ones first, with status and problem columns
    summary.md                the markdown table printed below
    val_loss_vs_lr.png        best val loss vs learning rate, one colour per LoRA rank
    rank_alpha_heatmap.png    best val loss over LoRA rank x alpha (best of the other hyperparameters)
    mlp_depth.png             best val loss per number of MLP layers in the heads
    learning_curves_top.png   train / val loss per epoch of the top runs
    marginal_means.png        mean +- std (and min) of best val loss for each value of each hyperparameter
It prints the best run's checkpoint and the evaluate_vlm_regression.py command that scores it on the test split;
--evaluate_best runs it (outputs in OUT_DIR/best_test/) and writes OUT_DIR/best_test_metrics.json.
"""

import argparse
import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pandas as pd

import utils

HERE = os.path.dirname(os.path.abspath(__file__))
HPARAMS = ["lr", "lora_r", "lora_alpha", "mlp_layers"]  # the grid's axes, named as train_vlm_regression.py's args
LABELS = {"lr": "learning rate", "lora_r": "LoRA rank r", "lora_alpha": "LoRA alpha", "mlp_layers": "MLP layers"}
SORT_COLUMNS = {"val_loss": "best_val_loss", "pixel_error": "pixel_error", "count_mae": "count_mae"}
GRID_SETTINGS = ["GRID_LR", "GRID_LORA_R", "GRID_LORA_ALPHA", "GRID_MLP_LAYERS"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep_dir", help="folder of the run folders (SWEEP_DIR of run_hparam_search.sh)")
    p.add_argument("--out_dir", help="where summary.csv and the plots go (default: SWEEP_DIR/analysis)")
    p.add_argument("--sort_by", default="auto", choices=["auto"] + sorted(SORT_COLUMNS),
                   help="ranking metric (lower is better); auto: the validation count MAE where runs recorded one "
                        "(--eval_count_images), else the validation loss")
    p.add_argument("--top", type=int, default=0, help="rows in the printed table (0 = all); top 5 get learning curves")
    p.add_argument("--evaluate_best", action="store_true",
                   help="run the printed test command on the best run; its metrics go to OUT_DIR/best_test_metrics.json")
    p.add_argument("--evaluate_args", default="",
                   help="more evaluate_vlm_regression.py arguments for the best run's command, e.g. '--num_images 50'")
    p.add_argument("--wandb_project", help="read the runs from this W&B project instead of --sweep_dir")
    p.add_argument("--wandb_entity", help="W&B entity (default: your default entity)")
    p.add_argument("--wandb_group", help="only runs of this group (run_hparam_search.sh: the sweep folder's name)")
    args = p.parse_args(argv)
    if not args.sweep_dir and not args.wandb_project:
        p.error("give --sweep_dir or --wandb_project")
    if args.wandb_project and not (args.out_dir or args.sweep_dir):
        p.error("--wandb_project needs --out_dir (or --sweep_dir) for the outputs")
    args.out_dir = args.out_dir or os.path.join(args.sweep_dir, "analysis")
    return args


# -----------------------------------------------------------------------------
# Reading runs


def grid_table(sweep_dir):
    """{run name: {task, lr, lora_r, lora_alpha, mlp_layers}} from `run_hparam_search.sh --list`, the one definition
    of the grid, with the grid settings the sweep recorded in sweep.env. {} when it cannot be run."""
    env = {k: v for k, v in os.environ.items() if k not in GRID_SETTINGS}
    try:
        with open(os.path.join(sweep_dir, "sweep.env")) as f:
            for line in f:
                key, _, value = line.rstrip("\n").partition("=")
                if key in GRID_SETTINGS:
                    env[key] = value
    except OSError:
        env = dict(os.environ)
    try:
        out = subprocess.run(["bash", os.path.join(HERE, "run_hparam_search.sh"), "--list"], env=env,
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    table = {}
    for line in out.splitlines()[1:]:
        task, name, lr, r, alpha, mlp = line.split("\t")
        table[name] = {"task": int(task), "lr": float(lr), "lora_r": int(r), "lora_alpha": int(alpha),
                       "mlp_layers": int(mlp)}
    return table


def read_json(path):
    """(object, None), or (None, why not) for a missing or unreadable file."""
    try:
        with open(path) as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as e:
        return None, f"unreadable ({type(e).__name__}: {e})"


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_epochs(path):
    """The epoch_end rows of metrics.jsonl (last one per epoch: a resumed run may repeat one) and the bad-line count."""
    rows, bad = {}, 0
    try:
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    bad += 1  # e.g. a line cut short by a killed job
                    continue
                if isinstance(row, dict) and row.get("epoch_end") and "epoch" in row:
                    rows[row["epoch"]] = row
    except OSError:
        pass
    return [rows[e] for e in sorted(rows)], bad


def new_run(name, source):
    return {"run": name, "task": None, **{h: None for h in HPARAMS}, "status": None, "best_val_loss": None,
            "best_epoch": None, "final_val_loss": None, "pixel_error": None, "count_mae": None,
            "baseline_val_loss": None, "loss_vs_baseline": None, "epochs_completed": None, "wall_time_s": None,
            "problem": "", "source": source, "curve": []}


def load_run(run_dir, grid=None):
    """One run folder -> a flat record (see new_run) with its learning curve; never raises on bad files."""
    name = os.path.basename(os.path.normpath(run_dir))
    rec = new_run(name, run_dir)
    problems = []
    config, why = read_json(os.path.join(run_dir, "config.json"))
    if isinstance(config, dict) and all(finite(config.get(h)) for h in HPARAMS):
        rec.update({h: config[h] for h in HPARAMS})
    elif grid and name in grid:  # config.json missing or damaged: the run folder's name says the config
        rec.update({h: grid[name][h] for h in HPARAMS})
        problems.append(f"config.json {why or 'lacks hyperparameters'}")
    else:
        problems.append(f"config.json {why or 'lacks hyperparameters'}")
    if grid and name in grid:
        rec["task"] = grid[name]["task"]

    epochs, bad = read_epochs(os.path.join(run_dir, "metrics.jsonl"))
    if bad:
        problems.append(f"{bad} unreadable line(s) in metrics.jsonl")
    rec["curve"] = [(r["epoch"], r.get("train/loss"), r.get("val/loss")) for r in epochs]
    results, why = read_json(os.path.join(run_dir, "results.json"))
    if results is None and why != "missing":
        rec["status"] = "corrupt"
        problems.append(f"results.json {why}")
    elif results is None:
        rec["status"] = "incomplete"
        problems.append(f"no results.json (running or stopped; {len(epochs)} epoch(s) logged)")
    elif not isinstance(results, dict):
        rec["status"] = "corrupt"
        problems.append("results.json is not an object")
    else:
        status = results.get("status")
        for k in ("best_val_loss", "best_epoch", "final_val_loss", "baseline_val_loss", "epochs_completed",
                  "wall_time_s"):
            rec[k] = results.get(k) if finite(results.get(k)) else None
        mae = (results.get("count_eval") or {}).get("mae") if isinstance(results.get("count_eval"), dict) else None
        rec["count_mae"] = mae if finite(mae) else None
        if status == "completed" and rec["best_val_loss"] is not None:
            rec["status"] = "completed"
        elif status == "completed":
            rec["status"] = "corrupt"
            problems.append(f"completed without a finite best_val_loss ({results.get('best_val_loss')!r})")
        elif status == "failed":
            rec["status"] = "failed"
            problems.append(str(results.get("error") or "failed"))
        elif status == "preempted":
            rec["status"] = "incomplete"
            problems.append(f"preempted at step {results.get('step')}, not resumed yet")
        else:
            rec["status"] = "corrupt"
            problems.append(f"results.json status {status!r}")
    if rec["status"] == "completed" and None in (rec[h] for h in HPARAMS):
        rec["status"] = "corrupt"  # a result we cannot place on the grid
    best = [r for r in epochs if r["epoch"] == rec["best_epoch"]]
    if best and finite(best[-1].get("val/pixel_error")):
        rec["pixel_error"] = best[-1]["val/pixel_error"]
    if rec["best_val_loss"] is not None and rec["baseline_val_loss"]:
        rec["loss_vs_baseline"] = rec["best_val_loss"] / rec["baseline_val_loss"]
    rec["problem"] = "; ".join(problems)
    return rec


def load_sweep(sweep_dir):
    """(records of every run folder, grid table). A folder counts as a run if it has any training output or a grid
    run name."""
    grid = grid_table(sweep_dir)
    runs = []
    for entry in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, entry)
        if entry.startswith(".") or entry == "analysis" or not os.path.isdir(path):
            continue
        markers = ("config.json", "results.json", "metrics.jsonl", "checkpoints")
        if entry in grid or any(os.path.exists(os.path.join(path, m)) for m in markers):
            runs.append(load_run(path, grid))
    return runs, grid


def load_wandb(project, entity=None, group=None, api=None):
    """The same records from the W&B API: config = run config, results = run summary, curve = epoch-end rows."""
    if api is None:
        import wandb

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    runs = []
    for run in api.runs(path, filters={"group": group} if group else None):
        rec = new_run(run.name, f"wandb:{run.path if isinstance(run.path, str) else '/'.join(run.path)}")
        config, summary = dict(run.config), dict(run.summary)
        if all(finite(config.get(h)) for h in HPARAMS):
            rec.update({h: config[h] for h in HPARAMS})
        for k in ("best_val_loss", "best_epoch", "final_val_loss", "baseline_val_loss", "epochs_completed",
                  "wall_time_s"):
            rec[k] = summary.get(k) if finite(summary.get(k)) else None
        rows = [r for r in run.scan_history(keys=["epoch", "train/loss", "val/loss", "val/pixel_error"])]
        rec["curve"] = [(r["epoch"], r.get("train/loss"), r.get("val/loss")) for r in rows]
        best = [r for r in rows if r["epoch"] == rec["best_epoch"]]
        if best and finite(best[-1].get("val/pixel_error")):
            rec["pixel_error"] = best[-1]["val/pixel_error"]
        status = summary.get("status")
        if status == "completed" and rec["best_val_loss"] is not None and rec["lr"] is not None:
            rec["status"] = "completed"
        elif status == "failed" or run.state in ("failed", "crashed"):
            rec["status"], rec["problem"] = "failed", f"W&B state {run.state}"
        else:
            rec["status"], rec["problem"] = "incomplete", f"W&B state {run.state}, summary status {status!r}"
        if rec["best_val_loss"] is not None and rec["baseline_val_loss"]:
            rec["loss_vs_baseline"] = rec["best_val_loss"] / rec["baseline_val_loss"]
        runs.append(rec)
    return runs


# -----------------------------------------------------------------------------
# Ranking and the table


def resolve_sort(runs, sort_by):
    """"auto" -> count_mae when a completed run recorded one (the sweep's job is the best counter, not the best
    regressor), else val_loss; any other choice as given."""
    if sort_by != "auto":
        return sort_by
    return "count_mae" if any(r["status"] == "completed" and finite(r.get("count_mae")) for r in runs) else "val_loss"


def rank_runs(runs, sort_by="auto"):
    """DataFrame of all runs: completed ones ranked by the metric (missing values last), then the rest."""
    sort_by = resolve_sort(runs, sort_by)
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "curve"} for r in runs],
                      columns=[k for k in new_run("", "") if k != "curve"])
    done = df[df.status == "completed"].copy()
    done = done.sort_values([SORT_COLUMNS[sort_by], "best_val_loss", "run"], na_position="last", kind="stable")
    done.insert(0, "rank", range(1, len(done) + 1))
    rest = df[df.status != "completed"].sort_values(["status", "run"], kind="stable")
    out = pd.concat([done, rest], ignore_index=True)
    for c in ("rank", "task", "lora_r", "lora_alpha", "mlp_layers", "best_epoch", "epochs_completed"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("Int64")
    for c in ("lr", "best_val_loss", "final_val_loss", "pixel_error", "count_mae", "baseline_val_loss",
              "loss_vs_baseline", "wall_time_s"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    return out


def fmt(x, spec):
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if spec == "lr":  # as written in the grid and the run names: 1e-3, 5e-5
        return np.format_float_scientific(x, trim="-", exp_digits=1)
    return format(int(x) if spec == "d" else x, spec)


def markdown_table(ranked, top=0):
    done = ranked[ranked.status == "completed"]
    if top:
        done = done.head(top)
    cols = [("rank", "d"), ("run", "s"), ("lr", "lr"), ("lora_r", "d"), ("lora_alpha", "d"), ("mlp_layers", "d"),
            ("best_val_loss", ".4f"), ("best_epoch", "d"), ("loss_vs_baseline", ".3f"), ("pixel_error", ".1f")]
    if done.count_mae.notna().any():
        cols.append(("count_mae", ".3f"))
    cols += [("epochs_completed", "d"), ("wall_time_s", ".0f")]
    head = {"lora_r": "r", "lora_alpha": "alpha", "mlp_layers": "mlp", "best_val_loss": "best val loss",
            "best_epoch": "best epoch", "loss_vs_baseline": "/ baseline", "pixel_error": "pixel error",
            "count_mae": "count MAE", "epochs_completed": "epochs", "wall_time_s": "time (s)"}
    lines = ["| " + " | ".join(head.get(c, c) for c, _ in cols) + " |",
             "|" + "|".join("---:" if s != "s" else "---" for _, s in cols) + "|"]
    for row in done.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(getattr(row, c), spec) for c, spec in cols) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Atomic outputs and plots


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    utils.replace_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def baseline_line(ax, df):
    base = df.baseline_val_loss.dropna()
    if len(base):
        ax.axhline(base.median(), color="grey", ls=":", lw=1, label="baseline (mean target)")


def plot_lr(df, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (r, g) in enumerate(df.groupby("lora_r")):
        color = f"C{i}"
        ax.scatter(g.lr, g.best_val_loss, color=color, alpha=0.35, s=18)
        best = g.groupby("lr").best_val_loss.min()
        ax.plot(best.index, best.values, "o-", color=color, label=f"r={r}")
    baseline_line(ax, df)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="best val loss", title="val loss vs lr (line: best over alpha, MLP layers)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_heatmap(df, path):
    import matplotlib.pyplot as plt

    table = df.pivot_table(index="lora_r", columns="lora_alpha", values="best_val_loss", aggfunc="min")
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * table.shape[1], 1.4 + 0.9 * table.shape[0]))
    im = ax.imshow(table.values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(table.shape[1]), [str(c) for c in table.columns])
    ax.set_yticks(range(table.shape[0]), [str(i) for i in table.index])
    lo, hi = np.nanmin(table.values), np.nanmax(table.values)
    for (i, j), v in pd.DataFrame(table.values).stack().items():  # dark text on the light (low-loss) cells
        dark = hi == lo or (v - lo) / (hi - lo) < 0.5
        ax.text(j, i, f"{v:.4f}", ha="center", va="center", color="black" if dark else "white", fontsize=9)
    ax.set(xlabel="LoRA alpha", ylabel="LoRA rank r", title="best val loss (min over lr, MLP layers)")
    fig.colorbar(im, ax=ax)
    save_figure(fig, path)


def plot_mlp(df, path):
    import matplotlib.pyplot as plt

    depths = sorted(df.mlp_layers.unique())
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot([df[df.mlp_layers == d].best_val_loss for d in depths], positions=range(len(depths)), widths=0.5)
    for i, (lr, g) in enumerate(df.groupby("lr")):  # the same lr across depths: depth's effect apart from lr's
        best = g.groupby("mlp_layers").best_val_loss.min()
        ax.plot([depths.index(d) for d in best.index], best.values, ".-", color=f"C{i}", alpha=0.8,
                label=f"lr {fmt(lr, 'lr')} (best)")
    baseline_line(ax, df)
    ax.set_xticks(range(len(depths)), [str(int(d)) for d in depths])
    ax.set(xlabel="MLP layers per head", ylabel="best val loss", title="effect of head depth (box: all runs)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_curves(runs, ranked, path, k=5):
    import matplotlib.pyplot as plt

    by_name = {r["run"]: r for r in runs}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(ranked[ranked.status == "completed"].run.head(k)):
        curve = by_name[name]["curve"]
        epochs = [e for e, _, _ in curve]
        ax.plot(epochs, [v for _, _, v in curve], "o-", color=f"C{i}", label=f"{name} (val)")
        ax.plot(epochs, [t for _, t, _ in curve], "--", color=f"C{i}", alpha=0.6)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="epoch", ylabel="loss", title=f"top {k}: val (solid) and train (dashed) loss")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_marginals(df, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(HPARAMS), figsize=(3.2 * len(HPARAMS), 3.4), sharey=True)
    for ax, h in zip(axes, HPARAMS):
        g = df.groupby(h).best_val_loss.agg(["mean", "std", "min", "count"]).sort_index()
        x = range(len(g))
        ax.errorbar(x, g["mean"], yerr=g["std"].fillna(0), fmt="o-", capsize=4, label="mean +- std")
        ax.plot(x, g["min"], "v", color="C2", label="min")
        ax.set_xticks(list(x), [fmt(v, "lr" if h == "lr" else "d") for v in g.index])
        ax.set(xlabel=LABELS[h], title=f"n = {', '.join(str(c) for c in g['count'])}")
        baseline_line(ax, df)
    axes[0].set_ylabel("best val loss")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def write_outputs(runs, ranked, out_dir, table):
    """summary.csv, summary.md and the plots; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    csv_path = os.path.join(out_dir, "summary.csv")
    utils.replace_atomic(csv_path, lambda tmp: ranked.to_csv(tmp, index=False))
    md_path = os.path.join(out_dir, "summary.md")
    utils.write_text_atomic(md_path, table + "\n")
    written += [csv_path, md_path]
    done = ranked[ranked.status == "completed"]
    if done.empty:
        return written
    plots = [("val_loss_vs_lr.png", lambda p: plot_lr(done, p)),
             ("rank_alpha_heatmap.png", lambda p: plot_heatmap(done, p)),
             ("mlp_depth.png", lambda p: plot_mlp(done, p)),
             ("learning_curves_top.png", lambda p: plot_curves(runs, ranked, p)),
             ("marginal_means.png", lambda p: plot_marginals(done, p))]
    for name, plot in plots:
        path = os.path.join(out_dir, name)
        plot(path)
        written.append(path)
    return written


# -----------------------------------------------------------------------------
# From the best run to its test score


def run_checkpoint(run_dir):
    """A run's checkpoints/best, else checkpoints/last (evaluate_vlm_regression.resolve_checkpoint's rule), or None."""
    for name in ("best", "last"):
        path = os.path.join(run_dir, "checkpoints", name)
        if os.path.isfile(os.path.join(path, "regression_config.json")):
            return path
    return None


def best_run_command(ranked, out_dir, extra_args=""):
    """(run name, checkpoint, the evaluate_vlm_regression.py argv that scores it on the test split) of the best
    completed run, or (run name or None, None, why not)."""
    done = ranked[ranked.status == "completed"]
    if done.empty:
        return None, None, "no completed run"
    best = done.iloc[0]
    if best.source.startswith("wandb:"):
        return best.run, None, "the runs were read from W&B: no local checkpoint (analyse the sweep folder)"
    ckpt = run_checkpoint(best.source)
    if ckpt is None:
        return best.run, None, f"{best.source} has no checkpoints/best or checkpoints/last"
    cmd = [sys.executable, os.path.join(HERE, "evaluate_vlm_regression.py"), "--checkpoint", ckpt, "--split", "test",
           "--output_dir", os.path.join(out_dir, "best_test"), *shlex.split(extra_args)]
    return best.run, ckpt, cmd


def evaluate_best(run, ckpt, cmd, out_dir):
    """Run the best run's test command; write and return {run, checkpoint, command, metrics}."""
    print(f"\nEvaluating {run} on the test split ...", flush=True)
    if subprocess.run(cmd).returncode:
        sys.exit(f"error: the test evaluation of {run} failed: {shlex.join(cmd)}")
    with open(os.path.join(cmd[cmd.index("--output_dir") + 1], "metrics.json")) as f:
        metrics = json.load(f)
    out = {"run": run, "checkpoint": os.path.realpath(ckpt), "command": shlex.join(cmd), "metrics": metrics}
    path = os.path.join(out_dir, "best_test_metrics.json")
    utils.write_json_atomic(path, out)
    print(f"{run} on the test split: count MAE {metrics['mae']:.3f}, RMSE {metrics['rmse']:.3f} over "
          f"{metrics['num_images']} images; wrote {path}")
    return out


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    grid = {}
    if args.wandb_project:
        runs = load_wandb(args.wandb_project, args.wandb_entity, args.wandb_group)
        where = f"W&B project {args.wandb_project}" + (f", group {args.wandb_group}" if args.wandb_group else "")
    else:
        if not os.path.isdir(args.sweep_dir):
            sys.exit(f"error: no sweep folder at {args.sweep_dir}")
        runs, grid = load_sweep(args.sweep_dir)
        where = args.sweep_dir
    sort_by = resolve_sort(runs, args.sort_by)
    ranked = rank_runs(runs, sort_by)
    done = ranked[ranked.status == "completed"]
    print(f"{where}: {len(runs)} runs, {len(done)} completed, ranked by {sort_by} (lower is better)\n")
    table = markdown_table(ranked, args.top)
    print(table if len(done) else "(no completed run yet)")

    noted = done[done.problem != ""]
    if len(noted):
        print(f"\nRanked, with problems ({len(noted)}):")
        for row in noted.itertuples(index=False):
            print(f"  {row.run}: {row.problem}")
    others = ranked[ranked.status != "completed"]
    if len(others):
        print(f"\nNot ranked ({len(others)}):")
        for row in others.itertuples(index=False):
            print(f"  {row.status:10s} {row.run}: {row.problem}")
    missing = sorted((cfg["task"], name) for name, cfg in grid.items() if name not in set(ranked.run))
    if missing:
        ids = ", ".join(str(t) for t, _ in missing[:20]) + (", ..." if len(missing) > 20 else "")
        print(f"\nNot started ({len(missing)} of {len(grid)} grid configs): tasks {ids}")
    if len(done):
        print("\nMean best val loss per value (n runs):")
        for h in HPARAMS:
            g = done.groupby(h).best_val_loss.agg(["mean", "count"])
            print(f"  {LABELS[h]:14s} " + "   ".join(f"{fmt(v, 'lr' if h == 'lr' else 'd')}: {m:.4f} ({int(c)})"
                                                      for v, (m, c) in g.iterrows()))

    written = write_outputs(runs, ranked, args.out_dir, table)
    print(f"\nwrote {', '.join(os.path.basename(p) for p in written)} to {args.out_dir}")
    run, ckpt, cmd = best_run_command(ranked, args.out_dir, args.evaluate_args)
    if ckpt is None:
        print(f"\nBest run{' ' + run if run else ''}: no test command ({cmd})")
    else:
        print(f"\nBest run {run}: checkpoint {ckpt}\nIts test score: {shlex.join(cmd)}")
        if args.evaluate_best:
            evaluate_best(run, ckpt, cmd, args.out_dir)
    if args.evaluate_best and ckpt is None:
        sys.exit(f"error: --evaluate_best: {cmd}")
    return ranked


if __name__ == "__main__":
    main()
