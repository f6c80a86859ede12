"""Ultralytics data pipeline for QAT: the same datasets, augmentation and collation as `yolo train`."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.errors import DataError
from src.integrations.ultralytics import report_unreadable_images

LOGGER = logging.getLogger("yolov8_qat")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ultralytics colours its log prefixes; our one-line errors are plain text

def hyperparameters(cfg, imgsz: int | None = None, **overrides: Any):
    """Ultralytics' default hyperparameter namespace with this run's values (augmentation, loss gains, imgsz).

    The namespace is what Ultralytics' dataset builders and v8DetectionLoss read (``model.args``).
    """
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.cfg import get_cfg

    tp = cfg.train_params
    values = {
        "imgsz": imgsz or tp.img_size,
        "batch": tp.batch_size,
        "epochs": max(tp.epochs, 1),  # the end-to-end (YOLO26) loss schedules its terms over the run as yolo train does
        "workers": tp.workers,
        "seed": tp.seed,
        "deterministic": True,
        "plots": False,
        "verbose": False,
        "task": "detect",
        "mode": "train",
    }
    values.update(overrides)
    return get_cfg(overrides=values)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (deterministic algorithms where available on CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loader_stride(model) -> int:
    """The stride rectangular batches are padded to: the model's largest, at least 32 (as Ultralytics' trainer)."""
    return max(int(model.stride.max()), 32)


def build_loader(hyp, data: dict, split: str, batch: int, *, mode: str, stride: int = 32, workers: int | None = None,
                 shuffle: bool | None = None, seed: int = 0, rank: int = -1):
    """Build Ultralytics' YOLO dataset + InfiniteDataLoader for one split.

    Args:
        hyp: Namespace from :func:`hyperparameters`.
        data: Checked data dict (``check_det_dataset``).
        split: "train" or "val".
        batch: Batch size.
        mode: "train" (augmentation) or "val".
        stride: Model stride (rectangular val batches).
        workers: Dataloader workers (default ``hyp.workers``).
        shuffle: Default: shuffle in train mode.
        seed: Seeds the loader's generator so epochs are reproducible.
        rank: DDP rank (a DistributedSampler gives each rank its shard), -1 when not distributed.
    """
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.data import build_dataloader, build_yolo_dataset

    shuffle = (mode == "train") if shuffle is None else shuffle
    # Rectangular val batches group images of one aspect ratio; shuffled, a batch would mix shapes that cannot stack,
    # so a shuffled val-mode loader (calibration, sensitivity) letterboxes every image to the square input size.
    rect = mode == "val" and not shuffle
    dataset = build_yolo_dataset(hyp, data[split], batch, data, mode=_dataset_mode(split, mode), rect=rect,
                                 stride=stride)
    loader = build_dataloader(
        dataset,
        batch=batch,
        workers=hyp.workers if workers is None else workers,
        shuffle=shuffle,
        rank=rank,
        pin_memory=torch.cuda.is_available(),
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    return loader


def _dataset_mode(split: str, mode: str) -> str:
    """build_yolo_dataset's ``mode``: "train" augments, any other value evaluates and also labels its log lines
    ("val: Scanning ..."), so an unaugmented pass over the train split says so instead of calling itself val."""
    if mode == "train":
        return "train"
    return "train (no augmentation)" if split == "train" else split


def preprocess_batch(batch: dict, device: torch.device) -> dict:
    """Move a batch to ``device`` and scale images to [0, 1], as Ultralytics' DetectionTrainer does."""
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            batch[k] = v.to(device, non_blocking=device.type == "cuda")
    batch["img"] = batch["img"].float() / 255
    return batch


def _count_images(paths) -> int:
    """Image files a split names (directories searched recursively, .txt lists counted by line), as Ultralytics does."""
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.data.utils import IMG_FORMATS

    n = 0
    for p in paths if isinstance(paths, (list, tuple)) else [paths]:
        p = Path(p)
        if p.is_dir():
            n += sum(1 for f in p.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        elif p.is_file():
            n += sum(1 for line in p.read_text().splitlines() if line.strip())
    return n


def check_split(hyp, data: dict, split: str) -> tuple[int, int]:
    """Build a split's dataset once and report what Ultralytics dropped.

    Ultralytics silently skips images whose label is out of range (class >= nc, coordinates outside [0, 1]) or whose
    file does not decode, with one warning per file. This counts them for the run summary and fails when nothing
    usable is left.

    Returns:
        (usable images, dropped images)

    Raises:
        DataError: the split has no usable image.
    """
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import IMG_FORMATS

    report_unreadable_images()
    total = _count_images(data[split])
    if total == 0:
        raise DataError(f"{split} split ({data[split]}): no images found; put the images there (suffixes "
                        f"{', '.join(sorted(IMG_FORMATS))}) or fix '{split}:' in the data YAML")
    try:
        dataset = build_yolo_dataset(hyp, data[split], 1, data, mode=_dataset_mode(split, "val"), rect=False,
                                     stride=32)
        usable = len(dataset.labels)
    except (RuntimeError, FileNotFoundError) as e:
        text = _ANSI.sub("", str(e))
        first = next((line.strip() for line in text.splitlines()[1:] if "ignoring" in line), text.splitlines()[0])
        reason = first.split("ignoring corrupt image/label:")[-1].strip()
        raise DataError(
            f"{split} split ({data[split]}): no usable images — all {total} were dropped as corrupt (first reason: "
            f"{reason}). Fix the images/labels (class ids < nc={data['nc']}, coordinates normalized to [0, 1])."
        ) from None
    dropped = max(total - usable, 0)
    if usable == 0:
        raise DataError(f"{split} split ({data[split]}): no usable images (found {total}); check the paths and labels")
    if dropped:
        LOGGER.warning(f"{dropped} of {total} {split} images were dropped by Ultralytics as corrupt or mislabelled "
                       "(see its warnings above)")
    return usable, dropped
