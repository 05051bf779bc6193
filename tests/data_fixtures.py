"""Tiny FSC-147 and OmniCount-191 datasets written in their exact on-disk layouts (see ../shared/DATA_FORMATS.md),
traps included. Each writer returns the expected per-sample counts, computed here from what was written, so the
tests check the loaders against numbers they did not produce."""

import json
import os

import numpy as np
from PIL import Image


def _write_image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def write_fsc147(root):
    """FSC-147 with 3 train, 2 val, 1 test images. Traps: annotation H/W = the original size (unlike the file),
    a point outside the image, a corrupt (non-image) file in train, an unused extra key.
    Returns {split: {image name: (class, points float32 (N, 2) as expected after loading)}} and `num_clipped`."""
    img_dir = os.path.join(root, "images_384_VarV2")
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    spec = {  # name: (split, class, file w, file h, n points)
        "2.jpg": ("train", "eggs", 576, 384, 12),
        "3.jpg": ("train", "sea shells", 512, 384, 40),
        "4.jpg": ("train", "eggs", 300, 384, 7),
        "10.jpg": ("val", "apples", 469, 384, 9),
        "11.jpg": ("val", "sea shells", 576, 384, 25),
        "20.jpg": ("test", "bottles", 384, 384, 8),
    }
    annotations, splits, classes, expected = {}, {"train": [], "val": [], "test": []}, [], {}
    for i, (name, (split, cls, w, h, n)) in enumerate(spec.items()):
        _write_image(os.path.join(img_dir, name), w, h, i)
        pts = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], 1)
        expected.setdefault(split, {})[name] = (cls, pts.astype(np.float32))
        box = [[10, 10], [10, 30], [30, 30], [30, 10]]
        annotations[name] = {"H": int(h * 2.77), "W": int(w * 2.77), "points": pts.tolist(),
                             "box_examples_coordinates": [box] * 3, "density_path": f"x/{name[:-4]}.npy", "r": [1, 1]}
        splits[split].append(name)
        classes.append(f"{name}\t{cls}\n")
    # a point just outside the right edge of 2.jpg: clipped to x = W
    annotations["2.jpg"]["points"].append([580.0, 100.0])
    expected["train"]["2.jpg"] = ("eggs", np.vstack([expected["train"]["2.jpg"][1], [[576.0, 100.0]]]).astype(np.float32))
    # a corrupt image listed in train: skipped, not a crash
    with open(os.path.join(img_dir, "99.jpg"), "wb") as f:
        f.write(b"this is not a jpeg")
    annotations["99.jpg"] = {"H": 10, "W": 10, "points": [[1, 1]] * 7, "box_examples_coordinates": []}
    splits["train"].append("99.jpg")
    classes.append("99.jpg\teggs\n")
    splits["val_coco"], splits["test_coco"] = ["10.jpg"], ["20.jpg"]
    with open(os.path.join(root, "annotation_FSC147_384.json"), "w") as f:
        json.dump(annotations, f)
    with open(os.path.join(root, "Train_Test_Val_FSC_147.json"), "w") as f:
        json.dump(splits, f)
    with open(os.path.join(root, "ImageClasses_FSC147.txt"), "w") as f:
        f.writelines(classes)
    return {"expected": expected, "num_clipped": 1, "corrupt": ["99.jpg"]}


def write_omnicount(root):
    """OmniCount-191 with two categories. Fruits has train/valid/test; Household has train only (the missing-split
    trap). Images are multi-label, each JSON carries Roboflow's placeholder category 0, and Fruits/train holds a
    corrupt image. Returns {"expected": {(category, split): {(file name, type): count}}, ...}."""
    rng = np.random.default_rng(1)
    layout = {
        ("Fruits", "train"): 4, ("Fruits", "valid"): 2, ("Fruits", "test"): 2, ("Household", "train"): 3,
    }
    types = {"Fruits": ["apple", "banana", "orange"], "Household": ["bottle", "cup"]}
    expected = {}
    for (cat, split), n_images in layout.items():
        d = os.path.join(root, cat, split)
        os.makedirs(d, exist_ok=True)
        cats = [{"id": 0, "name": f"{cat.lower()}-xyz", "supercategory": "none"}]
        cats += [{"id": i + 1, "name": t, "supercategory": f"{cat.lower()}-xyz"} for i, t in enumerate(types[cat])]
        images, anns, exp = [], [], {}
        for i in range(n_images):
            name = f"c-{i}-_jpg.rf.{i:032x}.jpg"
            _write_image(os.path.join(d, name), 640, 640, 100 * len(cat + split) + i)
            images.append({"id": i, "file_name": name, "width": 640, "height": 640, "license": 1})
            # 1 or 2 types per image (multi-label), 1..9 boxes each
            for t in rng.choice(len(types[cat]), 1 + i % 2, replace=False).tolist():
                n = int(rng.integers(1, 10))
                for _ in range(n):
                    x, y = rng.uniform(0, 600, 2)
                    w, h = rng.uniform(5, 40, 2)
                    anns.append({"id": len(anns), "image_id": i, "category_id": t + 1, "bbox": [x, y, w, h],
                                 "area": w * h, "segmentation": [], "iscrowd": 0})
                exp[(name, types[cat][t])] = n
        if (cat, split) == ("Fruits", "train"):  # corrupt image with annotations
            name = "bad-_jpg.rf.0.jpg"
            with open(os.path.join(d, name), "wb") as f:
                f.write(b"\xff\xd8 truncated garbage")
            images.append({"id": 99, "file_name": name, "width": 640, "height": 640})
            anns.append({"id": len(anns), "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
                         "segmentation": [], "iscrowd": 0})
        with open(os.path.join(d, "_annotations.coco.json"), "w") as f:
            json.dump({"info": {}, "licenses": [], "categories": cats, "images": images, "annotations": anns}, f)
        expected[(cat, split)] = exp
    return {"expected": expected, "types": types}
