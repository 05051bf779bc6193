"""The synthetic data: deterministic from (seed, split, index), the named type drawn where its points say, the two
background kinds placing the same objects."""
import numpy as np
import pytest

import dataset
import synthetic_data
from utils import DataError


def test_synthetic_is_deterministic_and_named_type_is_drawn():
    """A split is the same on every load, other splits differ, and each record's points sit on its type's colour."""
    cfg = synthetic_data.SyntheticConfig(num_train=20, num_val=5, max_distractor_types=2, background="varied")
    a, _ = dataset.load_records("synthetic", split="train", seed=0, synthetic=cfg)
    b, _ = dataset.load_records("synthetic", split="train", seed=0, synthetic=cfg)
    c, _ = dataset.load_records("synthetic", split="val", seed=0, synthetic=cfg)
    assert [(r.image_id, r.object_type, r.points.tolist()) for r in a] == \
           [(r.image_id, r.object_type, r.points.tolist()) for r in b]
    assert a[0].points.tolist() != c[0].points.tolist()
    assert len({r.image_id for r in a}) == 20 and len(a) > 20  # distractor types make several samples per image
    for r in a[:10]:
        img = np.array(r.load_image())
        assert img.shape == (224, 224, 3)
        colour = synthetic_data.COLOURS[r.object_type.split()[0]]
        for x, y in r.points:  # the object's centre pixel has the named type's colour
            np.testing.assert_allclose(img[int(y), int(x)], colour, atol=2)
        assert 1 <= len(r.points) <= cfg.max_count


def test_synthetic_background_kinds():
    """plain and varied backgrounds place the same objects; plain is mid grey, varied differs image to image."""
    plain, varied = (synthetic_data.SyntheticConfig(num_train=8, background=b) for b in ("plain", "varied"))
    lp = [synthetic_data.synthetic_layout((0, 0, i), plain) for i in range(8)]
    lv = [synthetic_data.synthetic_layout((0, 0, i), varied) for i in range(8)]
    assert [l["objects"] for l in lp] == [l["objects"] for l in lv]  # the same objects, only the background differs
    corners = [np.array(synthetic_data.render_synthetic(l))[[0, 0, -1, -1], [0, -1, 0, -1]] for l in lp + lv]
    assert all((c == 128).all() for c in corners[:8])  # plain: mid grey everywhere
    assert len({c.tobytes() for c in corners[8:]}) == 8  # varied: each image its own
    with pytest.raises(DataError, match="background"):
        synthetic_data.synthetic_layout((0, 0, 0), synthetic_data.SyntheticConfig(background="noisy"))
