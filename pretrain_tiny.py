"""
Pretrain the whole tiny Qwen3-VL (vision tower, merger, language model, embeddings) on a generic synthetic pointing
task and save it as a base that the demo then LoRA-tunes like a real checkpoint (`--model_name tiny`: tiny_base/).

    python pretrain_tiny.py --out /tmp/stage1 --steps 2350 --stop_after 2174 --unmarked_fraction 0 \
        --extreme_fraction 0 --plain_fraction 0.5 --curriculum_steps 1500 --warmup 200 --eval_every 200 --threads 1
    python pretrain_tiny.py --out /tmp/stage2 --init_dir /tmp/stage1 --init_std 0 --steps 4000 --lr 5e-4 \
        --warmup 200 --curriculum_steps 0 --threads 1
    M="--init_std 0 --curriculum_steps 0 --coord_loss l1 --plain_fraction 1 --max_distractors 2 \
        --unmarked_fraction 0.1 --extreme_fraction 0.3 --extreme_unmarked_fraction 0.5"
    python pretrain_tiny.py --out /tmp/stage3 --init_dir /tmp/stage2 $M --steps 3000 --lr 5e-4 --warmup 200 \
        --threads 2
    python pretrain_tiny.py --out tiny_base --init_dir /tmp/stage3 $M --steps 4000 --lr 3e-4 --warmup 100 \
        --threads 1            # the shipped base: tiny_base/recipe.json has all four (its `rebuild`, exactly)
    python pretrain_tiny.py --out /tmp/check --steps 20 --batch_size 2 --eval_every 10 --val_images 8   # smoke

The tasks (each image 224 px, the demo's size, 1-5 shapes of radius 12-24 px on a plain or varied background):
- named: "Point at the red circle.": one object of the named type among 0-4 of other types;
- unmarked (--unmarked_fraction): "Point at the object that has no white label.": the others carry
  utils.mark_objects' numbered discs (no counting order is involved);
- extreme (--extreme_fraction): "Point at the topmost object." (or bottommost, leftmost, rightmost), ahead of the
  next by >= EXTREME_MARGIN px: selection by position.
- extreme_unmarked (--extreme_unmarked_fraction): "Point at the leftmost object that has no white label." (or
  topmost, ...): some of the others carry labels, drawn off-centre as a model's own marks would be, and the target is
  the extreme one among the unlabelled (ahead of the next unlabelled by >= EXTREME_MARGIN px).
None of them is the demo's task (count one type in an order, say when done). The heads read the hidden states at
<x> and <y>, as the counting model's do; they are thrown away. --curriculum_steps ramps from one object on plain
grey to the full mix. From tiny_model's random init, the full mix at once stayed at its baseline for 1,000 steps
(a plateau) while "named" alone left it within 500: the shipped base is named first, then the mix, then two
stages of the mix with L1 on the demo's range (plain grey, 1-3 objects), weighted to choosing by position.

Deterministic given --seed on a given device type and --threads: batch `step` is drawn from
np.random.default_rng([seed, step]), the model starts from tiny_model's cached random init redrawn at --init_std
(or, with --init_std 0, from --init_dir's weights as they are), and torch runs with deterministic algorithms. With
--steps 0 and --max_minutes, the number of steps is fixed from the measured speed of the first steps (during
warm-up, whose learning rates do not depend on it) and recorded in recipe.json; a run that --max_minutes cut is
replayed with --stop_after. recipe.json's `rebuild` says which.

Imports need no wandb or qwen-vl-utils; prompt.py imports inflect (building tiny_model's tokenizer corpus needs it).

The output folder: model.safetensors + config.json (the Qwen3VLForConditionalGeneration only), the processor (with
<x>/<y> in its tokenizer), and recipe.json (every setting, versions, device, wall time, the validation curve in
pixels and within 8 px, the weights' sha256, and for a second stage the first stage's recipe).
"""

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import time

# before torch initialises CUDA: cuBLAS is deterministic only with a fixed workspace
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn as nn

from model_vlm_regression import COORD_LOSSES, init_token_rows, load_processor, make_head, regression_loss
from prompt import X_TOKEN, Y_TOKEN
from synthetic_data import COLOURS, SHAPES, render_synthetic
from tiny_model import TINY_INIT_STD, TINY_POS_EMBED_STD, TINY_VERSION, rescale_random_init, tiny_model_dir
from utils import denormalize_points, mark_objects, mark_radius, normalize_points

IMAGE_SIZE = 224  # the demo's image size: 7x7 merged visual tokens
TYPES = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS)  # singular names: "red circle"
SYSTEM_TEXT = "You are a vision assistant that points at objects in images."
TASKS = ("named", "unmarked", "extreme", "extreme_unmarked")
EXTREMES = {"topmost": (1, -1), "bottommost": (1, 1), "leftmost": (0, -1), "rightmost": (0, 1)}  # (axis, sign)
EXTREME_MARGIN = 10  # px: the extreme object beats the runner-up along its axis by at least this much
LABEL_JITTER = 0.3  # extreme_unmarked: a label lands off its object's centre by N(0, this x the object's radius) px
VAL_KEY = 1_000_003  # validation images come from default_rng([seed, VAL_KEY, i]); training from [seed, step]

# -----------------------------------------------------------------------------
# Data: one pointing sample, a batch per step


def pointing_layout(rng, task, background, max_distractors=4):
    """(layout for synthetic_data.render_synthetic, target index, instruction text). 'named': one object of the
    named type and 0-4 distractors of other types. 'unmarked': 1-5 objects of any types; all but the target get
    numbered labels, and the prompt asks for the one without. 'extreme': 1-5 objects of any types, and the prompt
    asks for the topmost, bottommost, leftmost or rightmost (ahead of the next by >= EXTREME_MARGIN px): selection
    by position, which counting in an order needs."""
    s = IMAGE_SIZE
    n = 1 + int(rng.integers(0, max_distractors + 1))
    if task in ("extreme", "extreme_unmarked"):
        direction = list(EXTREMES)[int(rng.integers(len(EXTREMES)))]
        axis, sign = EXTREMES[direction]
    target = TYPES[int(rng.integers(len(TYPES)))]
    if task == "named":
        others = [t for t in TYPES if t != target]
        types = [target] + [others[i] for i in rng.integers(0, len(others), n - 1)]
    else:
        types = [target] + [TYPES[i] for i in rng.integers(0, len(TYPES), n - 1)]
    if background == "plain":
        bg = dict(base=128, tint=[0, 0, 0], angle=0.0, amplitude=0.0)
    else:
        bg = dict(base=int(rng.integers(70, 200)), tint=rng.integers(-25, 26, 3).tolist(),
                  angle=float(rng.uniform(0, 2 * np.pi)), amplitude=float(rng.uniform(0, 40)))
    placed = []
    for t in types:
        r = float(rng.uniform(12, 24))
        for _try in range(30):
            c = rng.uniform(r + 1, s - r - 1, 2)
            if all((c[0] - o[1]) ** 2 + (c[1] - o[2]) ** 2 > (r + o[3] + 3) ** 2 for o in placed):
                # render_synthetic takes the plural type names of synthetic_data ("red circles")
                placed.append((t + "s", float(c[0]), float(c[1]), r, float(rng.uniform(0, 2 * np.pi))))
                break
        if not placed:  # the target always fits in an empty image; this guards the invariant
            raise RuntimeError("could not place the target")
    labelled = set()  # indices into `placed` of objects that carry a label
    if task == "extreme_unmarked":  # a random share of the objects carries labels; the target is among the rest
        labelled = {i for i in range(len(placed)) if rng.random() < rng.uniform(0, 1)}
        if len(labelled) == len(placed):
            labelled.discard(int(rng.integers(len(placed))))
    if task in ("extreme", "extreme_unmarked"):
        # the target: the most extreme unlabelled object; any other unlabelled within the margin of it is left out
        key = [sign * o[1 + axis] for o in placed]
        free = [i for i in range(len(placed)) if i not in labelled]
        best = max(free, key=lambda i: key[i])
        keep = [i for i in range(len(placed)) if i != best and (i in labelled or key[best] - key[i] >= EXTREME_MARGIN)]
        labelled = {keep.index(i) + 1 for i in labelled if i in keep}
        placed = [placed[best]] + [placed[i] for i in keep]
    elif task == "unmarked":
        labelled = set(range(1, len(placed)))
    order = rng.permutation(len(placed))  # the target is not always drawn first (it would be under the others)
    objects = [placed[i] for i in order]
    target_index = int(np.argwhere(order == 0)[0, 0])
    labelled = sorted(int(np.argwhere(order == i)[0, 0]) for i in labelled)
    if task == "named":
        text = f"Point at the {target}."
    elif task == "extreme":
        text = f"Point at the {direction} object."
    elif task == "extreme_unmarked":
        text = f"Point at the {direction} object that has no white label."
    else:
        text = "Point at the object that has no white label."
    return dict(size=s, background=bg, objects=objects), target_index, text, labelled


def pointing_sample(key, task, background, max_distractors=4):
    """(PIL image, user text, target (2,) in [-1, 1]) from default_rng(key)."""
    rng = np.random.default_rng(key)
    layout, ti, text, labelled = pointing_layout(rng, task, background, max_distractors)
    image = render_synthetic(layout)
    centres = np.array([[o[1], o[2]] for o in layout["objects"]], np.float32)
    if labelled:  # 'unmarked' labels sit on the centres; 'extreme_unmarked' ones land off-centre
        at = centres[labelled]
        if task == "extreme_unmarked":
            radii = np.array([layout["objects"][i][3] for i in labelled], np.float32)[:, None]
            at = np.clip(at + rng.normal(0, 1, at.shape).astype(np.float32) * LABEL_JITTER * radii, 0, IMAGE_SIZE - 1)
        image = mark_objects(image, at[rng.permutation(len(labelled))], start_index=1)
    return image, text, normalize_points(centres[ti], IMAGE_SIZE, IMAGE_SIZE)[0]


def user_text(instruction):
    return (f"{instruction}\n\nOutput x, y as normalized coordinates in [-1, 1].\n\n"
            f"Location: {X_TOKEN} {Y_TOKEN}")


def encode(processor, images, instructions):
    """Model inputs for images and instructions, the same chat layout as prompt.build_messages (right padding)."""
    texts = [processor.apply_chat_template([
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_TEXT}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(t)}]}], tokenize=False)
        for t in instructions]
    batch = processor(text=texts, images=list(images), padding=True, return_tensors="pt")
    return {k: v for k, v in batch.items() if torch.is_tensor(v)}


def sample_spec(key, unmarked_fraction, plain_fraction=0.5, extreme_fraction=0.0, extreme_unmarked_fraction=0.0):
    """(task, background) of the sample drawn from `key`: its own stream, so the mix does not shift the images."""
    rng = np.random.default_rng(list(key) + [7])
    u, task = rng.random(), "named"
    for name, share in (("unmarked", unmarked_fraction), ("extreme", extreme_fraction),
                        ("extreme_unmarked", extreme_unmarked_fraction)):
        if u < share:
            task = name
            break
        u -= share
    return task, ("plain" if rng.random() < plain_fraction else "varied")


class PointingBatches(torch.utils.data.Dataset):
    """Item `step` is the whole training batch of that step (so DataLoader workers cannot change the order)."""

    def __init__(self, processor, seed, batch_size, unmarked_fraction, plain_fraction=0.5, max_distractors=4,
                 curriculum_steps=0, extreme_fraction=0.0, extreme_unmarked_fraction=0.0):
        self.processor, self.seed, self.batch_size = processor, seed, batch_size
        self.unmarked_fraction, self.plain_fraction, self.max_distractors = unmarked_fraction, plain_fraction, max_distractors
        self.curriculum_steps, self.extreme_fraction = curriculum_steps, extreme_fraction
        self.extreme_unmarked_fraction = extreme_unmarked_fraction

    def difficulty(self, step):
        """(plain_fraction, max_distractors) at `step`: during the curriculum, from one object on plain grey (learned
        within 200 CPU steps) up to the full task (which did not leave its baseline in 2,000 steps from scratch)."""
        if step >= self.curriculum_steps:
            return self.plain_fraction, self.max_distractors
        f = step / self.curriculum_steps
        return 1 - (1 - self.plain_fraction) * f, int(f * (self.max_distractors + 1))

    def __len__(self):
        return 1 << 30

    def __getitem__(self, step):
        images, texts, targets = [], [], []
        for i in range(self.batch_size):
            key = [self.seed, step, i]
            plain_fraction, max_distractors = self.difficulty(step)
            task, background = sample_spec(key, self.unmarked_fraction, plain_fraction, self.extreme_fraction,
                                           self.extreme_unmarked_fraction)
            image, text, target = pointing_sample(key, task, background, max_distractors)
            images.append(image)
            texts.append(text)
            targets.append(target)
        return encode(self.processor, images, texts), torch.from_numpy(np.stack(targets))


def validation_set(processor, seed, n, task, batch_size=50, plain_only=False, max_distractors=4):
    """Fixed held-out batches of one task (half plain, half varied backgrounds; plain_only: all plain)."""
    out = []
    for start in range(0, n, batch_size):
        samples = [pointing_sample([seed, VAL_KEY, TASKS.index(task), i], task,
                                   "plain" if plain_only else ("plain", "varied")[i % 2], max_distractors)
                   for i in range(start, min(n, start + batch_size))]
        out.append((encode(processor, [s[0] for s in samples], [s[1] for s in samples]),
                    torch.from_numpy(np.stack([s[2] for s in samples]))))
    return out


def _worker_init(_):
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


# -----------------------------------------------------------------------------
# Model: the base plus two throwaway heads reading <x> and <y> (VLMRegressionModel's forward, without peft)


class PointingModel(nn.Module):
    def __init__(self, base, x_token_id, y_token_id):
        super().__init__()
        self.base = base
        hidden = base.config.text_config.hidden_size
        self.x_head, self.y_head = make_head(hidden), make_head(hidden)
        self.x_token_id, self.y_token_id = x_token_id, y_token_id

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, **_ignored):
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        x_pos = (input_ids == self.x_token_id).int().argmax(1)
        y_pos = (input_ids == self.y_token_id).int().argmax(1)
        out = self.base.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                              image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=False)
        hidden = out.last_hidden_state
        return torch.cat((self.x_head(hidden[rows, x_pos]), self.y_head(hidden[rows, y_pos])), dim=-1)


def build(args, device):
    """(PointingModel, processor): tiny_model's cached random init redrawn with --init_std, or (--init_std 0) the
    weights of --init_dir as they are: a second stage continuing a pretrained base (fresh heads)."""
    from transformers import Qwen3VLForConditionalGeneration

    init_dir = args.init_dir or tiny_model_dir()
    processor = load_processor(init_dir)
    ids = processor.tokenizer.convert_tokens_to_ids([X_TOKEN, Y_TOKEN])
    base = Qwen3VLForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32, attn_implementation="sdpa")
    if args.vision_config:  # another vision tower: a fresh model of the changed architecture, drawn from the seed
        from transformers import Qwen3VLConfig

        cfg = base.config.to_dict()
        cfg["vision_config"].update(json.loads(args.vision_config))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            base = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg))
        rescale_random_init(base, args.init_std, args.init_pos_std, seed=args.seed)
        vc = base.config.vision_config
        for proc in (processor.image_processor, processor.video_processor):
            proc.patch_size, proc.merge_size = vc.patch_size, vc.spatial_merge_size
    elif args.init_std > 0 and (args.init_std, args.init_pos_std) != (TINY_INIT_STD, TINY_POS_EMBED_STD):
        rescale_random_init(base, args.init_std, args.init_pos_std, seed=args.seed)
    base.config.use_cache = False
    assert max(ids) < base.get_input_embeddings().weight.shape[0], "the tiny matrix has spare rows for <x>/<y>"
    if processor.coordinate_tokens_added or args.init_std > 0:  # a continued base keeps its trained <x>/<y> rows
        init_token_rows(base, ids)
    torch.manual_seed(args.seed)  # the heads' init
    model = PointingModel(base, *ids).to(device)
    return model, processor


# -----------------------------------------------------------------------------
# Training


def lr_at(step, args, total):
    """Linear warm-up to --lr over --warmup steps, then cosine to --lr * --min_lr_ratio at `total`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


HIT_RADIUS = mark_radius(IMAGE_SIZE, IMAGE_SIZE)  # px (8): the radius the counting demo's F1 matches within


@torch.no_grad()
def pixel_distances(model, val, device):
    """Distances in pixels (224-px images) between predicted and true points over a validation set."""
    model.eval()
    dists = []
    for batch, target in val:
        pred = model(**to_device(batch, device)).float().cpu()
        d = denormalize_points(pred.numpy(), IMAGE_SIZE, IMAGE_SIZE) - denormalize_points(target.numpy(), IMAGE_SIZE, IMAGE_SIZE)
        dists.append(np.hypot(d[:, 0], d[:, 1]))
    model.train()
    return np.concatenate(dists)


def val_scores(model, val, device):
    """{"val_px_<task>": mean pixel distance, "val_hit_<task>": share within HIT_RADIUS} over the validation sets."""
    out = {}
    for t, v in val.items():
        d = pixel_distances(model, v, device)
        out.update({f"val_px_{t}": float(d.mean()), f"val_hit_{t}": float((d <= HIT_RADIUS).mean())})
    return out


def baseline_error(val):
    """Pixel error of always predicting the validation set's mean point."""
    t = denormalize_points(torch.cat([v[1] for v in val]).numpy(), IMAGE_SIZE, IMAGE_SIZE)
    d = t - t.mean(0)
    return float(np.hypot(d[:, 0], d[:, 1]).mean())


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions():
    import importlib.metadata as md

    return {name: md.version(name) for name in ("torch", "transformers", "tokenizers", "numpy", "opencv-python-headless", "pillow")
            if _installed(md, name)}


def _installed(md, name):
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def save_base(model, processor, out, recipe):
    """model.safetensors + config.json + processor files + recipe.json (with the weights' sha256) in `out`, flat."""
    os.makedirs(out, exist_ok=True)
    model.base.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    recipe["weights_file"] = "model.safetensors"
    recipe["weights_sha256"] = sha256_file(os.path.join(out, "model.safetensors"))
    recipe["files"] = sorted(os.listdir(out)) + ["recipe.json"]
    with open(os.path.join(out, "recipe.json"), "w") as f:
        json.dump(recipe, f, indent=2)
        f.write("\n")


def init_record(args):
    """Where the weights started: tiny_model's random init (redrawn at --init_std), or a base's folder with its own
    recipe (a second stage), so a rebuild can follow the chain."""
    if args.init_std > 0:
        return dict(source=f"tiny_model.build_tiny_model ({TINY_VERSION})", std=args.init_std, pos_std=args.init_pos_std)
    path = os.path.join(args.init_dir or tiny_model_dir(), "recipe.json")
    prior = json.load(open(path)) if os.path.exists(path) else None
    if prior:
        prior = {k: v for k, v in prior.items() if k not in ("curve", "config")}  # keep the chain readable
    return dict(source=f"the weights of {args.init_dir}, kept (--init_std 0)", recipe=prior)


def train(args):
    t_start = time.time()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 throughout: the tiny model is launch-bound, not FLOP-bound
        torch.backends.cudnn.allow_tf32 = False
        # flash / memory-efficient attention have non-deterministic backward passes; at ~200 tokens math costs little
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    model, processor = build(args, device)
    n_params = sum(p.numel() for p in model.base.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)

    tasks = ["named"] + [t for t in TASKS[1:] if getattr(args, f"{t}_fraction") > 0]
    # validation draws from the training images' range: all plain if training is, at most --max_distractors others
    val = {t: validation_set(processor, args.seed, args.val_images, t, plain_only=args.plain_fraction >= 1,
                             max_distractors=min(4, args.max_distractors)) for t in tasks}
    baseline = {t: baseline_error(v) for t, v in val.items()}
    t_val = time.time()
    curve = [dict(step=0, **val_scores(model, val, device))]
    val_seconds = time.time() - t_val
    print(f"tiny base: {n_params:,} parameters, device {device_name(device)}; baseline px "
          + ", ".join(f"{t} {b:.1f}" for t, b in baseline.items())
          + f"; step 0 val px {curve[0]['val_px_named']:.1f} ({val_seconds:.1f} s per validation)", flush=True)

    total = args.steps
    if total <= 0 and not args.max_minutes:
        raise SystemExit("--steps 0 (auto) needs --max_minutes")
    # steps timed to size an automatic run: the second half of the warm-up (whose lrs do not depend on the total),
    # after the DataLoader's prefetched batches are used up, so the timing is the steady, data-bound one
    calib = (args.warmup // 2, args.warmup)
    data = PointingBatches(processor, args.seed, args.batch_size, args.unmarked_fraction, args.plain_fraction,
                           args.max_distractors, args.curriculum_steps, args.extreme_fraction,
                           args.extreme_unmarked_fraction)
    workers = args.workers if args.workers >= 0 else (min(12, (os.cpu_count() or 2) - 2) if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, sampler=range(10 ** 9), num_workers=workers, worker_init_fn=_worker_init,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None, persistent_workers=False)
    model.train()
    step, stopped_early, losses, t_calib, t_train = 0, False, [], None, time.time()
    for batch, target in loader:
        if total > 0 and step >= total or args.stop_after and step >= args.stop_after:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args, total if total > 0 else 10 ** 9)
        pred = model(**to_device(batch, device))
        loss = regression_loss(pred, target.to(device), kind=args.coord_loss)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        losses.append(loss.detach())
        step += 1
        if step == calib[0]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_calib = time.time()
        if total <= 0 and step == calib[1] and calib[1] > calib[0]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_calib) / (calib[1] - calib[0])
            left = args.max_minutes * 60 * args.budget_fraction - (time.time() - t_start)
            # each validation costs val_seconds; one per eval_every steps, plus the final one
            total = calib[1] + int(left / (per_step + val_seconds / args.eval_every))
            total = max(args.warmup + 1, total // 50 * 50)
            print(f"auto steps: {per_step * 1000:.1f} ms/step -> --steps {total}", flush=True)
        if step % args.eval_every == 0 or step == total:
            row = dict(step=step, train_loss=float(torch.stack(losses).mean()), lr=opt.param_groups[0]["lr"],
                       elapsed_s=round(time.time() - t_start, 1))
            row.update(val_scores(model, val, device))
            losses = []
            curve.append(row)
            print(f"step {step:6d}/{total if total > 0 else '?'}  loss {row['train_loss']:.4f}  lr {row['lr']:.2e}  "
                  + "  ".join(f"val px {t} {row[f'val_px_{t}']:.1f} (within {HIT_RADIUS} px {row[f'val_hit_{t}']:.0%})"
                              for t in tasks)
                  + f"  {row['elapsed_s']:.0f} s", flush=True)
        if args.max_minutes and time.time() - t_start > args.max_minutes * 60 - max(5.0, 2 * val_seconds):
            stopped_early = step < total or total <= 0
            print(f"--max_minutes {args.max_minutes} reached at step {step}: stopping", flush=True)
            break
    train_seconds = time.time() - t_train
    last = curve[-1] if curve[-1]["step"] == step else val_scores(model, val, device)  # validated at this step already?
    final = {t: last[f"val_px_{t}"] for t in tasks}
    final_hit = {t: last[f"val_hit_{t}"] for t in tasks}
    print("final val px " + ", ".join(f"{t} {e:.1f} (baseline {baseline[t]:.1f}; within {HIT_RADIUS} px "
                                      f"{final_hit[t]:.0%})" for t, e in final.items()), flush=True)

    recipe = dict(
        what="tiny Qwen3-VL pretrained on synthetic pointing (pretrain_tiny.py); the heads are not saved",
        command="python pretrain_tiny.py " + " ".join(args.argv),
        settings={k: v for k, v in vars(args).items() if k not in ("out", "argv", "device")},
        rebuild=(f"python pretrain_tiny.py --steps {total}" + (f" --stop_after {step}" if step < total else "")
                 + " (+ the settings above, no --max_minutes), same device type and --threads"),
        steps_done=step, steps_planned=total, stopped_early=stopped_early,
        init=init_record(args),
        task=dict(prompt=user_text("Point at the <colour> <shape>."), system=SYSTEM_TEXT, image_size=IMAGE_SIZE,
                  objects=f"1 target + 0-{args.max_distractors} distractors, radius 12-24 px "
                          f"(validation: 0-{min(4, args.max_distractors)})",
                  backgrounds=f"plain {args.plain_fraction:.0%}, varied otherwise (validation: "
                              + ("all plain)" if args.plain_fraction >= 1 else "half each)"),
                  unmarked_fraction=args.unmarked_fraction, extreme_fraction=args.extreme_fraction,
                  extreme_unmarked_fraction=args.extreme_unmarked_fraction,
                  extreme_prompt="Point at the topmost|bottommost|leftmost|rightmost object.",
                  extreme_unmarked_prompt="Point at the leftmost|... object that has no white label."),
        optimizer=dict(name="AdamW", betas=[0.9, 0.95], weight_decay=args.weight_decay,
                       schedule=f"linear warm-up {args.warmup} steps, cosine to {args.min_lr_ratio} x lr"),
        device=device_name(device), device_type=device.type, dataloader_workers=workers,
        versions=library_versions(), python=platform.python_version(),
        parameters=n_params, wall_seconds=round(time.time() - t_start, 1), train_seconds=round(train_seconds, 1),
        val_images_per_task=args.val_images, baseline_px=baseline, final_val_px=final,
        final_val_within_8px=final_hit, curve=curve,
        config=model.base.config.to_dict(),
    )
    save_base(model.cpu(), processor, args.out, recipe)
    print(f"saved {args.out}: {', '.join(recipe['files'])}; sha256 {recipe['weights_sha256'][:16]}...; "
          f"{recipe['wall_seconds']:.0f} s in all", flush=True)
    return recipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- Output and device
    p.add_argument("--out", default="tiny_base", help="folder for the base model and recipe.json")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seeds the data stream, the heads and any redrawn init")
    # ---- Optimization
    p.add_argument("--steps", type=int, default=8000, help="training steps; 0: as many as --max_minutes allows")
    p.add_argument("--max_minutes", type=float, default=0, help="wall-time budget, start to save (0: none)")
    p.add_argument("--stop_after", type=int, default=0, help="stop after this many of --steps (the schedule is still "
                   "--steps'): rebuilds a run that --max_minutes cut, from its recipe")
    p.add_argument("--budget_fraction", type=float, default=0.85, help="with --steps 0: share of the budget planned for steps (the rest: start-up, validation, saving)")
    p.add_argument("--batch_size", type=int, default=16, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=300, help="linear warm-up steps")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="the cosine ends at this share of --lr")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--coord_loss", default="mse", choices=COORD_LOSSES, help="loss on x and y (l1: commits to one "
                   "object where MSE's mean lands between two; see model_vlm_regression.regression_loss)")
    # ---- Model init
    p.add_argument("--init_dir", default=None, help="model folder to start from (default: tiny_model's random init); "
                   "with --init_std 0, a pretrained base to continue")
    p.add_argument("--init_std", type=float, default=0.02, help="redraw every matrix at this std (tiny-random's: 0.3, which suits LoRA on a random model, not full "
                   "training); 0: keep --init_dir's weights")
    p.add_argument("--init_pos_std", type=float, default=0.02, help="std of the ViT position embedding")
    p.add_argument("--vision_config", default=None, help='JSON changes to the tiny vision tower, e.g. '
                   '\'{"patch_size": 8, "num_position_embeddings": 784}\' (the processor follows patch_size)')
    # ---- Task
    p.add_argument("--max_distractors", type=int, default=4, help="training images hold 0..this many other objects (validation: 0-4)")
    p.add_argument("--plain_fraction", type=float, default=0.8, help="share of training images on plain grey (the rest varied)")
    p.add_argument("--curriculum_steps", type=int, default=2500, help="steps over which the task ramps from one object on plain grey to the full mix")
    p.add_argument("--unmarked_fraction", type=float, default=0.25, help="share of 'object without a white label' samples")
    p.add_argument("--extreme_fraction", type=float, default=0.35, help="share of 'the topmost/bottommost/leftmost/"
                   "rightmost object' samples")
    p.add_argument("--extreme_unmarked_fraction", type=float, default=0.0, help="share of 'the leftmost/... object "
                   "that has no white label' samples")
    # ---- Validation and data loading
    p.add_argument("--val_images", type=int, default=100, help="held-out images per task")
    p.add_argument("--eval_every", type=int, default=500, help="steps between validations")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 was 10x faster on 2 cores shared with other jobs)")
    p.add_argument("--workers", type=int, default=-1, help="DataLoader workers (-1: cpu_count-2 up to 12 on CUDA, 0 on CPU)")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    return args


def main(argv=None):
    train(parse_args(argv))


if __name__ == "__main__":
    main()
