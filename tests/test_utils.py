import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402


def test_normalize_convention_and_round_trip():
    w, h = 576, 384
    edges = np.array([[0, 0], [w, h], [w / 2, h / 2], [0.5, 0.5]])
    n = utils.normalize_points(edges, w, h)
    assert n.dtype == np.float32 and n.shape == (4, 2)
    np.testing.assert_allclose(n[:3], [[-1, -1], [1, 1], [0, 0]], atol=1e-7)
    np.testing.assert_allclose(n[3], [-1 + 1 / w, -1 + 1 / h], atol=1e-7)  # centre of pixel (0, 0)
    pts = np.random.default_rng(0).uniform(0, [w, h], (1000, 2))
    back = utils.denormalize_points(utils.normalize_points(pts, w, h), w, h)
    np.testing.assert_allclose(back, pts, atol=1e-4)  # float32 precision at ~600 px
    assert utils.normalize_points([], w, h).shape == (0, 2)


@pytest.mark.parametrize("size", [(224, 224), (576, 384), (640, 640)])
def test_mark_objects_changes_pixels_only_near_points(size):
    w, h = size
    img = Image.fromarray(np.full((h, w, 3), 90, np.uint8))
    before = np.array(img)
    pts = np.array([[w * 0.25, h * 0.3], [w * 0.7, h * 0.6], [w - 2.0, h - 2.0]])  # the last one is cut by the edge
    out = utils.mark_objects(img, pts)
    np.testing.assert_array_equal(np.array(img), before)  # input untouched
    changed = np.any(np.array(out) != before, axis=2)
    assert out.size == img.size and out.mode == "RGB"
    r = utils.mark_radius(w, h)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    near = np.zeros((h, w), bool)
    for x, y in pts:
        near |= (np.abs(xx - x) <= 2 * r) & (np.abs(yy - y) <= r + 2)
    assert changed.any()
    assert not (changed & ~near).any(), "a mark changed pixels far from every point"
    for x, y in pts:  # every mark is drawn (the disc covers its own point)
        assert changed[int(y), int(x)] or changed[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].any()
    assert r >= 8  # two digits stay legible even at 224 px


def test_mark_objects_many_labels_and_start_index():
    img = Image.new("RGB", (576, 384), (100, 120, 140))
    pts = np.random.default_rng(0).uniform(0, [576, 384], (1200, 2))
    out = utils.mark_objects(img, pts, start_index=5)
    assert out.size == img.size
    assert utils.mark_objects(img, np.zeros((0, 2))).tobytes() == img.tobytes()
    # different numbers -> different pixels at the same place
    one = np.array(utils.mark_objects(img, [[100, 100]], start_index=1))
    two = np.array(utils.mark_objects(img, [[100, 100]], start_index=2))
    assert (one != two).any()


def test_draw_prediction_and_side_by_side():
    img = Image.new("RGB", (224, 224), (128, 128, 128))
    out = np.array(utils.draw_prediction(img, (50.5, 60.5), (150.5, 160.5)))
    assert out[60, 50].tolist() == [255, 0, 0]  # red cross centre
    ring = out[140:182, 130:172].reshape(-1, 3)
    assert ((ring[:, 1] > 150) & (ring[:, 0] < 60)).any()  # green circle around the ground truth
    assert (out[0:20, 200:224] == 128).all()
    both = utils.side_by_side(img, Image.new("RGB", (100, 300)))
    assert both.size == (224 + 4 + 100, 300)
