"""Ultralytics data pipeline for QAT: the same datasets, augmentation and collation as `yolo train`."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def hyperparameters(cfg, imgsz: int | None = None, **overrides: Any):
    """Ultralytics' default hyperparameter namespace with this run's values (augmentation, loss gains, imgsz).

    The namespace is what Ultralytics' dataset builders and v8DetectionLoss read (``model.args``).
    """
    from ultralytics.cfg import get_cfg

    tp = cfg.train_params
    values = {
        "imgsz": imgsz or tp.img_size,
        "batch": tp.batch_size,
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
    from ultralytics.data import build_dataloader, build_yolo_dataset

    dataset = build_yolo_dataset(hyp, data[split], batch, data, mode=mode, rect=mode == "val", stride=stride)
    loader = build_dataloader(
        dataset,
        batch=batch,
        workers=hyp.workers if workers is None else workers,
        shuffle=(mode == "train") if shuffle is None else shuffle,
        rank=rank,
        pin_memory=torch.cuda.is_available(),
        device="cuda" if torch.cuda.is_available() else "cpu",
    )
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    return loader


def preprocess_batch(batch: dict, device: torch.device) -> dict:
    """Move a batch to ``device`` and scale images to [0, 1], as Ultralytics' DetectionTrainer does."""
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            batch[k] = v.to(device, non_blocking=device.type == "cuda")
    batch["img"] = batch["img"].float() / 255
    return batch
