"""Every loader the toolkit builds batches real datasets, whose images come in mixed aspect ratios."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest
import torch
import yaml

from src.config import build_config
from src.stages.calibrate import TrainingImages
from src.stages.sensitivity import sensitivity_batches
from src.training.data import build_loader, hyperparameters


@pytest.fixture(scope="module")
def mixed_aspect_dataset(tiny_dataset, tmp_path_factory) -> dict:
    """The tiny set with its training images stretched to 64x96 and 96x64 in turn (normalized labels stay valid)."""
    from ultralytics.data.utils import check_det_dataset  # deferred: Ultralytics after prepare_environment()

    src = Path(tiny_dataset).parent
    root = tmp_path_factory.mktemp("mixed_aspect")
    shutil.copytree(src, root, dirs_exist_ok=True)
    for i, p in enumerate(sorted((root / "images" / "train").iterdir())):
        im = cv2.imread(str(p))
        cv2.imwrite(str(p), cv2.resize(im, (96, 64) if i % 2 else (64, 96)))
    for cache in root.rglob("*.cache"):
        cache.unlink()
    cfg = yaml.safe_load(Path(tiny_dataset).read_text())
    cfg["path"] = str(root)
    (root / "data.yaml").write_text(yaml.safe_dump(cfg))
    return check_det_dataset(str(root / "data.yaml"))


def _cfg():
    return build_config({"train_params": {"img_size": 64, "workers": 0}, "qat_params": {"calibration_batch_size": 4,
                                                                                        "calibration_images": 8},
                         "mixed_precision": {"sensitivity_images": 8}})


def test_calibration_batches_of_mixed_aspect_ratios_stack(mixed_aspect_dataset):
    # rectangular val batches group images by aspect ratio; shuffled, they would mix shapes within one batch
    shapes = [tuple(x.shape) for x in TrainingImages(_cfg(), mixed_aspect_dataset, torch.device("cpu"), 32)]
    assert sum(s[0] for s in shapes) == 8 and {s[2:] for s in shapes} == {(64, 64)}


def test_sensitivity_batches_of_mixed_aspect_ratios_stack(mixed_aspect_dataset):
    batches = sensitivity_batches(_cfg(), mixed_aspect_dataset, torch.device("cpu"), 32)
    assert sum(int(b["img"].shape[0]) for b in batches) == 8
    assert {tuple(b["img"].shape[2:]) for b in batches} == {(64, 64)}


def test_unshuffled_val_loader_keeps_rectangular_batches(mixed_aspect_dataset):
    # the validator's own path: rect batches (no padding to a square) when order is fixed
    loader = build_loader(hyperparameters(_cfg(), mode="val"), mixed_aspect_dataset, "train", 4, mode="val",
                          shuffle=False, workers=0)
    assert any(tuple(b["img"].shape[2:]) != (64, 64) for b in loader)
