"""Evaluation with Ultralytics' DetectionValidator on our in-memory model (never a re-loaded, re-fused copy)."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

from src.integrations.ultralytics import validator_nms

LOGGER = logging.getLogger("yolov8_qat")


def evaluate(
    model: nn.Module,
    data_yaml: str | Path,
    *,
    imgsz: int,
    batch: int = 16,
    device: str | torch.device = "cpu",
    workers: int = 0,
    save_dir: str | Path | None = None,
    split: str = "val",
) -> dict:
    """mAP50, mAP50-95 and per-class AP of ``model`` on a data split, preprocessed as the exports are.

    Args:
        save_dir: The validator's folder; default a temporary one (plots and JSON are off, so it would stay empty).

    The validator gets a deep copy in eval mode: Ultralytics' AutoBackend switches off ``requires_grad`` and may
    fuse, and neither may touch the model being trained. Quantizers in eval mode do not observe, so the copy is
    evaluated with exactly the ranges it holds.

    Returns:
        ``{"map50", "map50_95", "per_class": {name: ap50_95}}``.
    """
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.models.yolo.detect import DetectionValidator

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    args = dict(
        data=str(data_yaml),
        imgsz=imgsz,
        batch=batch,
        device=str(dev.index if dev.type == "cuda" and dev.index is not None else dev.type),
        workers=workers,
        plots=False,
        verbose=False,
        save_json=False,
        split=split,
        # static letterbox at imgsz, as the exports run: Ultralytics' rect batches would pad a square 256 px set to
        # 288 px and make torch and export numbers incomparable
        rect=False,
        nms=validator_nms(model),  # the inference branch the model selects (an end-to-end head has two)
    )
    m = copy.deepcopy(model).float().eval()
    # Ultralytics' validator creates its save_dir (runs_dir/detect/train-N) even when it writes nothing into it
    with tempfile.TemporaryDirectory(prefix="qat_val_") as tmp:
        validator = DetectionValidator(save_dir=Path(save_dir or tmp), args=args)
        stats = validator(model=m)
    box = validator.metrics.box
    names = getattr(model, "names", {})
    per_class = {}
    for i, c in enumerate(getattr(box, "ap_class_index", [])):
        per_class[str(names.get(int(c), int(c)))] = round(float(box.ap[i]), 6)
    return {
        "map50": round(float(stats["metrics/mAP50(B)"]), 6),
        "map50_95": round(float(stats["metrics/mAP50-95(B)"]), 6),
        "per_class": per_class,
    }
