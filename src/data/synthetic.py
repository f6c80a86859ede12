"""Deterministic synthetic detection dataset: coloured shapes in clutter.

The embedded default data of the toolkit, so QAT can be trained, compared and tested
without downloads. Each image holds 1-8 labelled shapes of six classes, sized from 6 %
to 60 % of the image side, rotated, stretched, filled with solid, striped or noisy
colour, partly overlapping (every labelled shape stays at least half visible) and
partly cut by the border, on a textured background (gradient, value noise, stripes or
tiles) with unlabelled clutter (irregular blobs, lines, speckles), sensor noise and
sometimes blur. Boxes are tight to a shape's drawn pixels (coverage >= 0.5) and amodal, as
in COCO: they span the whole shape even where a later one hides part of it.

``--difficulty photo`` is the benchmark set where 8-bit is not free: twelve classes (six look-alikes added), up to
12 objects from 3 % of the side, on crops of real photos that installed packages ship (src.data.photos), with
photo-textured and low-contrast fills and unlabelled occluders drawn over the shapes.

Images are JPEG at quality 95: about a quarter of PNG's size on these noisy textures,
and compression artefacts like real camera data. The same seed gives byte-identical
files with the same OpenCV build. Each image draws from its own generator seeded by
(seed, split, index), so a split's first N images do not depend on how many follow.

CLI::

    python -m src.data.synthetic --out dataset/shapes --train 200 --val 500 --imgsz 256 --seed 0
"""

from __future__ import annotations

import argparse
import difflib
import math
import shutil
import sys
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml
from tqdm import tqdm

from src.data.photos import photo_pool, pool_record, random_crop
from src.errors import DataError

CLASS_NAMES = ("circle", "square", "triangle", "star", "cross", "ring")
# The ``photo`` set's further classes: outlines close to the first six (pentagon/hexagon/circle, diamond/square) so
# that telling them apart at small sizes rests on fine score differences, where 8-bit ranges cost accuracy.
EXTRA_CLASS_NAMES = ("pentagon", "hexagon", "diamond", "arrow", "crescent", "semicircle")
ALL_CLASS_NAMES = CLASS_NAMES + EXTRA_CLASS_NAMES
GENERATOR_NAME = "src.data.synthetic"
GENERATOR_VERSION = 2  # bump when the rendering changes, so old sets are recognisably different

MAX_OBJECTS = 8
SIZE_RANGE = (0.06, 0.6)  # object extent as a fraction of the image side, sampled log-uniformly


@dataclass(frozen=True)
class Difficulty:
    """How cluttered a scene is. ``easy`` (the default) lets a from-scratch yolov8n reach mAP50-95 around 0.5-0.7
    in ~30 epochs on 200 images at 256 px; ``hard`` is for stress tests (most models stay far lower)."""

    max_objects: int
    size_range: tuple[float, float]
    max_blobs: int
    max_lines: int
    max_speckles: int
    noise_sigma: tuple[float, float]
    dark_background: bool  # backgrounds darker and greyer than the shapes: contrast comes from the shapes
    solid_fill: float  # probability that a shape is filled with one colour
    photo_background: bool = False  # a crop of a real photo (src.data.photos) instead of a drawn texture
    photo_fill: float = 0.0  # probability that a shape is filled with a tinted crop of another photo
    low_contrast: float = 0.0  # probability that a shape's colour is drawn near the background under it
    max_occluders: int = 0  # unlabelled blobs drawn over the shapes
    classes: tuple[str, ...] = CLASS_NAMES  # the default class list


DIFFICULTIES = {
    "easy": Difficulty(4, (0.15, 0.55), 2, 0, 8, (1.0, 3.0), True, 0.8),
    "hard": Difficulty(MAX_OBJECTS, SIZE_RANGE, 4, 3, 30, (2.0, 8.0), False, 0.5),
    # The benchmark set where 8-bit is not free: twelve look-alike classes, many small objects on real photos,
    # photo-textured and low-contrast fills, occluders over the shapes.
    "photo": Difficulty(12, (0.03, 0.4), 3, 3, 30, (2.0, 6.0), False, 0.4, photo_background=True, photo_fill=0.25,
                        low_contrast=0.3, max_occluders=2, classes=ALL_CLASS_NAMES),
}
MIN_VISIBLE = 0.5  # a placement that would hide more of an earlier shape is retried elsewhere
PLACEMENT_TRIES = 20
JPEG_QUALITY = 95
SPLITS = ("train", "val")
_SUBPIXEL_BITS = 4  # cv2 drawing shift: vertices at 1/16 px for smooth small shapes
_SUBPIXEL = 1 << _SUBPIXEL_BITS


def generate_dataset(
    out: str | Path,
    n_train: int,
    n_val: int,
    imgsz: int = 256,
    seed: int = 0,
    classes: Sequence[str] | None = None,
    ext: str = "jpg",
    progress: bool | None = None,
    difficulty: str = "easy",
) -> Path:
    """Write a YOLO-format dataset and return its data.yaml.

    Args:
        out: Dataset root. Created if missing; if it already holds a dataset made by this
            generator, its images and labels are replaced; any other non-empty folder is refused.
        n_train: Number of training images (>= 1).
        n_val: Number of validation images (>= 1).
        imgsz: Square image side in pixels (>= 32).
        seed: Seed; equal arguments give byte-identical files.
        classes: Subset of ALL_CLASS_NAMES to draw, in label order; the difficulty's default list when None
            (CLASS_NAMES, or all twelve for ``photo``).
        ext: "jpg" (quality 95) or "png" (lossless, about four times larger).
        progress: Show a progress bar; by default only for 200 images or more.
        difficulty: "easy" (default), "hard" or "photo" (see :class:`Difficulty`).

    Returns:
        Path of the written data.yaml (absolute ``path``, ``train``, ``val``, ``nc``, ``names``).

    Raises:
        DataError: A bad argument or an output folder this generator did not make.
    """
    if difficulty not in DIFFICULTIES:
        raise DataError(f"difficulty={difficulty!r} is unknown; choose from {', '.join(DIFFICULTIES)}")
    names = _check_classes(classes, DIFFICULTIES[difficulty].classes)
    _check_args(n_train, n_val, imgsz, ext)
    root = Path(out).expanduser().resolve()
    prepare_output(root)

    counts = {"train": n_train, "val": n_val}
    total = n_train + n_val
    bar = _progress_bar(total, progress)
    for split_index, split in enumerate(SPLITS):
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for i in range(counts[split]):
            rng = np.random.default_rng([seed, split_index, i])
            image, boxes = render_image(rng, imgsz, names, difficulty=difficulty)
            stem = f"{i:06d}"
            _write_image(image_dir / f"{stem}.{ext}", image, ext)
            (label_dir / f"{stem}.txt").write_text(_label_text(boxes, imgsz), encoding="utf-8")
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    data = {
        "path": str(root),
        "train": "images/train",
        "val": "images/val",
        "nc": len(names),
        "names": list(names),
        "generator": {
            "name": GENERATOR_NAME,
            "version": GENERATOR_VERSION,
            "seed": seed,
            "imgsz": imgsz,
            "n_train": n_train,
            "n_val": n_val,
            "ext": ext,
            "difficulty": difficulty,
        },
    }
    if DIFFICULTIES[difficulty].photo_background:
        data["generator"]["photos"] = pool_record()
    yaml_path = root / "data.yaml"
    header = f"# Synthetic shapes dataset written by `python -m {GENERATOR_NAME}`; regenerate rather than edit.\n"
    yaml_path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return yaml_path


def render_image(
    rng: np.random.Generator,
    imgsz: int,
    names: Sequence[str] = CLASS_NAMES,
    plain: bool = False,
    difficulty: str = "easy",
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """Draw one scene.

    Args:
        rng: Source of all randomness for this image.
        imgsz: Square image side in pixels.
        names: Shapes to draw (from CLASS_NAMES); a box's class is its shape's index here.
        plain: One solid shape on a flat background without noise or clutter, for checking
            that boxes are tight to the drawn pixels.
        difficulty: Clutter profile, a key of DIFFICULTIES.

    Returns:
        BGR uint8 image of shape (imgsz, imgsz, 3) and boxes as (class, x0, y0, x1, y1) in
        pixels, x1/y1 exclusive, clipped to the image.
    """
    s = imgsz
    d = DIFFICULTIES[difficulty]
    if plain:
        canvas = np.empty((s, s, 3), np.float32)
        canvas[:] = _random_colour(rng)
    else:
        if d.photo_background:
            pool = photo_pool()
            canvas = random_crop(rng, pool[int(rng.integers(len(pool)))].image, s)
        else:
            canvas = _background(rng, s, dark=d.dark_background)
        for _ in range(int(rng.integers(0, d.max_blobs + 1))):
            _draw_blob(rng, canvas, dark=d.dark_background)
        _draw_lines(rng, canvas, int(rng.integers(0, d.max_lines + 1)))

    n_objects = 1 if plain else int(rng.integers(1, d.max_objects + 1))
    shapes: list[tuple[int, np.ndarray]] = []  # (class, full mask): boxes are amodal, as in COCO
    visible: list[np.ndarray] = []
    for _ in range(n_objects):
        cls = int(rng.integers(len(names)))
        colour = _random_colour(rng)
        for _ in range(PLACEMENT_TRIES):
            alpha = _shape_alpha(rng, names[cls], s, d.size_range)
            solid = alpha >= 0.5
            if solid.sum() >= 4 and all(
                (vis & ~solid).sum() >= MIN_VISIBLE * full.sum() for vis, (_, full) in zip(visible, shapes)
            ):
                break
        else:
            continue  # every try hid too much of an earlier shape: draw one fewer
        visible = [vis & ~solid for vis in visible] + [solid]
        shapes.append((cls, solid))
        if d.photo_background and not plain:
            texture = _photo_texture(rng, s, canvas, solid, colour, d)
        else:
            texture = colour if plain else _texture(rng, s, colour, d.solid_fill)
        canvas += alpha[..., None] * (texture - canvas)

    if not plain:
        if d.max_occluders:  # after the shapes, so they hide parts of them; boxes stay amodal
            for _ in range(int(rng.integers(0, d.max_occluders + 1))):
                _draw_blob(rng, canvas)
        _draw_lines(rng, canvas, int(rng.integers(0, min(d.max_lines, 2) + 1)), max_thickness=1)
        _draw_speckles(rng, canvas, d.max_speckles)
        if rng.random() < 0.3:
            canvas = cv2.GaussianBlur(canvas, (0, 0), float(rng.uniform(0.4, 1.0)))
        canvas += rng.normal(0.0, rng.uniform(*d.noise_sigma), canvas.shape).astype(np.float32)

    boxes = [(cls, *_mask_box(mask)) for cls, mask in shapes]
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), boxes


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1), end-exclusive, of a non-empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def _random_colour(rng: np.random.Generator, dark: bool = False) -> np.ndarray:
    """A BGR colour from random hue, saturation 0.25-1 and value 0.2-1 (dark: greyish, value 0.1-0.35)."""
    if dark:
        hsv = np.array([[[rng.uniform(0, 180), rng.uniform(0, 80), rng.uniform(25, 90)]]], np.float32)
    else:
        hsv = np.array([[[rng.uniform(0, 180), rng.uniform(64, 255), rng.uniform(50, 255)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _coords(s: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:s, 0:s].astype(np.float32)
    return xs, ys


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + t[..., None] * (b - a)


def _background(rng: np.random.Generator, s: int, dark: bool = False) -> np.ndarray:
    """Textured float32 BGR background: gradient, value noise, stripes or tiles between two colours."""
    c0 = _random_colour(rng, dark)
    # The second colour stays near the first so shapes, not background edges, carry the contrast.
    spread = 30 if dark else 90
    c1 = np.clip(c0 + rng.uniform(-spread, spread, 3), 0, 255).astype(np.float32)
    xs, ys = _coords(s)
    kind = int(rng.integers(4))
    theta = rng.uniform(0, math.pi)
    along = (xs * math.cos(theta) + ys * math.sin(theta)) / s
    if kind == 0:  # linear gradient
        t = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
    elif kind == 1:  # smooth value noise
        grid = int(rng.integers(2, 9))
        t = cv2.resize(rng.random((grid, grid)).astype(np.float32), (s, s), interpolation=cv2.INTER_CUBIC)
        t = np.clip(t, 0, 1)
    elif kind == 2:  # stripes
        period = rng.uniform(6, 40) / s
        t = 0.5 + 0.5 * np.sin(2 * math.pi * along / period + rng.uniform(0, 2 * math.pi))
    else:  # tiles
        tile = int(rng.integers(8, 48))
        t = (((xs // tile) + (ys // tile)) % 2).astype(np.float32)
    return _lerp(c0, c1, t.astype(np.float32))


def _texture(rng: np.random.Generator, s: int, colour: np.ndarray, solid: float = 0.5) -> np.ndarray:
    """Fill for one shape: solid (probability ``solid``), two-colour stripes or noise-modulated colour."""
    kind = rng.random()
    if kind < solid:
        return colour  # broadcasts against the canvas
    xs, ys = _coords(s)
    if kind < solid + (1 - solid) / 2:
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(3, 12)
        t = (np.sin(2 * math.pi * (xs * math.cos(theta) + ys * math.sin(theta)) / period) > 0).astype(np.float32)
        other = np.clip(colour * rng.uniform(0.4, 0.8), 0, 255).astype(np.float32)
        return _lerp(colour, other, t)
    grid = int(rng.integers(4, 16))
    noise = cv2.resize(rng.random((grid, grid)).astype(np.float32), (s, s), interpolation=cv2.INTER_LINEAR)
    return np.clip(colour * (0.7 + 0.6 * noise[..., None]), 0, 255).astype(np.float32)


def _photo_texture(
    rng: np.random.Generator, s: int, canvas: np.ndarray, solid: np.ndarray, colour: np.ndarray, d: Difficulty
) -> np.ndarray:
    """Fill of one shape of a photo scene: sometimes a colour near the background under the shape (low
    contrast), sometimes a tinted crop of another photo, otherwise the drawn textures."""
    if rng.random() < d.low_contrast:
        colour = np.clip(canvas[solid].mean(axis=0) + rng.uniform(-45, 45, 3), 0, 255).astype(np.float32)
    if rng.random() < d.photo_fill:
        pool = photo_pool()
        crop = random_crop(rng, pool[int(rng.integers(len(pool)))].image, s)
        return 0.5 * crop + 0.5 * colour
    return _texture(rng, s, colour, d.solid_fill)


def _shape_polygon(rng: np.random.Generator, name: str) -> list[np.ndarray]:
    """Unit-size outline(s) of a class, centred at 0, before rotation and stretch; rings return outer and hole."""
    if name == "circle":
        return [_regular(64, 1.0)]
    if name == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.8]
    if name == "triangle":
        return [_regular(3, 1.0)]
    if name == "star":
        points = int(rng.integers(5, 7))
        outer = _regular(points, 1.0)
        inner = _regular(points, rng.uniform(0.38, 0.5), offset=-math.pi / 2 + math.pi / points)
        return [np.stack([outer, inner], axis=1).reshape(-1, 2)]
    if name == "cross":
        w = rng.uniform(0.28, 0.42)
        return [
            np.array(
                [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]],
                np.float64,
            )
        ]
    if name == "ring":
        return [_regular(64, 1.0), _regular(64, rng.uniform(0.45, 0.7))]
    if name == "pentagon":
        return [_regular(5, 1.0)]
    if name == "hexagon":
        return [_regular(6, 1.0)]
    if name == "diamond":
        w = rng.uniform(0.5, 0.7)
        return [np.array([[0, -1], [w, 0], [0, 1], [-w, 0]], np.float64)]
    if name == "arrow":
        shaft, head = rng.uniform(0.2, 0.3), rng.uniform(0.55, 0.75)
        return [np.array([[-1, -shaft], [0.15, -shaft], [0.15, -head], [1, 0], [0.15, head], [0.15, shaft],
                          [-1, shaft]], np.float64)]
    if name == "crescent":
        hole = _regular(64, rng.uniform(0.75, 0.9)) + [rng.uniform(0.35, 0.5), 0.0]
        return [_regular(64, 1.0), hole]
    if name == "semicircle":
        angles = np.linspace(0, math.pi, 33)
        return [np.stack([np.cos(angles), np.sin(angles) - 0.42], axis=1)]
    raise ValueError(f"unknown shape {name!r}; expected one of {ALL_CLASS_NAMES}")


def _regular(n: int, radius: float, offset: float = -math.pi / 2) -> np.ndarray:
    angles = offset + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _shape_alpha(rng: np.random.Generator, name: str, s: int, size_range=SIZE_RANGE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one randomly sized, rotated, stretched and placed shape."""
    lo, hi = size_range
    half = 0.5 * s * math.exp(rng.uniform(math.log(lo), math.log(hi)))
    stretch = math.exp(rng.uniform(-0.25, 0.25))
    theta = rng.uniform(0, 2 * math.pi)
    # Centres keep at least 40 % of the half-extent inside, so border cuts stay partial.
    cx, cy = rng.uniform(0.4 * half, s - 0.4 * half, 2)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    outlines = _shape_polygon(rng, name)
    canvas = np.zeros((s, s), np.uint8)
    for k, outline in enumerate(outlines):
        pts = (outline * [half * stretch, half / stretch]) @ rot.T + [cx, cy]
        fixed = np.round(pts * _SUBPIXEL).astype(np.int32)
        # Outline 0 is the shape; a second one (the ring's hole) is cut out of it.
        cv2.fillPoly(canvas, [fixed], 255 if k == 0 else 0, cv2.LINE_AA, _SUBPIXEL_BITS)
    return canvas.astype(np.float32) / 255.0


def _draw_blob(rng: np.random.Generator, canvas: np.ndarray, dark: bool = False) -> None:
    """Unlabelled clutter: an irregular smooth blob, unlike any class outline."""
    s = canvas.shape[0]
    n = 24
    angles = 2 * math.pi * np.arange(n) / n
    radius = 1 + sum(rng.uniform(0.1, 0.3) * np.sin(k * angles + rng.uniform(0, 2 * math.pi)) for k in (2, 3))
    size = 0.5 * s * rng.uniform(0.04, 0.25)
    centre = rng.uniform(0, s, 2)
    pts = np.stack([np.cos(angles), np.sin(angles)], axis=1) * (radius * size)[:, None] + centre
    mask = np.zeros((s, s), np.uint8)
    cv2.fillPoly(mask, [np.round(pts * _SUBPIXEL).astype(np.int32)], 255, cv2.LINE_AA, _SUBPIXEL_BITS)
    alpha = mask.astype(np.float32)[..., None] / 255.0
    canvas += alpha * (_random_colour(rng, dark) - canvas)


def _draw_lines(rng: np.random.Generator, canvas: np.ndarray, count: int, max_thickness: int = 3) -> None:
    """Unlabelled clutter: straight or bent lines across the image."""
    s = canvas.shape[0]
    for _ in range(count):
        pts = rng.uniform(-0.1 * s, 1.1 * s, (int(rng.integers(2, 5)), 2))
        colour = tuple(float(c) for c in _random_colour(rng))
        thickness = int(rng.integers(1, max_thickness + 1))
        cv2.polylines(canvas, [np.round(pts).astype(np.int32)], False, colour, thickness, cv2.LINE_AA)


def _draw_speckles(rng: np.random.Generator, canvas: np.ndarray, max_count: int = 30) -> None:
    """Unlabelled clutter: a sprinkle of 1-3 px dots."""
    s = canvas.shape[0]
    for _ in range(int(rng.integers(0, max_count))):
        x, y = (int(v) for v in rng.integers(0, s, 2))
        colour = tuple(float(c) for c in _random_colour(rng))
        cv2.circle(canvas, (x, y), int(rng.integers(1, 3)), colour, -1, cv2.LINE_AA)


def _label_text(boxes: Sequence[tuple[int, int, int, int, int]], imgsz: int) -> str:
    """YOLO label lines: class cx cy w h, normalised to [0, 1]."""
    lines = []
    for cls, x0, y0, x1, y1 in boxes:
        cx, cy = (x0 + x1) / 2 / imgsz, (y0 + y1) / 2 / imgsz
        w, h = (x1 - x0) / imgsz, (y1 - y0) / imgsz
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


def _write_image(path: Path, image: np.ndarray, ext: str) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if ext == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 6]
    if not cv2.imwrite(str(path), image, params):
        raise DataError(f"OpenCV could not write {path}; check that the folder is writable and has free space.")


def _check_classes(classes: Sequence[str] | None, default: tuple[str, ...] = CLASS_NAMES) -> tuple[str, ...]:
    if classes is None:
        return default
    names = tuple(classes)
    if not names:
        raise DataError(f"classes is empty; name at least one of {list(ALL_CLASS_NAMES)} or omit it for the default.")
    for name in names:
        if name not in ALL_CLASS_NAMES:
            close = difflib.get_close_matches(name, ALL_CLASS_NAMES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise DataError(f"unknown class {name!r}; choose from {list(ALL_CLASS_NAMES)}.{hint}")
    if len(set(names)) != len(names):
        raise DataError(f"classes {list(names)} repeats a name; list each class once.")
    return names


def _check_args(n_train: int, n_val: int, imgsz: int, ext: str) -> None:
    for label, value, low in (("n_train (--train)", n_train, 1), ("n_val (--val)", n_val, 1), ("imgsz (--imgsz)", imgsz, 32)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DataError(f"{label}={value!r} must be an integer >= {low}.")
    if ext not in ("jpg", "png"):
        raise DataError(f"ext={ext!r} must be 'jpg' or 'png'.")


def prepare_output(root: Path, generator: str = GENERATOR_NAME) -> None:
    """Empty the image/label folders of an earlier set written by ``generator``; refuse to touch anything else."""
    if root.exists() and not root.is_dir():
        raise DataError(f"--out {root} is a file; pass a folder path for the dataset.")
    if root.is_dir() and any(root.iterdir()):
        if not _made_by(root / "data.yaml", generator):
            raise DataError(
                f"--out {root} is not empty and holds no data.yaml from {generator}; "
                "pass a new or empty folder so no other files are overwritten."
            )
        for sub in ("images", "labels"):
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def _made_by(yaml_path: Path, generator: str) -> bool:
    try:
        data = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and isinstance(data.get("generator"), dict) and data["generator"].get("name") == generator


def _progress_bar(total: int, progress: bool | None):
    if progress is False or (progress is None and total < 200):
        return None
    return tqdm(total=total, desc="synthetic shapes", unit="img")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {GENERATOR_NAME}", description="Write the synthetic shapes detection dataset (YOLO format)."
    )
    parser.add_argument("--out", default="dataset/shapes", help="dataset folder (default: %(default)s)")
    parser.add_argument("--train", type=int, default=200, help="training images (default: %(default)s)")
    parser.add_argument("--val", type=int, default=500, help="validation images (default: %(default)s)")
    parser.add_argument("--imgsz", type=int, default=256, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--classes", nargs="+", default=None, metavar="NAME",
        help=f"shapes to draw, in label order, from: {' '.join(ALL_CLASS_NAMES)} (default: the first six; all "
             "twelve for --difficulty photo)",
    )
    parser.add_argument("--ext", choices=("jpg", "png"), default="jpg", help="image format (default: %(default)s)")
    parser.add_argument("--difficulty", choices=tuple(DIFFICULTIES), default="easy",
                        help="clutter profile (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = generate_dataset(args.out, args.train, args.val, args.imgsz, args.seed, args.classes, args.ext,
                                difficulty=args.difficulty)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
