"""Real photographs that installed packages ship: backgrounds and fills for the ``photo`` synthetic set, and the
mixed-aspect-ratio images of the real-checkpoint tests.

Nothing is downloaded: the pool is a fixed list of files inside scikit-image's, Ultralytics' and Matplotlib's
wheels, located without importing those packages. The list order is part of the dataset's definition (an image's
generator draws an index into it), so entries are only ever appended; data.yaml records each file's SHA-256 so a
regenerated set can be checked against the original.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from src.errors import DataError

# (package, path inside it). Natural scenes, textures and a few document/microscopy images, colour and grey.
PHOTO_FILES: tuple[tuple[str, str], ...] = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/brick.png"),
    ("skimage", "data/camera.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/coins.png"),
    ("skimage", "data/grass.png"),
    ("skimage", "data/gravel.png"),
    ("skimage", "data/hubble_deep_field.jpg"),
    ("skimage", "data/ihc.png"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/retina.jpg"),
    ("skimage", "data/page.png"),
    ("skimage", "data/text.png"),
    ("skimage", "data/moon.png"),
    ("skimage", "data/cell.png"),
    ("skimage", "data/clock_motion.png"),
    ("ultralytics", "assets/bus.jpg"),
    ("ultralytics", "assets/zidane.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
PIP_NAMES = {"skimage": "scikit-image", "ultralytics": "ultralytics", "matplotlib": "matplotlib"}


@dataclass(frozen=True)
class Photo:
    """One decoded photo (BGR uint8) and where it came from."""

    name: str  # "<package>/<path>"
    path: Path
    sha256: str
    image: np.ndarray


def locate(package: str, relative: str) -> Path:
    """Path of a file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the photo pool needs the package {PIP_NAMES.get(package, package)!r}, which is not installed; "
            f"run `pip install {PIP_NAMES.get(package, package)}` (make install does)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed {package}; reinstall it with the version in requirements.txt.")
    return path


@functools.lru_cache(maxsize=1)
def photo_pool() -> tuple[Photo, ...]:
    """Every photo of PHOTO_FILES, decoded once per process, grey images expanded to three channels."""
    photos = []
    for package, relative in PHOTO_FILES:
        path = locate(package, relative)
        data = path.read_bytes()
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"OpenCV could not decode {path}; reinstall {PIP_NAMES.get(package, package)}.")
        photos.append(Photo(f"{package}/{relative}", path, hashlib.sha256(data).hexdigest(), image))
    return tuple(photos)


def random_crop(rng: np.random.Generator, photo: np.ndarray, size: int, min_fraction: float = 0.35) -> np.ndarray:
    """A float32 square crop of ``size`` px: side ``min_fraction``-1 of the photo's short side, random place and
    mirror, resized with area interpolation, brightness and contrast jittered."""
    h, w = photo.shape[:2]
    side = max(8, int(min(h, w) * rng.uniform(min_fraction, 1.0)))
    y0 = int(rng.integers(0, h - side + 1))
    x0 = int(rng.integers(0, w - side + 1))
    crop = photo[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    gain, offset = rng.uniform(0.6, 1.15), rng.uniform(-25, 25)
    return np.clip(crop * gain + offset, 0, 255)


def pool_record() -> list[dict[str, str]]:
    """What data.yaml records of the pool: each file's name and SHA-256, in pool order."""
    return [{"name": p.name, "sha256": p.sha256} for p in photo_pool()]
