"""
The counting prompt: the <x>/<y> tokens whose hidden states the heads read, the ordering rules, the prompt text, its
chat messages, and the encoding of a batch (images + prompts) into model inputs. One source of truth: training,
validation, evaluation and the tiny model's tokenizer corpus all use these functions.

    python -c "import prompt; print(*prompt.prompt_text('eggs', 3), sep='\n\n')"
"""

import functools

import inflect
import torch

X_TOKEN, Y_TOKEN = "<x>", "<y>"

# Rule 3 of the prompt must state the order the targets were produced in (utils.order_points).
ORDERING_RULES = {
    "reading_order": "Count systematically from top-to-bottom, left-to-right",
    "left_to_right": "Count systematically from left-to-right, top-to-bottom",
    "nearest_neighbor": "Count systematically from the top-left object, always moving to the nearest unmarked object",
}


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


def encode_batch(processor, images, object_types, nums_marked, ordering="reading_order"):
    """Model inputs for marked images and their prompts: every tensor the processor returns (input_ids,
    attention_mask, pixel_values, image_grid_thw, mm_token_type_ids, ...), right-padded to the longest prompt.
    Training's collate and evaluation's counting loop both build their batches here."""
    texts = [render_prompt(processor, t, k, ordering) for t, k in zip(object_types, nums_marked)]
    batch = processor(text=texts, images=list(images), padding=True, return_tensors="pt")
    return {k: v for k, v in batch.items() if torch.is_tensor(v)}
