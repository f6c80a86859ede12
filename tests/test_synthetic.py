"""Synthetic dataset: determinism, label validity, tight boxes, and loading through ultralytics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from src.data.synthetic import CLASS_NAMES, EXTRA_CLASS_NAMES, generate_dataset, main, render_image
from src.errors import DataError


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parent.parent.name in ("images", "labels")
    }


def _labels(root: Path, split: str) -> dict[str, np.ndarray]:
    return {p.stem: np.loadtxt(p, ndmin=2) for p in sorted((root / "labels" / split).glob("*.txt"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("a") / "shapes", 6, 3, imgsz=96, seed=7, progress=False)


def test_same_seed_gives_identical_bytes(small_set, tmp_path):
    again = generate_dataset(tmp_path / "b", 6, 3, imgsz=96, seed=7, progress=False)
    first, second = _files(small_set.parent), _files(again.parent)
    assert len(first) == 2 * (6 + 3)
    assert first == second


def test_other_seed_differs_and_prefix_is_stable(small_set, tmp_path):
    other = _files(generate_dataset(tmp_path / "c", 6, 3, imgsz=96, seed=8, progress=False).parent)
    first = _files(small_set.parent)
    assert all(first[k] != other[k] for k in first if k.startswith("images"))
    # Per-image seeding: a shorter split reproduces the first images of a longer one.
    shorter = _files(generate_dataset(tmp_path / "d", 2, 1, imgsz=96, seed=7, progress=False).parent)
    assert shorter == {k: first[k] for k in shorter}


def test_layout_and_yaml(small_set):
    root = small_set.parent
    data = yaml.safe_load(small_set.read_text())
    assert data["path"] == str(root) and data["train"] == "images/train" and data["val"] == "images/val"
    assert data["nc"] == 6 and data["names"] == list(CLASS_NAMES)
    assert data["generator"]["seed"] == 7
    for split, n in (("train", 6), ("val", 3)):
        images = sorted(p.stem for p in (root / "images" / split).glob("*.jpg"))
        labels = sorted(p.stem for p in (root / "labels" / split).glob("*.txt"))
        assert images == labels and len(images) == n


def test_labels_are_valid_normalised_boxes(small_set):
    root = small_set.parent
    rows = np.concatenate([a for split in ("train", "val") for a in _labels(root, split).values()])
    assert rows.shape[1] == 5 and len(rows) >= 9  # every image has at least one object
    cls, cx, cy, w, h = rows.T
    assert np.array_equal(cls, np.round(cls)) and cls.min() >= 0 and cls.max() < 6
    assert (w > 0).all() and (h > 0).all()
    assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all()
    assert (cy - h / 2 >= -1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all()
    # Boxes are whole pixels at 96 px: corners land on multiples of 1/96 up to the 6-decimal rounding.
    corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * 96
    assert np.abs(corners - np.round(corners)).max() < 1e-3


@pytest.mark.parametrize("names", [CLASS_NAMES, *((n,) for n in EXTRA_CLASS_NAMES)], ids=lambda n: "+".join(n))
@pytest.mark.parametrize("seed", range(24))
def test_box_is_tight_to_drawn_pixels(seed, names):
    """On a flat background the shape's pixels, found by colour, must fill the label box to within 1 px (the six
    shapes drawn at random, and each class the photo set adds)."""
    image, boxes = render_image(np.random.default_rng(seed), 96, names=names, plain=True)
    assert len(boxes) == 1
    _, x0, y0, x1, y1 = boxes[0]
    pixels = image.reshape(-1, 3).astype(np.int32)
    values, counts = np.unique(pixels, axis=0, return_counts=True)
    order = np.argsort(counts)[::-1]
    background, shape = values[order[0]], values[order[1]]  # shapes cover under half the image
    contrast = np.linalg.norm(shape - background)
    if contrast < 40:
        pytest.skip("shape colour too close to the background to segment by colour")
    # Coverage of each pixel from its colour: 0 at the background, 1 at the fill (anti-aliased edges between).
    coverage = ((pixels - background) @ (shape - background)) / contrast**2
    ys, xs = np.nonzero(coverage.reshape(96, 96) >= 0.5)
    measured = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert np.abs(np.subtract(measured, (x0, y0, x1, y1))).max() <= 1, (measured, boxes[0])


def test_class_subset_and_bad_arguments(tmp_path):
    path = generate_dataset(tmp_path / "sub", 4, 2, imgsz=64, seed=1, classes=["star", "ring"], progress=False)
    assert yaml.safe_load(path.read_text())["names"] == ["star", "ring"]
    assert max(int(a[:, 0].max()) for a in _labels(path.parent, "train").values()) <= 1
    with pytest.raises(DataError, match="unknown class 'sqare'.*Did you mean 'square'"):
        generate_dataset(tmp_path / "x", 1, 1, classes=["sqare"])
    with pytest.raises(DataError, match="imgsz.*>= 32"):
        generate_dataset(tmp_path / "x", 1, 1, imgsz=16)
    with pytest.raises(DataError, match="n_val.*>= 1"):
        generate_dataset(tmp_path / "x", 1, 0)


def test_refuses_foreign_folder_and_replaces_its_own(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        generate_dataset(foreign, 1, 1, imgsz=64)
    assert (foreign / "notes.txt").read_text() == "keep me"

    ours = tmp_path / "ours"
    generate_dataset(ours, 5, 2, imgsz=64, progress=False)
    generate_dataset(ours, 2, 1, imgsz=64, progress=False)  # a smaller regeneration leaves no stale images
    assert len(list((ours / "images" / "train").iterdir())) == 2


def test_cli_writes_dataset(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "cli"), "--train", "2", "--val", "1", "--imgsz", "64", "--ext", "png"]) == 0
    assert Path(capsys.readouterr().out.strip()) == tmp_path / "cli" / "data.yaml"
    assert len(list((tmp_path / "cli" / "images" / "val").glob("*.png"))) == 1
    assert main(["--out", str(tmp_path / "cli2"), "--classes", "heptagon"]) == 2


def test_ultralytics_loads_dataset_offline(tiny_dataset, socket_guard):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(tiny_dataset), autodownload=False)
    assert data["nc"] == 3 and data["names"] == {0: "circle", 1: "square", 2: "triangle"}
    cfg = get_cfg(overrides={"imgsz": 64, "rect": False, "cache": False, "fraction": 1.0})
    dataset = build_yolo_dataset(cfg, data["val"], batch=4, data=data, mode="val")
    batch = next(iter(build_dataloader(dataset, batch=4, workers=0, shuffle=False, pin_memory=False, device="cpu")))
    assert tuple(batch["img"].shape) == (4, 3, 64, 64)
    labels = _labels(tiny_dataset.parent, "val")
    for i, im_file in enumerate(batch["im_file"]):
        mine = labels[Path(im_file).stem]
        theirs = np.concatenate(
            [batch["cls"][batch["batch_idx"] == i].numpy(), batch["bboxes"][batch["batch_idx"] == i].numpy()], axis=1
        )
        # 64 px images at imgsz 64: letterboxing is the identity, so boxes come back as written.
        order_m, order_t = np.lexsort(mine.T[::-1]), np.lexsort(theirs.T[::-1])
        np.testing.assert_allclose(theirs[order_t], mine[order_m], rtol=0, atol=1e-6)
