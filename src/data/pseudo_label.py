"""A real-photo detection set labelled by the user's own FP32 model, for measuring what quantization costs a real
checkpoint without a labelled dataset.

The images are the photos of src.data.photos at their own sizes and aspect ratios (portrait, landscape, square:
what real data looks like and the synthetic sets never do): the validation split holds each photo, its mirror
image and random crops, the training split other random crops (aspect ratios 1:2 to 2:1). Every image is labelled
with the model's own detections (confidence >= ``conf``), so the FP32 model scores close to its ceiling and any
loss after quantization is the quantization's.

CLI::

    python -m src.data.pseudo_label --model models/pretrained/yolov8n.pt --out dataset/real --imgsz 640
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import yaml

from src.data.photos import photo_pool, pool_record
from src.data.synthetic import prepare_output
from src.env import prepare_environment
from src.errors import DataError
from src.integrations.ultralytics import load_yolo

GENERATOR_NAME = "src.data.pseudo_label"
CROPS_PER_PHOTO = 4  # per split: with the photo and its mirror, 126 validation images


def split_images(seed: int = 0) -> dict[str, list[tuple[str, np.ndarray]]]:
    """(stem, BGR image) per split: val = each photo, its mirror and random crops; train = other random crops."""
    val, train = [], []
    for i, photo in enumerate(photo_pool()):
        stem = Path(photo.name).stem
        val += [(f"{i:02d}_{stem}", photo.image), (f"{i:02d}_{stem}_mirror", np.ascontiguousarray(photo.image[:, ::-1]))]
        rng = np.random.default_rng([seed, i])
        for name, split in (("val", val), ("train", train)):
            split += [(f"{i:02d}_{stem}_{name}crop{k}", _random_crop(rng, photo.image)) for k in range(CROPS_PER_PHOTO)]
    return {"train": train, "val": val}


def _random_crop(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """40-90 % of the area, aspect ratio (width / height) from 1:2 to 2:1, mirrored half of the time."""
    h, w = image.shape[:2]
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    area = rng.uniform(0.4, 0.9) * h * w
    cw, ch = int(min(w, np.sqrt(area * aspect))), int(min(h, np.sqrt(area / aspect)))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = image[y0:y0 + ch, x0:x0 + cw]
    return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def make_pseudo_labelled_set(model: str | Path, out: str | Path, imgsz: int = 640, conf: float = 0.25,
                             seed: int = 0, trusted: bool = False) -> Path:
    """Write the set and return its data.yaml (``names`` are the model's classes).

    Raises:
        DataError: ``out`` holds files this generator did not write, or the model detects nothing at all.
    """
    prepare_environment()
    root = Path(out).expanduser().resolve()
    prepare_output(root, GENERATOR_NAME)
    yolo = load_yolo(model, trusted=trusted)
    names = dict(yolo.names)
    total = 0
    for split, images in split_images(seed).items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for stem, image in images:
            result = yolo.predict(image, imgsz=imgsz, conf=conf, verbose=False, device="cpu")[0]
            boxes = result.boxes
            lines = [f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}"
                     for c, (x, y, w, h) in zip(boxes.cls.tolist(), boxes.xywhn.tolist())]
            total += len(lines)
            # PNG: lossless, so the labels describe exactly the pixels the model saw
            if not cv2.imwrite(str(root / "images" / split / f"{stem}.png"), image):
                raise DataError(f"OpenCV could not write into {root}; check that it is writable and has free space.")
            (root / "labels" / split / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")
    if total == 0:
        raise DataError(f"{model} detected nothing at conf >= {conf} on any photo; lower --conf or check the model.")
    data = {"path": str(root), "train": "images/train", "val": "images/val", "nc": len(names),
            "names": [names[i] for i in range(len(names))],
            "generator": {"name": GENERATOR_NAME, "model": str(model), "imgsz": imgsz, "conf": conf, "seed": seed,
                          "photos": pool_record()}}
    yaml_path = root / "data.yaml"
    yaml_path.write_text(f"# Pseudo-labelled by `python -m {GENERATOR_NAME}`; regenerate rather than edit.\n"
                         + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return yaml_path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {GENERATOR_NAME}", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models/pretrained/yolov8n.pt", help="FP32 checkpoint that labels the photos")
    p.add_argument("--out", default="dataset/real")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--conf", type=float, default=0.25, help="confidence a detection needs to become a label")
    p.add_argument("--seed", type=int, default=0, help="seed of the training crops")
    p.add_argument("--trust-checkpoint", action="store_true", help="unpickle --model fully (runs code it holds)")
    a = p.parse_args(argv)
    try:
        print(make_pseudo_labelled_set(a.model, a.out, a.imgsz, a.conf, a.seed, a.trust_checkpoint))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
