"""
Models built offline, cached on disk: the tiny model (a random-init Qwen3-VL with the real architecture's code
path, built in seconds) and random-weight copies of real architectures (for benchmarks without a download).

    python -c "import tiny_model; print(tiny_model.tiny_model_dir())"      # build (or find) the cached tiny model

The cache lives in $VLM_REGRESSION_CACHE, else $XDG_CACHE_HOME/vlm_regression, else ~/.cache/vlm_regression.
"""

import gc
import json
import os
import shutil
import tempfile

import torch
import torch.nn as nn

from prompt import ORDERING_RULES, prompt_text

# -----------------------------------------------------------------------------
# The tiny model: its architecture, random weights, tokenizer and chat template

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


# -----------------------------------------------------------------------------
# The cache: each model folder is built once, in a temp folder renamed into place


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


# The shipped pretrained tiny base (pretrain_tiny.py wrote it; its recipe.json says how): `--model_name tiny`.
TINY_BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_base")
TINY_NAMES = ("tiny", "tiny-random")


def resolve_model_name(model_name):
    """A folder or hub id for --model_name: `tiny` is the shipped pretrained base, `tiny-random` the random-init
    tiny model (built into the cache on first use); anything else is passed through."""
    if model_name == "tiny-random":
        return tiny_model_dir()
    if model_name == "tiny":
        if not os.path.exists(os.path.join(TINY_BASE_DIR, "config.json")):
            raise FileNotFoundError(f"{TINY_BASE_DIR}: the pretrained tiny base is missing (rebuild it with "
                                    f"pretrain_tiny.py, see its recipe.json) or use --model_name tiny-random")
        return TINY_BASE_DIR
    return model_name


# -----------------------------------------------------------------------------
# Real architectures with random weights (benchmarks, the summary): no download needed

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
        del model
        gc.collect()  # the model's reference cycles would otherwise keep its 8.9 GB (4B) alive into the caller's load

    return build_once(os.path.join(cache_dir(), "random-" + model_name.replace("/", "--")), build)
