"""
Qwen3-VL + LoRA + two regression heads that read the hidden states of the prompt tokens <x> and <y>.

    python model_vlm_regression.py --model_name Qwen/Qwen3-VL-4B-Thinking --summary   # no weights downloaded
    python model_vlm_regression.py --model_name tiny --summary
    python model_vlm_regression.py --model_name tiny --smoke                        # one forward/backward pass

--model_name is a hub id, a local folder, or `tiny`: a random-init Qwen3-VL built offline in seconds (see
build_tiny_model) that exercises the same code path as the real model.
"""

import functools
import json
import os
import shutil
import tempfile

import warnings

import inflect
import torch
import torch.nn as nn

# peft still calls the deprecated spelling; the warning says nothing a user can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

X_TOKEN, Y_TOKEN = "<x>", "<y>"
DEFAULT_MODEL = "Qwen/Qwen3-VL-4B-Thinking"

# Rule 3 of the prompt must state the order the targets were produced in (dataset.order_points).
ORDERING_RULES = {
    "reading_order": "Count systematically from top-to-bottom, left-to-right",
    "left_to_right": "Count systematically from left-to-right, top-to-bottom",
    "nearest_neighbor": "Count systematically from the top-left object, always moving to the nearest unmarked object",
}

# -----------------------------------------------------------------------------
# The prompt (one source of truth: dataset collate, training and evaluation all call build_messages)


@functools.lru_cache(maxsize=4096)
def object_names(object_type):
    """(singular, plural) of an object type name given in either form: 'eggs' -> ('egg', 'eggs')."""
    engine = _inflect_engine()
    # angle brackets would let a name spell a special token ("<y>", "<|im_end|>") and corrupt the prompt
    name = " ".join(object_type.replace("<", " ").replace(">", " ").split())
    singular = engine.singular_noun(name)
    # singular_noun returns False for a word already singular; a round trip guards against 'bus' -> 'bu'
    if singular and engine.plural_noun(singular) == name and not name.endswith(("ss", "us")):
        return singular, name
    return name, engine.plural_noun(name)


@functools.lru_cache(maxsize=1)
def _inflect_engine():
    return inflect.engine()


def prompt_text(object_type, num_marked, ordering="reading_order"):
    """(system text, user text after the image) of the counting prompt."""
    singular, plural = object_names(object_type)
    marked = f"{num_marked} object is" if num_marked == 1 else f"{num_marked} objects are"
    system = f"You are a vision assistant that locates {plural} in images systematically."
    user = (
        f"Count the {plural} in this image. {marked} already marked with numbered labels.\n\n"
        f"Task: Predict the (x, y) location of the next unmarked {singular}.\n\n"
        "Rules:\n"
        "1. Output x, y as normalized coordinates in [-1, 1]\n"
        f"2. If all {plural} are marked, output x=-1, y=-1\n"
        f"3. {ORDERING_RULES[ordering]}\n\n"
        f"Next location: {X_TOKEN} {Y_TOKEN}"
    )
    return system, user


def build_messages(object_type, num_marked, ordering="reading_order"):
    """Chat messages for one sample; the image itself is passed to the processor separately."""
    system, user = prompt_text(object_type, num_marked, ordering)
    return [
        {"role": "system", "content": [{"type": "text", "text": system}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]},
    ]


def render_prompt(processor, object_type, num_marked, ordering="reading_order"):
    """The prompt string as the model's chat template renders it (image placeholder included).
    No generation prompt: the heads read <x>/<y>, and under causal attention nothing after them matters."""
    return processor.apply_chat_template(build_messages(object_type, num_marked, ordering), tokenize=False)


# -----------------------------------------------------------------------------
# The tiny model: a random-init Qwen3-VL with the real architecture's code path, built offline.

# Weight sizes are multiples of 64 (bitsandbytes' 4-bit block). rope_theta is 100, not the 4B's 5e6: with so few, so narrow
# layers and positions < 300, a theta of 5e6 leaves the rotary angles nearly constant and the model cannot tell
# where in the image a token is (x barely learns); 100 makes position visible. The architecture is otherwise the 4B's.
# Four heads rather than two: more distinct attention patterns to start from shortened the plateau before the
# demo begins to learn (y's loss after 1,500 steps 0.09 with 4 heads, 0.21 with 2; docs/VLM_WORKFLOW.md section 4b).
TINY_CONFIG = {
    "model_type": "qwen3_vl",
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_vl_text", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "tie_word_embeddings": True,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
        "rope_theta": 100.0,
    },
    "vision_config": {
        "model_type": "qwen3_vl_vision", "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 1,
        "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
        "out_hidden_size": 128, "num_position_embeddings": 256, "deepstack_visual_indexes": [0, 1],
    },
}
TINY_VERSION = "v3"  # bump when the tiny model's recipe changes, so caches are rebuilt rather than reused

# The random weights' scale. Hugging Face's std of 0.02 suits a model about to be pretrained, not one that is only
# LoRA-tuned: at width 128 every layer then adds almost nothing to the residual stream, attention is uniform over
# the ~180 tokens, and the hidden state at <x> carries no linear trace of where the objects are (probe R^2 ~0); the
# demo stayed at its baseline. std 0.3 for every matrix, ViT included, with the ViT's position embedding at std 1
# made it learn; the same with the ViT left at 0.02, or with fan-in scaling, did not (docs/VLM_WORKFLOW.md 4b).
TINY_INIT_STD = 0.3
TINY_POS_EMBED_STD = 1.0

# Special tokens of the real Qwen3-VL tokenizer (same strings, so the chat template and processor behave the same).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]

# A Qwen-style chat template: images become <|vision_start|><|image_pad|><|vision_end|>, which the processor expands.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' or 'video' in item %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)


def _tiny_corpus():
    """Text the tiny tokenizer is trained on: prompts for many object names, so prompts tokenize compactly."""
    names = ["eggs", "apples", "bottles", "people", "cars", "sheep", "sea shells", "strawberries", "birds", "boxes",
             "red circles", "blue squares", "green triangles", "yellow stars", "purple diamonds", "orange crosses",
             "cups", "bananas", "oranges", "cans", "trees", "windows", "geese", "fish", "books", "coins", "cells"]
    lines = []
    for name in names:
        for k in (0, 1, 2, 5, 13, 120):
            for ordering in ORDERING_RULES:
                system, user = prompt_text(name, k, ordering)
                lines += [system, user]
    return lines + [" ".join(str(i) for i in range(1000)), "0123456789 .,:;!?()[]{}<>-+=*/'\""]


def build_tiny_model(out_dir):
    """Write a tiny random-init Qwen3-VL (config, safetensors weights, tokenizer, processor) to out_dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (Qwen2Tokenizer, Qwen2VLImageProcessor, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.train_from_iterator(_tiny_corpus(), trainer)
    spec = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=spec["vocab"], merges=merges, errors="replace",
                               extra_special_tokens=QWEN_SPECIAL_TOKENS[1:], model_max_length=32768)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                            size={"shortest_edge": 32 * 32 * 4, "longest_edge": 640 * 640})
    video_processor = Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=TINY_CHAT_TEMPLATE)

    ids = tokenizer.convert_tokens_to_ids
    cfg = json.loads(json.dumps(TINY_CONFIG))
    # Like Qwen's checkpoints, the embedding matrix has spare rows beyond the tokenizer (padded to a multiple of 256).
    cfg["text_config"]["vocab_size"] = ((len(tokenizer) + 64) // 256 + 1) * 256
    cfg["text_config"].update(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"))
    cfg.update(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
               vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    # The same weights on every machine (a checkpoint's adapter only fits the base it was trained on), drawn from a
    # forked RNG: a run that builds the cache must then draw its LoRA init and dropout exactly like one that finds it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg)).eval()
    rescale_random_init(model, TINY_INIT_STD, TINY_POS_EMBED_STD)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


@torch.no_grad()
def rescale_random_init(model, std, pos_embed_std, seed=0):
    """Redraw every Linear/Conv3d weight and embedding with `std` (biases 0; norms untouched) and the ViT's position
    embedding with `pos_embed_std`. Tied embedding/lm_head weights are one tensor, drawn once per module visited."""
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            module.weight.normal_(0, std, generator=g)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding) and "pos_embed" not in name:
            module.weight.normal_(0, std, generator=g)
    model.model.visual.pos_embed.weight.normal_(0, pos_embed_std, generator=g)


def cache_dir():
    return os.environ.get("VLM_REGRESSION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vlm_regression")


def build_once(path, build):
    """`path`, made by build(temp_folder) on first use and renamed into place, so parallel jobs can race safely."""
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(path))
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_model_dir():
    """The cached tiny model's folder, built on first use."""
    return build_once(os.path.join(cache_dir(), f"tiny-qwen3-vl-{TINY_VERSION}"), build_tiny_model)


def resolve_model_name(model_name):
    return tiny_model_dir() if model_name == "tiny" else model_name


def random_weights_dir(model_name):
    """A folder holding `model_name`'s architecture with random weights (for benchmarks without a download), with
    its own processor if the hub cache has it, else the tiny one (the token ids are set to match). Cached."""
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    def build(out_dir):
        config = load_architecture_config(model_name)
        try:
            processor = AutoProcessor.from_pretrained(resolve_model_name(model_name), local_files_only=True)
        except OSError:
            processor = AutoProcessor.from_pretrained(tiny_model_dir())
        ids = processor.tokenizer.convert_tokens_to_ids
        config.image_token_id, config.video_token_id = ids("<|image_pad|>"), ids("<|video_pad|>")
        config.vision_start_token_id, config.vision_end_token_id = ids("<|vision_start|>"), ids("<|vision_end|>")
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was (see build_tiny_model)
            torch.manual_seed(0)
            model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)

    return build_once(os.path.join(cache_dir(), "random-" + model_name.replace("/", "--")), build)


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
    if X_TOKEN not in tok.get_vocab() or Y_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"extra_special_tokens": [X_TOKEN, Y_TOKEN]}, replace_extra_special_tokens=False)
    tok.padding_side = "right"  # positions of real tokens do not depend on the batch's padding
    return processor


def coordinate_token_ids(processor):
    ids = processor.tokenizer.convert_tokens_to_ids([X_TOKEN, Y_TOKEN])
    assert processor.tokenizer.unk_token_id not in ids, "coordinate tokens missing from the tokenizer"
    return ids


def default_dtype(device):

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def attention_implementation(device):
    import importlib.util


    cuda = torch.device(device).type == "cuda"
    return "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"


def load_base_model(model_name, device="cpu", dtype=None, load_in_4bit=False):
    """Qwen3VLForConditionalGeneration from a hub id, folder or `tiny`. 4-bit: NF4 + double quantization with the
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
    if not load_in_4bit:
        model.to(device)
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


def lora_config(r=16, alpha=32, dropout=0.05, token_ids=()):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none",
                      trainable_token_indices={"embed_tokens": list(token_ids)} if token_ids else None)


def make_head(in_dim, hidden_dim=512, num_layers=3):
    """LayerNorm, `num_layers` Linear+GELU blocks, Linear to 1, tanh. The LayerNorm makes the head's input scale
    independent of the backbone (the 4B's final-norm outputs are far from unit scale); the last Linear starts
    near zero so early predictions sit mid-range instead of at the tanh bounds, where gradients vanish."""

    layers, d = [nn.LayerNorm(in_dim)], in_dim
    for _ in range(num_layers):
        layers += [nn.Linear(d, hidden_dim), nn.GELU()]
        d = hidden_dim
    out = nn.Linear(d, 1)
    nn.init.normal_(out.weight, std=1e-3)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out, nn.Tanh())


def regression_loss(pred, target):
    """MSE(x) + MSE(y): (total, loss_x, loss_y)."""
    loss_x = ((pred[:, 0] - target[:, 0]) ** 2).mean()
    loss_y = ((pred[:, 1] - target[:, 1]) ** 2).mean()
    return loss_x + loss_y, loss_x, loss_y


GROUPS = ("x_head", "y_head", "lora", "token_rows")  # what training must update; anything else is a bug


def param_group(name):
    """Which trainable group a parameter name belongs to."""
    return ("x_head" if name.startswith("x_head.") else "y_head" if name.startswith("y_head.")
            else "lora" if "lora_" in name else "token_rows" if "trainable_tokens" in name else "other")


class VLMRegressionModel(nn.Module):
    """A peft-wrapped Qwen3-VL plus two fp32 heads; forward(**batch) -> (B, 2) predictions in [-1, 1]."""

    def __init__(self, vlm, x_token_id, y_token_id, mlp_layers=3, head_dim=512, config=None):
        super().__init__()
        self.vlm = vlm
        hidden = vlm.get_base_model().config.text_config.hidden_size
        self.x_head = make_head(hidden, head_dim, mlp_layers).float()
        self.y_head = make_head(hidden, head_dim, mlp_layers).float()
        self.x_token_id, self.y_token_id = x_token_id, y_token_id
        self.config = dict(config or {}, mlp_layers=mlp_layers, head_dim=head_dim, hidden_size=hidden,
                           x_token_id=x_token_id, y_token_id=y_token_id)

    def token_positions(self, input_ids):
        """Index of <x> and <y> in each row; a row without exactly one of each is an error, not a silent guess."""
        import torch

        for name, tid in (("<x>", self.x_token_id), ("<y>", self.y_token_id)):
            counts = (input_ids == tid).sum(1)
            bad = (counts != 1).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"sample {bad[0]} of the batch has {int(counts[bad[0]])} {name} tokens, expected "
                                 f"exactly 1 (prompt truncated or malformed?)")
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return rows, (input_ids == self.x_token_id).int().argmax(1), (input_ids == self.y_token_id).int().argmax(1)

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, **_ignored):
        rows, x_pos, y_pos = self.token_positions(input_ids)
        backbone = self.vlm.get_base_model().model  # Qwen3VLModel: last_hidden_state is after the final norm
        vision_dtype = backbone.visual.patch_embed.proj.weight.dtype
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values.to(vision_dtype),
                       image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=False)
        hidden = out.last_hidden_state
        x = self.x_head(hidden[rows, x_pos].float())
        y = self.y_head(hidden[rows, y_pos].float())
        return torch.cat((x, y), dim=-1)

    def trainable_groups(self):
        """Named groups of trainable parameters (for the optimizer's two lrs and the gradient-flow check)."""
        groups = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault(param_group(name), []).append(p)
        return groups

    def save_pretrained(self, out_dir, processor=None):
        """adapter/ (peft format), heads.safetensors, regression_config.json, processor/ (tokenizer with <x>/<y>)."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        self.vlm.save_pretrained(os.path.join(out_dir, "adapter"))
        heads = {f"x_head.{k}": v for k, v in self.x_head.state_dict().items()}
        heads.update({f"y_head.{k}": v for k, v in self.y_head.state_dict().items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in heads.items()}, os.path.join(out_dir, "heads.safetensors"))
        with open(os.path.join(out_dir, "regression_config.json"), "w") as f:
            json.dump(dict(self.config, versions=library_versions()), f, indent=2)
        if processor is not None:
            processor.save_pretrained(os.path.join(out_dir, "processor"))

    def load_heads(self, path):
        """Both heads from save_pretrained's heads.safetensors."""
        from safetensors.torch import load_file

        heads = load_file(os.path.join(path, "heads.safetensors"))
        for name, head in (("x_head", self.x_head), ("y_head", self.y_head)):
            head.load_state_dict({k[len(name) + 1:]: v for k, v in heads.items() if k.startswith(name + ".")})

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, load_in_4bit=None, is_trainable=False):
        """(model, processor) restored from save_pretrained's folder; the base model is loaded from its recorded name."""
        from peft import PeftModel
        from transformers import AutoProcessor

        with open(os.path.join(path, "regression_config.json")) as f:
            cfg = json.load(f)
        processor = AutoProcessor.from_pretrained(os.path.join(path, "processor"))
        processor.tokenizer.padding_side = "right"
        load_in_4bit = cfg.get("load_in_4bit", False) if load_in_4bit is None else load_in_4bit
        base = load_base_model(cfg["base_model"], device, dtype, load_in_4bit)
        ids = [cfg["x_token_id"], cfg["y_token_id"]]
        ensure_token_rows(base, ids)
        vlm = PeftModel.from_pretrained(base, os.path.join(path, "adapter"), is_trainable=is_trainable)
        cfg.pop("versions", None)
        model = cls(vlm, cfg.pop("x_token_id"), cfg.pop("y_token_id"), cfg.pop("mlp_layers"), cfg.pop("head_dim"), cfg)
        model.load_heads(path)
        if load_in_4bit:  # the quantized base is already placed by its device_map; only the heads move
            model.x_head.to(device)
            model.y_head.to(device)
        else:
            model.to(device)
        return model, processor


def build_model(model_name=DEFAULT_MODEL, lora_r=16, lora_alpha=32, lora_dropout=0.05, mlp_layers=3, head_dim=512,
                device="cpu", dtype=None, load_in_4bit=False, gradient_checkpointing=False, min_pixels=None,
                max_pixels=None):
    """(VLMRegressionModel, processor) ready to train: base model, <x>/<y> tokens, LoRA, heads."""
    from peft import get_peft_model

    processor = load_processor(model_name, min_pixels, max_pixels)
    ids = coordinate_token_ids(processor)
    base = load_base_model(model_name, device, dtype, load_in_4bit)
    ensure_token_rows(base, ids)
    init_token_rows(base, ids)
    if gradient_checkpointing:
        # non-reentrant checkpointing lets gradients reach LoRA weights even though the block inputs are frozen
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    vlm = get_peft_model(base, lora_config(lora_r, lora_alpha, lora_dropout, ids))
    config = dict(base_model=model_name, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                  load_in_4bit=load_in_4bit, min_pixels=min_pixels, max_pixels=max_pixels)
    model = VLMRegressionModel(vlm, ids[0], ids[1], mlp_layers, head_dim, config)
    model.x_head.to(device)
    model.y_head.to(device)
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
# Summary: parameter counts and a memory estimate, from the architecture alone (meta device, no weights)

BUNDLED_CONFIGS = {  # published config.json of models whose architecture we can describe without the hub
    "Qwen/Qwen3-VL-4B-Thinking": "qwen3_vl_4b.json",
    "Qwen/Qwen3-VL-4B-Instruct": "qwen3_vl_4b.json",
}


def load_architecture_config(model_name):
    """Qwen3VLConfig: from a folder / `tiny`, the local HF cache, or a bundled copy of the public config."""
    from transformers import AutoConfig, Qwen3VLConfig

    name = resolve_model_name(model_name)
    if os.path.isdir(name):
        return AutoConfig.from_pretrained(name)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        if name not in BUNDLED_CONFIGS:
            return AutoConfig.from_pretrained(name)  # needs the hub
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", BUNDLED_CONFIGS[name])) as f:
            return Qwen3VLConfig(**json.load(f))


def summarize(model_name=DEFAULT_MODEL, lora_r=16, lora_alpha=32, mlp_layers=3, head_dim=512, batch_size=4,
              tokens_per_sample=350):
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
        vlm = get_peft_model(base, lora_config(lora_r, lora_alpha, 0.0, token_ids=[0, 1]))
        heads = sum(p.numel() for p in make_head(text.hidden_size, head_dim, mlp_layers).parameters()) * 2
    lora = sum(p.numel() for n, p in vlm.named_parameters() if "lora_" in n)
    token_rows = 2 * text.hidden_size
    trainable = lora + heads + token_rows
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
    return {
        "model": model_name, "total_params": total, "vision_params": vision, "language_params": total - vision,
        "embedding_rows": config.text_config.vocab_size, "embedding_params": embed,
        "lora_params": lora, "head_params": heads, "token_row_params": token_rows, "trainable_params": trainable,
        "memory_gib": {
            "assumptions": f"batch {batch_size} x {tokens_per_sample} tokens, AdamW, fp32 trainable params",
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
    print(f"head parameters      {s['head_params']:>15,}  (x head + y head)")
    print(f"<x>/<y> token rows   {s['token_row_params']:>15,}")
    print(f"trainable total      {s['trainable_params']:>15,}  ({100 * s['trainable_params'] / s['total_params']:.2f}% of the base model's size)")
    mem = s["memory_gib"]
    print(f"training memory est. ({mem['assumptions']}):")
    for key in ("bf16", "bf16_gradient_checkpointing", "4bit", "4bit_gradient_checkpointing"):
        print(f"  {key:<28} {mem[key]:>7.2f} GiB")


def smoke(model_name="tiny"):
    """One forward + backward pass on a random image: the install works end to end."""
    from PIL import Image

    model, processor = build_model(model_name)
    image = Image.fromarray(torch.randint(0, 255, (224, 224, 3), dtype=torch.uint8).numpy())
    batch = processor(text=[render_prompt(processor, "eggs", 0)], images=[image], return_tensors="pt")
    pred = model(**batch)
    loss = regression_loss(pred, torch.zeros_like(pred))[0]
    loss.backward()
    print(f"smoke ok: prediction {pred.detach().numpy().round(4).tolist()}, loss {loss.item():.4f}")


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_name", default=DEFAULT_MODEL, help="hub id, local folder, or `tiny`")
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora_alpha", type=int, default=32, help="LoRA alpha (scale alpha/r)")
    p.add_argument("--mlp_layers", type=int, default=3, choices=[2, 3, 4], help="Linear+GELU blocks per head")
    p.add_argument("--head_dim", type=int, default=512, help="width of the heads' hidden layers")
    p.add_argument("--summary", action="store_true", help="print parameter counts and a memory estimate")
    p.add_argument("--json", action="store_true", help="with --summary: print JSON")
    p.add_argument("--smoke", action="store_true", help="run one forward/backward pass")
    args = p.parse_args(argv)
    if args.summary:
        s = summarize(args.model_name, args.lora_r, args.lora_alpha, args.mlp_layers, args.head_dim)
        print(json.dumps(s, indent=2)) if args.json else print_summary(s)
    if args.smoke or not args.summary:
        smoke(args.model_name)


if __name__ == "__main__":
    main()
