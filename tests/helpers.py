"""Builders shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import torch

TINY_NAMES = {0: "circle", 1: "square", 2: "triangle"}


def calibrated_qat_model(imgsz: int = 64, qconfig: str | None = None, overrides: dict | None = None):
    """A yolov8n (nc=3, random init, seed 0) prepared with the shipped config (plus ``overrides``, dotted keys as
    the CLI gives them) and calibrated on random images.

    Returns:
        (model in eval mode, resolved config)
    """
    from ultralytics.nn.tasks import DetectionModel

    from src.config import load_config
    from src.models.yolov8_qat import prepare_qat_model
    from src.quantization.calibration import calibrate

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = dict(TINY_NAMES)
    cfg = load_config("configs/qat_config.yaml", overrides, qconfig=qconfig)
    prepare_qat_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    calibrate(model, [torch.rand(2, 3, imgsz, imgsz, generator=g) for _ in range(2)], 4, progress=False)
    return model.eval(), cfg
