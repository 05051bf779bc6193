"""The prompt: its exact text, the object names in it, one <x> and one <y> in every rendered prompt."""
import numpy as np
import pytest
from PIL import Image

import prompt
import utils
from model_vlm_regression import coordinate_token_ids


def test_prompt_matches_the_original_text(tiny_processor):
    """The prompt is the original code's, word for word: a trained checkpoint depends on every token of it."""
    system, user = prompt.prompt_text("eggs", 5)
    assert system == "You are a vision assistant that locates eggs in images systematically."
    assert user == (
        "Count the eggs in this image. 5 objects are already marked with numbered labels.\n\n"
        "Task: Predict the (x, y) location of the next unmarked egg.\n\n"
        "Rules:\n1. Output x, y as normalized coordinates in [-1, 1]\n"
        "2. If all eggs are marked, output x=-1, y=-1\n"
        "3. Count systematically from top-to-bottom, left-to-right\n\nNext location: <x> <y>")
    assert "1 object is already marked" in prompt.prompt_text("eggs", 1)[1]
    rendered = prompt.render_prompt(tiny_processor, "eggs", 5)
    assert rendered.count("<|image_pad|>") == 1 and user in rendered


def test_object_names_in_either_form():
    """An object type given in the singular or the plural names the same (singular, plural) pair."""
    assert prompt.object_names("apple") == ("apple", "apples")
    assert prompt.object_names("people") == ("person", "people")
    assert prompt.object_names("sea shells") == ("sea shell", "sea shells")
    assert prompt.object_names("glass") == ("glass", "glasses")


def test_every_ordering_has_its_rule():
    """Rule 3 states the order the targets were produced in: one rule per ordering utils.order_points knows."""
    assert tuple(prompt.ORDERING_RULES) == utils.ORDERINGS


@pytest.mark.parametrize("ordering", prompt.ORDERING_RULES)
def test_each_prompt_has_each_coordinate_token_once(tiny_processor, ordering):
    """Whatever the object name (even one spelling "<y>"), the tokenized prompt holds exactly one <x> and one <y>."""
    x_id, y_id = coordinate_token_ids(tiny_processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for name, k in [("eggs", 0), ("x-ray films", 1), ("<y> signs", 3), ("people", 120)]:
        ids = prompt.encode_batch(tiny_processor, [image], [name], [k], ordering)["input_ids"][0]
        assert (ids == x_id).sum() == 1 and (ids == y_id).sum() == 1, name


def test_encode_batch_is_the_processor_on_the_rendered_prompts(tiny_processor):
    """A batch is exactly what the processor makes of the rendered prompts and images, right-padded."""
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((64, 96), (96, 64))]
    batch = prompt.encode_batch(tiny_processor, images, ["eggs", "sea shells"], [0, 12], "left_to_right")
    texts = [prompt.render_prompt(tiny_processor, t, k, "left_to_right") for t, k in (("eggs", 0), ("sea shells", 12))]
    expected = tiny_processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert set(batch) == {k for k, v in expected.items() if hasattr(v, "shape")}
    for key, value in batch.items():
        assert (value == expected[key]).all(), key
