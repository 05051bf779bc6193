"""
Qwen3-VL + LoRA + two regression heads that read the hidden states of the prompt tokens <x> and <y>.

    python model_vlm_regression.py --model_name Qwen/Qwen3-VL-4B-Thinking --summary   # no weights downloaded
    python model_vlm_regression.py --model_name tiny --summary
    python model_vlm_regression.py --model_name tiny-random --smoke                 # one forward/backward pass
    python model_vlm_regression.py --export runs/demo runs/demo-export --merge      # one folder, no adapter

--model_name is a hub id, a local folder, `tiny` (the project's pretrained tiny Qwen3-VL, shipped in tiny_base/ and
made by pretrain_tiny.py) or `tiny-random` (the same architecture with random weights, built offline in seconds by
tiny_model.py). Both exercise the real model's code path. The prompt and its <x>/<y> tokens: prompt.py.
"""

import json
import os
import re
import warnings

import torch
import torch.nn as nn

from prompt import X_TOKEN, Y_TOKEN, encode_batch
from tiny_model import load_architecture_config, resolve_model_name

# peft still calls the deprecated spelling; the warning says nothing a user can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

DEFAULT_MODEL = "Qwen/Qwen3-VL-4B-Thinking"
# The model's defaults, defined here only: build_model, summarize, the CLIs and the benchmarks take them from here.
# They are the original code's values; the sweep (docs/HPARAM_SEARCH_README.md) varies r, alpha and the MLP depth.
LORA_R = 16
LORA_ALPHA = 32  # LoRA's scale is alpha / r = 2
LORA_DROPOUT = 0.05
MLP_LAYERS = 3  # Linear+GELU blocks per head
HEAD_HIDDEN_DIM = 512  # width of the heads' hidden layers (not the attention head_dim of the model's config)
# regression_config.json keys renamed since; a checkpoint saved before the rename still loads
RENAMED_CONFIG_KEYS = {"head_dim": "head_hidden_dim"}

# -----------------------------------------------------------------------------
# Loading the processor and the base model


def load_processor(model_name, min_pixels=None, max_pixels=None):
    """AutoProcessor with the pixel bounds the dataset resizes to, <x>/<y> added, right padding."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(resolve_model_name(model_name))
    size = dict(processor.image_processor.size)
    if min_pixels:
        size["shortest_edge"] = int(min_pixels)
    if max_pixels:
        size["longest_edge"] = int(max_pixels)
    processor.image_processor.size = size
    tok = processor.tokenizer
    # extra_special_tokens + replace_extra_special_tokens=False keeps Qwen's own special tokens registered
    # a base that already has <x>/<y> (the tiny base, pretrained on pointing) keeps its trained rows: build_model
    # initialises the rows only when the tokens are new here
    processor.coordinate_tokens_added = X_TOKEN not in tok.get_vocab() or Y_TOKEN not in tok.get_vocab()
    if processor.coordinate_tokens_added:
        tok.add_special_tokens({"extra_special_tokens": [X_TOKEN, Y_TOKEN]}, replace_extra_special_tokens=False)
    tok.padding_side = "right"  # positions of real tokens do not depend on the batch's padding
    return processor


def coordinate_token_ids(processor):
    ids = processor.tokenizer.convert_tokens_to_ids([X_TOKEN, Y_TOKEN])
    assert processor.tokenizer.unk_token_id not in ids, "coordinate tokens missing from the tokenizer"
    return ids


DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}  # --dtype; None = default_dtype


def default_dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def attention_implementation(device):
    import importlib.util

    cuda = torch.device(device).type == "cuda"
    return "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def load_base_model(model_name, device="cpu", dtype=None, load_in_4bit=False):
    """Qwen3VLForConditionalGeneration from a hub id, folder, `tiny` or `tiny-random`. 4-bit: NF4 + double quantization with the
    vision tower and lm_head left in full precision (quantizing the ViT hurts localisation and saves little)."""
    from transformers import BitsAndBytesConfig, Qwen3VLForConditionalGeneration

    dtype = dtype or default_dtype(device)
    kwargs = dict(dtype=dtype, attn_implementation=attention_implementation(device))
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["model.visual", "visual", "lm_head"])
        kwargs["device_map"] = {"": torch.device(device).index or 0} if torch.device(device).type == "cuda" else {"": "cpu"}
    model = Qwen3VLForConditionalGeneration.from_pretrained(resolve_model_name(model_name), **kwargs)
    model.config.use_cache = False
    patch_embed_as_matmul(model)
    if not load_in_4bit:
        model.to(device)
    return model


def patch_embed_as_matmul(model):
    """Run the ViT's patch embedding as the matmul it is. It is a Conv3d whose stride equals its kernel, over inputs
    that are already one flattened patch per row, so each output is proj.weight (viewed as out x in) times a row.
    Same parameters and state dict, the same result up to float rounding; on CPU the convolution and its backward
    took 16% of a demo training step (docs/VLM_WORKFLOW.md section 4b)."""
    import types

    embed = base_of(model).model.visual.patch_embed

    def forward(self, hidden_states):
        weight = self.proj.weight
        return nn.functional.linear(hidden_states.to(weight.dtype), weight.reshape(weight.shape[0], -1),
                                    self.proj.bias)

    embed.forward = types.MethodType(forward, embed)
    return model


def ensure_token_rows(model, token_ids):
    """Make the embedding cover token_ids WITHOUT ever shrinking it: Qwen pads its matrix (151,936 rows for ~151,669
    tokens), so resize_token_embeddings(len(tokenizer)) would cut rows. Returns True when rows were added."""
    rows = model.get_input_embeddings().weight.shape[0]
    if max(token_ids) < rows:
        return False
    model.resize_token_embeddings(max(token_ids) + 1, pad_to_multiple_of=64, mean_resizing=True)
    return True


def init_token_rows(model, token_ids):
    """Start <x>/<y> from the mean embedding of the real tokens: a typical input, unlike a random or padded row."""

    emb = model.get_input_embeddings().weight
    with torch.no_grad():  # rows below the first new id are the tokenizer's own (new tokens are appended)
        emb[token_ids] = emb[: min(token_ids)].float().mean(0).to(emb.dtype)


# -----------------------------------------------------------------------------
# LoRA and the regression model

# LoRA on the language model only: the vision tower's linears are named qkv/proj/linear_fc1/linear_fc2 and
# the regex also requires `language_model`, so the ViT stays frozen.
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


# --train_vision: which parts of the vision side train fully (as peft modules_to_save: a trainable copy saved in the
# adapter, restored by PeftModel.from_pretrained and merged by export --merge). "merger": the patch merger and the
# DeepStack mergers that feed the language model (in the 4B 109M of the vision side's 415M weights); "all": the whole
# ViT (`--summary --train_vision ...` counts them).
TRAIN_VISION = ("none", "merger", "all")


def vision_modules(base, train_vision):
    """Names of the modules --train_vision trains fully (None for "none")."""
    if train_vision not in TRAIN_VISION:
        raise ValueError(f"unknown --train_vision {train_vision!r}; choose from {TRAIN_VISION}")
    if train_vision == "none":
        return None
    if train_vision == "all":
        return ["model.visual"]
    return [name for name, _ in base.named_modules()
            if name == "model.visual.merger" or re.fullmatch(r"model\.visual\.deepstack_merger_list\.\d+", name)]


def lora_config(r=LORA_R, alpha=LORA_ALPHA, dropout=LORA_DROPOUT, token_ids=(), modules_to_save=None):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none",
                      trainable_token_indices={"embed_tokens": list(token_ids)} if token_ids else None,
                      modules_to_save=modules_to_save)


def make_head(in_dim, hidden_dim=HEAD_HIDDEN_DIM, num_layers=MLP_LAYERS, tanh=True):
    """LayerNorm, `num_layers` Linear+GELU blocks, Linear to 1, tanh (tanh=False: a logit). The LayerNorm makes the
    head's input scale independent of the backbone (the 4B's final-norm outputs are far from unit scale); the last
    Linear starts near zero so early predictions sit mid-range instead of at the tanh bounds, where gradients
    vanish."""

    layers, d = [nn.LayerNorm(in_dim)], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(d, hidden_dim), nn.GELU()]
        d = hidden_dim
    out = nn.Linear(d, 1)
    nn.init.normal_(out.weight, std=1e-3)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out, nn.Tanh()) if tanh else nn.Sequential(*layers, out)


COORD_LOSSES = ("mse", "l1")


def regression_loss(pred, target, mask=None, kind="mse"):
    """MSE(x) + MSE(y) (kind "l1": mean absolute errors): (total, loss_x, loss_y). Where the model cannot yet tell
    which of several objects comes next, MSE's best answer is their mean, a point between them; L1's is the median
    per axis, which on two objects is the likelier one's coordinate: it commits to an object instead of blending.
    With a mask, rows where it is false count 0 and the sum is still divided by the number of rows: a per-sample
    mean, so a global batch has the same loss and gradient however it is split over processes (dividing by each
    rank's own count of kept rows would not be), and a batch with no kept row has loss 0 that still carries the
    graph (every rank's backward sees the same parameters)."""
    if kind not in COORD_LOSSES:
        raise ValueError(f"unknown coordinate loss {kind!r}; choose from {COORD_LOSSES}")
    err = (pred[:, :2] - target).abs() if kind == "l1" else (pred[:, :2] - target) ** 2
    if mask is not None:
        err = err * mask.float()[:, None]
    loss_x, loss_y = err[:, 0].mean(), err[:, 1].mean()
    return loss_x + loss_y, loss_x, loss_y


def counting_loss(pred, target, done, kind="mse"):
    """(total, loss_x, loss_y, loss_done) of a batch. pred (B, 2): the coordinate stop rule, done samples are
    trained towards (-1, -1) like any other target and loss_done is 0. pred (B, 3), a stop head: the coordinate
    loss is masked on the done samples (the x/y heads are never pulled to a corner) and the stop logit adds its
    binary cross-entropy. kind: the coordinate loss (regression_loss)."""
    if pred.shape[1] == 2:
        loss, loss_x, loss_y = regression_loss(pred, target, kind=kind)
        return loss, loss_x, loss_y, torch.zeros((), device=pred.device)
    loss, loss_x, loss_y = regression_loss(pred, target, mask=done < 0.5, kind=kind)
    loss_done = nn.functional.binary_cross_entropy_with_logits(pred[:, 2], done)
    return loss + loss_done, loss_x, loss_y, loss_done


GROUPS = ("x_head", "y_head", "lora", "token_rows")  # what training must update (and done_head, vision if present)
HEADS = ("x_head", "y_head", "done_head")  # the fp32 heads: saved in heads.safetensors, trained at the heads' lr
STOP_RULES = ("head", "coordinate")  # how counting stops: the stop head's probability, or a (-1, -1) prediction


def param_group(name):
    """Which trainable group a parameter name belongs to."""
    head = name.split(".", 1)[0]
    return (head if head in HEADS else "lora" if "lora_" in name else "token_rows" if "trainable_tokens" in name
            else "vision" if ".visual." in name and "modules_to_save" in name else "other")


def base_of(vlm):
    """The Qwen3VLForConditionalGeneration inside a peft wrapper, or vlm itself (a merged export has no wrapper)."""
    return vlm.get_base_model() if hasattr(vlm, "get_base_model") else vlm


def attention_share_loss(q, k, cos, sin, scaling, query_pos, image_pos, near, valid):
    """-log of the share of image attention that the queries at query_pos give to the image tokens marked `near`,
    mean over heads, queries and rows: the language model's own attention logits (q and k after its norms, rotated as
    the layer rotates them) restricted to the image tokens, whose softmax there is the share of the layer's attention
    on the image that lands near the target. q (B, L, H, D), k (B, L, Hkv, D): q_norm's and k_norm's outputs; cos, sin
    the layer's position embeddings; query_pos (B, Q); image_pos, near, valid (B, N): each row's image tokens, padded
    to the longest row (valid false on the padding)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, H, L, D), (B, Hkv, L, D)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    rows = torch.arange(q.shape[0], device=q.device)[:, None]
    qs, ks = q[rows, :, query_pos], k[rows, :, image_pos]  # (B, Q, H, D), (B, N, H, D)
    logits = torch.einsum("bqhd,bnhd->bqhn", qs.float(), ks.float()) * scaling
    image = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return (image.logsumexp(-1) - image.masked_fill(~near[:, None, None, :], float("-inf")).logsumexp(-1)).mean()


class VLMRegressionModel(nn.Module):
    """A peft-wrapped Qwen3-VL plus fp32 heads; forward(**batch) -> (B, 2) predictions in [-1, 1], or (B, 3) with
    the stop head's logit ("all objects are marked") as the third column.

    The stop head (stop_rule="head") reads the hidden states of both <x> and <y>, concatenated: the two tokens the
    coordinate heads read, so it needs no extra prompt token and the prompt stays the original one."""

    def __init__(self, vlm, x_token_id, y_token_id, mlp_layers=MLP_LAYERS, head_hidden_dim=HEAD_HIDDEN_DIM,
                 config=None, stop_rule="coordinate"):
        super().__init__()
        if stop_rule not in STOP_RULES:
            raise ValueError(f"unknown stop rule {stop_rule!r}; choose from {STOP_RULES}")
        self.vlm = vlm
        hidden = base_of(vlm).config.text_config.hidden_size
        self.x_head = make_head(hidden, head_hidden_dim, mlp_layers).float()
        self.y_head = make_head(hidden, head_hidden_dim, mlp_layers).float()
        self.done_head = make_head(2 * hidden, head_hidden_dim, mlp_layers, tanh=False).float() \
            if stop_rule == "head" else None
        self.x_token_id, self.y_token_id = x_token_id, y_token_id
        self.config = dict(config or {}, mlp_layers=mlp_layers, head_hidden_dim=head_hidden_dim, hidden_size=hidden,
                           x_token_id=x_token_id, y_token_id=y_token_id, stop_rule=stop_rule)

    def heads(self):
        """{name: head module} of the heads this model has."""
        return {name: getattr(self, name) for name in HEADS if getattr(self, name, None) is not None}

    def token_positions(self, input_ids):
        """Index of <x> and <y> in each row; a row without exactly one of each is an error, not a silent guess."""
        for name, tid in (("<x>", self.x_token_id), ("<y>", self.y_token_id)):
            counts = (input_ids == tid).sum(1)
            bad = (counts != 1).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"sample {bad[0]} of the batch has {int(counts[bad[0]])} {name} tokens, expected "
                                 f"exactly 1 (prompt truncated or malformed?)")
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return rows, (input_ids == self.x_token_id).int().argmax(1), (input_ids == self.y_token_id).int().argmax(1)

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, targets=None,
                done=None, **_ignored):
        """(B, 2|3) predictions. With targets (B, 2) and done (B,) in training, and attention_loss set, it also keeps
        self.attention_loss: attention_share_loss of <x> and <y> in the last layer towards the image tokens within
        3/4 of a token of the target, over the samples with an object left (None when there is none)."""
        rows, x_pos, y_pos = self.token_positions(input_ids)
        backbone = base_of(self.vlm).model  # Qwen3VLModel: last_hidden_state is after the final norm
        vision_dtype = backbone.visual.patch_embed.proj.weight.dtype
        self.attention_loss, seen, hooks = None, {}, []
        if self.training and targets is not None and self.config.get("attention_loss"):
            attn = backbone.language_model.layers[-1].self_attn

            def keep(name):  # the output of the layer's forward (the hooks are gone before any recompute)
                def hook(_m, _args, out):
                    seen.setdefault(name, out)
                return hook

            def keep_rope(_m, args, kwargs):
                seen.setdefault("rope", kwargs.get("position_embeddings", args[1] if len(args) > 1 else None))

            hooks = [attn.q_norm.register_forward_hook(keep("q")), attn.k_norm.register_forward_hook(keep("k")),
                     attn.register_forward_pre_hook(keep_rope, with_kwargs=True)]
        try:
            out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                           pixel_values=pixel_values.to(vision_dtype), image_grid_thw=image_grid_thw,
                           mm_token_type_ids=mm_token_type_ids, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        if hooks:
            self.attention_loss = self.target_attention_loss(seen, attn.scaling, input_ids, image_grid_thw, targets,
                                                             done, torch.stack((x_pos, y_pos), 1))
        hidden = out.last_hidden_state
        hx, hy = hidden[rows, x_pos].float(), hidden[rows, y_pos].float()
        # the heads are fp32 and run outside any autocast (bf16 mixed precision would otherwise cast them down)
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            outs = [self.x_head(hx), self.y_head(hy)]
            if self.done_head is not None:
                outs.append(self.done_head(torch.cat((hx, hy), dim=-1)))
        return torch.cat(outs, dim=-1)

    def target_attention_loss(self, seen, scaling, input_ids, image_grid_thw, targets, done, query_pos):
        """attention_share_loss for the samples with an object left (None if there is none); the target's tokens are
        those whose centre lies within 3/4 of a token (the language model's image token: patch x merge pixels) of the
        target point. Each row has its own image size."""
        live = (done < 0.5).nonzero().flatten() if done is not None else torch.arange(len(targets))
        if not len(live):
            return None
        cfg = base_of(self.vlm).config
        merge = cfg.vision_config.spatial_merge_size
        token = cfg.vision_config.patch_size * merge
        is_image = input_ids[live] == cfg.image_token_id
        index = torch.arange(int(is_image.sum(1).max()), device=input_ids.device)
        valid = index < is_image.sum(1, keepdim=True)  # (B, N)
        image_pos = torch.zeros_like(valid, dtype=torch.long).masked_scatter(valid, is_image.nonzero()[:, 1])
        th, tw = (image_grid_thw[live, 1:] // merge).unbind(1)  # image tokens down and across
        centres = torch.stack(((index % tw[:, None] + 0.5) * token, (index // tw[:, None] + 0.5) * token), -1)
        target_px = (targets[live].float() + 1) / 2 * torch.stack((tw, th), 1) * token
        near = valid & ((centres - target_px[:, None]).norm(dim=-1) < 0.75 * token)
        cos, sin = seen["rope"]
        return attention_share_loss(seen["q"][live], seen["k"][live], cos[live], sin[live], scaling, query_pos[live],
                                    image_pos, near, valid)

    def trainable_groups(self):
        """Named groups of trainable parameters (for the optimizer's two lrs and the gradient-flow check)."""
        groups = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault(param_group(name), []).append(p)
        return groups

    def save_pretrained(self, out_dir, processor=None):
        """adapter/ (peft format), heads.safetensors, regression_config.json, processor/ (tokenizer with <x>/<y>).
        A merged model (no peft wrapper, export --merge) saves its full weights at the folder's root instead of
        adapter/: config.json + model.safetensors, loadable by transformers alone."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        merged = not hasattr(self.vlm, "get_base_model")
        self.vlm.save_pretrained(out_dir if merged else os.path.join(out_dir, "adapter"))
        if merged:
            self.config["merged"] = True
        heads = {f"{name}.{k}": v for name, head in self.heads().items() for k, v in head.state_dict().items()}
        save_file({k: v.detach().cpu().contiguous() for k, v in heads.items()}, os.path.join(out_dir, "heads.safetensors"))
        with open(os.path.join(out_dir, "regression_config.json"), "w") as f:
            json.dump(dict(self.config, versions=library_versions()), f, indent=2)
        if processor is not None:
            processor.save_pretrained(os.path.join(out_dir, "processor"))

    def load_heads(self, path):
        """The heads from save_pretrained's heads.safetensors."""
        from safetensors.torch import load_file

        heads = load_file(os.path.join(path, "heads.safetensors"))
        for name, head in self.heads().items():
            head.load_state_dict({k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(name + ".")})

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, load_in_4bit=None, is_trainable=False):
        """(model, processor) restored from save_pretrained's folder; the base model is loaded from its recorded name,
        or, for a merged export (regression_config.json "merged": true), from the folder itself."""
        from peft import PeftModel
        from transformers import AutoProcessor

        with open(os.path.join(path, "regression_config.json")) as f:
            cfg = json.load(f)
        for old, new in RENAMED_CONFIG_KEYS.items():
            if old in cfg:
                cfg[new] = cfg.pop(old)
        processor = AutoProcessor.from_pretrained(os.path.join(path, "processor"))
        processor.tokenizer.padding_side = "right"
        load_in_4bit = cfg.get("load_in_4bit", False) if load_in_4bit is None else load_in_4bit
        if cfg.get("merged"):  # export --merge: the folder holds the base with LoRA and <x>/<y> rows merged in
            vlm = load_base_model(path, device, dtype, load_in_4bit).requires_grad_(False)
        else:
            base = load_base_model(cfg["base_model"], device, dtype, load_in_4bit)
            ensure_token_rows(base, [cfg["x_token_id"], cfg["y_token_id"]])
            vlm = PeftModel.from_pretrained(base, os.path.join(path, "adapter"), is_trainable=is_trainable)
        cfg.pop("versions", None)
        # runs saved before the stop head have no stop_rule: they stopped on a (-1, -1) prediction
        stop_rule = cfg.pop("stop_rule", "coordinate")
        model = cls(vlm, cfg.pop("x_token_id"), cfg.pop("y_token_id"), cfg.pop("mlp_layers"),
                    cfg.pop("head_hidden_dim"), cfg, stop_rule=stop_rule)
        model.load_heads(path)
        if load_in_4bit:  # the quantized base is already placed by its device_map; only the heads move
            for head in model.heads().values():
                head.to(device)
        else:
            model.to(device)
        return model, processor


def build_model(model_name=DEFAULT_MODEL, lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                mlp_layers=MLP_LAYERS, head_hidden_dim=HEAD_HIDDEN_DIM, device="cpu", dtype=None, load_in_4bit=False,
                gradient_checkpointing=False, min_pixels=None, max_pixels=None, stop_rule="coordinate",
                train_vision="none"):
    """(VLMRegressionModel, processor) ready to train: base model, <x>/<y> tokens, LoRA (plus, with train_vision,
    fully trained vision modules), heads."""
    from peft import get_peft_model

    processor = load_processor(model_name, min_pixels, max_pixels)
    ids = coordinate_token_ids(processor)
    base = load_base_model(model_name, device, dtype, load_in_4bit)
    if ensure_token_rows(base, ids) or processor.coordinate_tokens_added:
        init_token_rows(base, ids)
    if gradient_checkpointing:
        # non-reentrant checkpointing lets gradients reach LoRA weights even though the block inputs are frozen
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    vlm = get_peft_model(base, lora_config(lora_r, lora_alpha, lora_dropout, ids, vision_modules(base, train_vision)))
    config = dict(base_model=model_name, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                  load_in_4bit=load_in_4bit, min_pixels=min_pixels, max_pixels=max_pixels, train_vision=train_vision)
    model = VLMRegressionModel(vlm, ids[0], ids[1], mlp_layers, head_hidden_dim, config, stop_rule=stop_rule)
    for head in model.heads().values():
        head.to(device)
    return model, processor


def library_versions():
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "qwen-vl-utils", "wandb"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# -----------------------------------------------------------------------------
# Export: one folder to hand over (adapter or merged weights, heads, config, processor, model card)

# The run's own files, copied into an export under these names (config.json at an export's root is the merged base's):
# evaluate_vlm_regression.py reads TRAINING_CONFIG as the run's config.json when the export has no run dir around it.
TRAINING_CONFIG, TRAINING_RESULTS = "training_config.json", "training_results.json"
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(checkpoint, out_dir, merge=False, dtype="auto"):
    """Write checkpoint (a checkpoint folder or a run dir) as one folder that VLMRegressionModel.from_pretrained
    loads: heads.safetensors, regression_config.json, processor/, the run's config and results, a model card
    (README.md), and either adapter/ (as trained) or, with merge, the base model with LoRA and the <x>/<y> token rows
    merged in (peft's merge_and_unload) as config.json + model.safetensors: no adapter, no base model download.
    Merging runs in fp32; the merged weights are saved in `dtype` ("auto": the base model's own). Returns out_dir."""
    import shutil

    from evaluate_vlm_regression import resolve_checkpoint  # the CLI's one definition of checkpoint vs run dir

    ckpt, run_dir = resolve_checkpoint(checkpoint)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: not empty; export into a new folder")
    os.makedirs(out_dir, exist_ok=True)
    if merge:
        model, processor = VLMRegressionModel.from_pretrained(ckpt, device="cpu", dtype=torch.float32,
                                                              load_in_4bit=False)
        base = model.vlm.merge_and_unload()  # LoRA into the linears; the trained <x>/<y> rows into the embedding
        model.vlm = base.to(SAVE_DTYPES[dtype] if dtype != "auto" else stored_dtype(model.config["base_model"]))
        model.config["load_in_4bit"] = False
        model.save_pretrained(out_dir, processor)
    else:
        for name in ("adapter", "processor"):
            shutil.copytree(os.path.join(ckpt, name), os.path.join(out_dir, name))
        for name in ("heads.safetensors", "regression_config.json"):
            shutil.copy2(os.path.join(ckpt, name), os.path.join(out_dir, name))
    run_files = {}
    for src, dst in (("config.json", TRAINING_CONFIG), ("results.json", TRAINING_RESULTS)):
        path = os.path.join(run_dir, src) if run_dir else None
        if path and os.path.isfile(path):
            shutil.copy2(path, os.path.join(out_dir, dst))
            with open(path) as f:
                run_files[src] = json.load(f)
    with open(os.path.join(out_dir, "regression_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(model_card(cfg, run_files.get("config.json", {}), run_files.get("results.json", {}), merge,
                           os.path.basename(os.path.normpath(out_dir))))
    return out_dir


def stored_dtype(model_name):
    """The dtype a model's weights are published in (its config.json; float32 when it does not say)."""
    config = load_architecture_config(model_name)
    dtype = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def model_card(cfg, run, results, merged, name):
    """README.md in the Hugging Face model-card layout: YAML front matter, then description, data, training
    command, validation figures and how to load and count."""
    base = cfg.get("base_model", DEFAULT_MODEL)
    heads = "x, y and stop heads" if cfg.get("stop_rule") == "head" else "x and y heads"
    if run.get("dataset") == "synthetic":
        data = "synthetic shapes (synthetic_data.py), seed {}".format(run.get("seed"))
    elif run.get("dataset"):
        data = f"{run['dataset']} from `{run.get('data_root')}`" + (
            f", categories {', '.join(run['categories'])}" if run.get("categories") else "")
    else:
        data = "not recorded (the checkpoint was exported without its run's config.json)"
    figures = [("best validation loss", results.get("best_val_loss")), ("at epoch", results.get("best_epoch")),
               ("mean-target baseline loss", results.get("baseline_val_loss")),
               ("final validation loss", results.get("final_val_loss"))]
    count = results.get("count_eval") if isinstance(results.get("count_eval"), dict) else {}
    figures += [(f"counting {k} ({count.get('num_images')} validation images)", count.get(k))
                for k in ("mae", "rmse", "baseline_mean_count_mae", "f1")]
    rows = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                      for k, v in figures if v is not None) or "| (no results.json) | |"
    weights = ("The LoRA weights and the trained `<x>`/`<y>` token rows are merged into the base model\n(config.json + "
               "model.safetensors at the folder's root): it loads without an adapter and without the base model."
               if merged else f"LoRA adapter in peft's format (`adapter/`), applied to `{base}` when loaded.")
    return f"""---
base_model: {base}
library_name: {"transformers" if merged else "peft"}
pipeline_tag: image-text-to-text
tags:
- object-counting
- qwen3-vl
- lora
- regression
- vision-language
---

# {name}

## Model description
Counts objects one at a time: objects already counted are marked on the image with numbered labels (or dots), and
the model regresses the (x, y) of the next unmarked object from the hidden states of the prompt tokens `<x>` and
`<y>`, each through its own MLP head ({heads}, `heads.safetensors`, fp32; {cfg.get("mlp_layers")} layers of width
{cfg.get("head_hidden_dim")}). Base model `{base}`, LoRA r={cfg.get("lora_r")}, alpha={cfg.get("lora_alpha")}. Counting
order `{cfg.get("ordering")}`, stop rule `{cfg.get("stop_rule", "coordinate")}`, images resized within
{cfg.get("min_pixels")}-{cfg.get("max_pixels")} pixels (regression_config.json).

{weights}

## Training data
{data}.

## Training command
```bash
{"python " + run["command"] if run.get("command") else "not recorded"}
```

## Validation results
| metric | value |
|---|---|
{rows}

## How to load and count
```python
import evaluate_vlm_regression as ev
from model_vlm_regression import VLMRegressionModel

model, processor = VLMRegressionModel.from_pretrained("{name}")
result = ev.count_image(model, processor, "photo.jpg", "eggs")   # {{"count", "points", "stop_reason", "steps"}}
```
```bash
python evaluate_vlm_regression.py --checkpoint {name} --images photo.jpg photos/ --object eggs --output_dir counts
python evaluate_vlm_regression.py --checkpoint {name} --split test      # the training run's data (training_config.json)
```
The code is this repository's (`model_vlm_regression.py`, `evaluate_vlm_regression.py`, `prompt.py`).
"""


# -----------------------------------------------------------------------------
# Summary: parameter counts and a memory estimate, from the architecture alone (meta device, no weights)

def summarize(model_name=DEFAULT_MODEL, lora_r=LORA_R, lora_alpha=LORA_ALPHA, mlp_layers=MLP_LAYERS,
              head_hidden_dim=HEAD_HIDDEN_DIM, batch_size=4, tokens_per_sample=350, stop_rule="head",
              train_vision="none"):
    """Parameter counts of the architecture (built on the meta device) and a training-memory estimate."""
    from peft import get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    config = load_architecture_config(model_name)
    text = config.text_config
    with torch.device("meta"):
        base = Qwen3VLForConditionalGeneration(config)
        total = sum(p.numel() for p in base.parameters())
        vision = sum(p.numel() for p in base.model.visual.parameters())
        embed = base.get_input_embeddings().weight.numel()
        quantizable = sum(m.weight.numel() for n, m in base.model.language_model.named_modules()
                          if isinstance(m, nn.Linear))
        vision_trained = sum(p.numel() for name in vision_modules(base, train_vision) or []
                             for p in base.get_submodule(name).parameters())
        vlm = get_peft_model(base, lora_config(lora_r, lora_alpha, 0.0, token_ids=[0, 1]))
        heads = sum(p.numel() for p in make_head(text.hidden_size, head_hidden_dim, mlp_layers).parameters()) * 2
        if stop_rule == "head":
            heads += sum(p.numel() for p in make_head(2 * text.hidden_size, head_hidden_dim, mlp_layers).parameters())
    lora = sum(p.numel() for n, p in vlm.named_parameters() if "lora_" in n)
    token_rows = 2 * text.hidden_size
    trainable = lora + heads + token_rows + vision_trained  # (the vision side's activations are not estimated)
    # Memory (GiB), training at batch_size x tokens_per_sample: frozen weights, fp32 trainable params + grads + AdamW
    # moments (16 B/param), activations of the language model kept for backward (~34 B x hidden per token and layer
    # in bf16 without checkpointing; one hidden vector per token and layer with it, plus one layer's worth).
    gib = 1024 ** 3
    tokens = batch_size * tokens_per_sample
    weights_bf16 = total * 2
    weights_4bit = (total - quantizable) * 2 + quantizable * 0.5 * (1 + 0.127 / 4)  # NF4 + double-quant overhead
    states = trainable * 16
    act_full = 34 * text.hidden_size * tokens * text.num_hidden_layers
    act_ckpt = 2 * text.hidden_size * tokens * text.num_hidden_layers + 34 * text.hidden_size * tokens
    # peft's trainable token rows rebuild the whole embedding matrix on each forward (a bf16 copy) and its gradient
    # is full-size too: two embedding-sized bf16 tensors (0.78 GB each on the 4B), whatever the batch
    token_rows_work = 2 * embed * 2
    states += token_rows_work
    return {
        "model": model_name, "stop_rule": stop_rule, "total_params": total, "vision_params": vision, "language_params": total - vision,
        "embedding_rows": config.text_config.vocab_size, "embedding_params": embed,
        "lora_params": lora, "head_params": heads, "token_row_params": token_rows, "train_vision": train_vision,
        "vision_trainable_params": vision_trained, "trainable_params": trainable,
        "memory_gib": {
            "assumptions": f"batch {batch_size} x {tokens_per_sample} tokens, AdamW, fp32 trainable params, the "
                           f"token rows' embedding copy and its gradient",
            "token_rows_gib": round(token_rows_work / gib, 2),
            "bf16": round((weights_bf16 + states + act_full) / gib, 2),
            "bf16_gradient_checkpointing": round((weights_bf16 + states + act_ckpt) / gib, 2),
            "4bit": round((weights_4bit + states + act_full) / gib, 2),
            "4bit_gradient_checkpointing": round((weights_4bit + states + act_ckpt) / gib, 2),
        },
    }


def print_summary(s):
    print(f"model                {s['model']}")
    print(f"total parameters     {s['total_params']:>15,}  (vision {s['vision_params']:,}, "
          f"language {s['language_params']:,}; embedding rows {s['embedding_rows']:,})")
    print(f"LoRA parameters      {s['lora_params']:>15,}")
    heads = "x head + y head" + (" + stop head" if s["stop_rule"] == "head" else "")
    print(f"head parameters      {s['head_params']:>15,}  ({heads})")
    print(f"<x>/<y> token rows   {s['token_row_params']:>15,}")
    if s["train_vision"] != "none":
        label = f"vision ({s['train_vision']})"
        print(f"{label:<21}{s['vision_trainable_params']:>15,}  (trained fully; its activations are not in the estimate)")
    print(f"trainable total      {s['trainable_params']:>15,}  ({100 * s['trainable_params'] / s['total_params']:.2f}% of the base model's size)")
    mem = s["memory_gib"]
    print(f"training memory est. ({mem['assumptions']}):")
    for key in ("bf16", "bf16_gradient_checkpointing", "4bit", "4bit_gradient_checkpointing"):
        print(f"  {key:<28} {mem[key]:>7.2f} GiB")
    print(f"  (of which the token rows' embedding copy + gradient: {mem['token_rows_gib']:.2f} GiB)")


def smoke(model_name="tiny-random", **model_kwargs):
    """One forward + backward pass on a random image: the install works end to end."""
    from PIL import Image

    model, processor = build_model(model_name, **model_kwargs)
    image = Image.fromarray(torch.randint(0, 255, (224, 224, 3), dtype=torch.uint8).numpy())
    pred = model(**encode_batch(processor, [image], ["eggs"], [0]))
    loss = counting_loss(pred, torch.zeros_like(pred[:, :2]), torch.zeros_like(pred[:, 0]))[0]
    loss.backward()
    print(f"smoke ok: prediction {pred.detach().numpy().round(4).tolist()}, loss {loss.item():.4f}")


def add_model_args(parser):
    """The model's arguments (training and this file's CLI); returns their group, for a caller's own additions."""
    g = parser.add_argument_group("model")
    g.add_argument("--model_name", default=DEFAULT_MODEL,
                   help="hub id, local folder, `tiny` (the pretrained tiny base, tiny_base/) or `tiny-random`")
    g.add_argument("--lora_r", type=int, default=LORA_R, help="LoRA rank")
    g.add_argument("--lora_alpha", type=int, default=LORA_ALPHA, help="LoRA alpha (scale alpha/r)")
    g.add_argument("--lora_dropout", type=float, default=LORA_DROPOUT, help="dropout on LoRA's input (training)")
    g.add_argument("--mlp_layers", type=int, default=MLP_LAYERS, choices=[2, 3, 4], help="Linear+GELU blocks per head")
    g.add_argument("--head_hidden_dim", "--head_dim", dest="head_hidden_dim", type=int, default=HEAD_HIDDEN_DIM,
                   help="width of the heads' hidden layers (--head_dim: its old name)")
    g.add_argument("--stop_rule", default="head", choices=STOP_RULES,
                   help="head: a stop head says 'all objects are marked'; coordinate: the original rule, a (-1, -1) "
                        "prediction means done (for reproducing older runs)")
    g.add_argument("--train_vision", default="none", choices=TRAIN_VISION,
                   help="vision side trained fully beside LoRA: none (frozen), merger (the patch and DeepStack "
                        "mergers), all (the whole ViT); its lr: --vision_lr")
    return g


def check_model_args(parser, args):
    """parser.error (one line, exit 2) for model arguments no model can be built with."""
    for name in ("lora_r", "lora_alpha", "head_hidden_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- Model
    add_model_args(p)
    # ---- What to do
    p.add_argument("--summary", action="store_true", help="print parameter counts and a memory estimate")
    p.add_argument("--json", action="store_true", help="with --summary: print JSON")
    p.add_argument("--smoke", action="store_true", help="run one forward/backward pass")
    p.add_argument("--export", nargs=2, metavar=("CKPT", "OUT"),
                   help="write checkpoint (or run dir) CKPT as one folder OUT: adapter or merged weights, heads, "
                        "config, processor, model card")
    p.add_argument("--merge", action="store_true", help="--export: merge LoRA and the <x>/<y> rows into the base")
    p.add_argument("--dtype", default="auto", choices=("auto", *SAVE_DTYPES),
                   help="--export --merge: dtype of the saved weights (auto: the base model's)")
    args = p.parse_args(argv)
    if args.export:
        print(f"exported {args.export[0]} to {export(*args.export, merge=args.merge, dtype=args.dtype)}"
              + (" (merged)" if args.merge else ""))
        return
    check_model_args(p, args)
    if args.summary:
        s = summarize(args.model_name, args.lora_r, args.lora_alpha, args.mlp_layers, args.head_hidden_dim,
                      stop_rule=args.stop_rule, train_vision=args.train_vision)
        print(json.dumps(s, indent=2)) if args.json else print_summary(s)
    if args.smoke or not args.summary:
        smoke(args.model_name, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
              mlp_layers=args.mlp_layers, head_hidden_dim=args.head_hidden_dim, stop_rule=args.stop_rule,
              train_vision=args.train_vision)


if __name__ == "__main__":
    main()
