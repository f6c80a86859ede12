"""The photo benchmark set and the real-checkpoint set: real photos from installed packages, reproducible."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from src.data.photos import PHOTO_FILES, locate, photo_pool
from src.data.synthetic import ALL_CLASS_NAMES, CLASS_NAMES, generate_dataset, render_image
from src.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.parent.name in ("images", "labels")}


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("p") / "photo", 12, 4, imgsz=128, seed=3, difficulty="photo",
                            progress=False)


def test_photo_set_is_reproducible_and_records_its_photos(photo_set, tmp_path):
    again = generate_dataset(tmp_path / "again", 12, 4, imgsz=128, seed=3, difficulty="photo", progress=False)
    assert _files(photo_set.parent) == _files(again.parent)
    data = yaml.safe_load(photo_set.read_text())
    assert data["nc"] == 12 and tuple(data["names"]) == ALL_CLASS_NAMES
    recorded = data["generator"]["photos"]
    assert [r["name"] for r in recorded] == [f"{pkg}/{rel}" for pkg, rel in PHOTO_FILES]
    for r, (pkg, rel) in zip(recorded, PHOTO_FILES):
        assert r["sha256"] == hashlib.sha256(locate(pkg, rel).read_bytes()).hexdigest()


def test_photo_scenes_draw_the_new_classes(photo_set):
    classes = np.concatenate([np.loadtxt(p, ndmin=2)[:, 0] for p in (photo_set.parent / "labels").rglob("*.txt")
                              if p.stat().st_size])
    assert set(classes.astype(int)) & set(range(len(CLASS_NAMES), len(ALL_CLASS_NAMES)))


def test_photo_scene_background_is_a_pool_photo(monkeypatch):
    """With a pool of one flat green photo, the scene's ground is that green (jittered), not a drawn texture."""
    import src.data.synthetic as synthetic
    from src.data.photos import Photo

    flat = np.empty((200, 300, 3), np.uint8)
    flat[:] = (10, 200, 30)  # BGR
    monkeypatch.setattr(synthetic, "photo_pool", lambda: (Photo("test/flat", Path("flat"), "0", flat),))
    for seed in range(3):
        image, _ = render_image(np.random.default_rng(seed), 128, difficulty="photo")
        b, g, r = np.median(image.reshape(-1, 3), axis=0)
        assert g > 100 and b < 70 and r < 80, (seed, b, g, r)
    image, _ = render_image(np.random.default_rng(0), 128, difficulty="hard")  # the drawn grounds are not green
    b, g, r = np.median(image.reshape(-1, 3), axis=0)
    assert not (g > 100 and b < 70 and r < 80)


def test_pool_photos_have_mixed_aspect_ratios():
    ratios = {round(p.image.shape[1] / p.image.shape[0], 2) for p in photo_pool()}
    assert min(ratios) < 0.9 and max(ratios) > 1.3 and 1.0 in ratios


def test_missing_package_names_what_to_install():
    with pytest.raises(DataError, match="pip install no_such_pkg_xyz"):
        locate("no_such_pkg_xyz", "a.png")
    with pytest.raises(DataError, match="missing from the installed skimage"):
        locate("skimage", "data/no_such_photo.png")


def test_unknown_class_suggests_the_new_names(tmp_path):
    with pytest.raises(DataError, match="Did you mean 'hexagon'"):
        generate_dataset(tmp_path / "x", 1, 1, imgsz=64, classes=["hexagn"], progress=False)
