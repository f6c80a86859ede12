"""Calibration (post-training quantization ranges) over a model's FakeQuantize observers.

Every observer is a calibrator with the same small contract -- ``collect(x, site)`` / ``reset()`` / ``compute()`` --
so calibration is just: reset, run N images with observers on and fake quant off (each layer sees float inputs, the
standard PTQ choice), compute the ranges, then freeze the observers and switch fake quant on.
"""

from __future__ import annotations

import logging
from collections.abc import Sized
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from src.quantization.fake_quantize import FakeQuantize

LOGGER = logging.getLogger("yolov8_qat")


def _fake_quantizers(model: nn.Module) -> list[FakeQuantize]:
    return [m for m in model.modules() if isinstance(m, FakeQuantize)]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    num_images: int,
    *,
    to_input: Callable[[object], torch.Tensor] | None = None,
    progress: bool = True,
) -> int:
    """Collect activation/weight ranges on ``num_images`` images, then freeze them.

    Args:
        model: A model prepared with ``prepare_qat_model``.
        batches: Iterable of batches (Ultralytics batch dicts or image tensors); when it has a ``len()`` (its number
            of images), the progress bar's total is the smaller of that and ``num_images``.
        num_images: How many images to use; calibration stops once that many were seen.
        to_input: Converts one batch into the float image tensor the model takes (default: ``batch["img"]``
            scaled from uint8 to [0, 1] when needed).
        progress: Show a progress bar.

    Returns:
        The number of images actually used.
    """
    quantizers = _fake_quantizers(model)
    if not quantizers:
        raise ValueError("calibrate: the model holds no FakeQuantize modules; prepare it first")
    device = next(model.parameters()).device
    to_input = to_input or _default_input

    was_training = model.training
    model.eval()  # BN (if unfused) keeps its statistics; Detect runs its inference path
    for q in quantizers:
        q.observer.reset()
        q.train()  # observers only update in training mode
        q.enable_observer(True)
        q.enable_fake_quant(False)
        q.observer.calibrating = True
    seen = 0
    total = min(num_images, len(batches)) if isinstance(batches, Sized) else num_images
    bar = tqdm(total=total, desc="Calibrating", unit="img", disable=not progress, leave=False)
    try:
        for batch in batches:
            x = to_input(batch).to(device, non_blocking=True)
            if seen + x.shape[0] > num_images:
                x = x[: num_images - seen]
            model(x)
            seen += x.shape[0]
            bar.update(x.shape[0])
            if seen >= num_images:
                break
    finally:
        bar.close()
        for q in quantizers:
            q.observer.calibrating = False
    if seen == 0:
        raise ValueError("calibrate: the calibration data yielded no images")
    for q in quantizers:
        q.enable_observer(False)
        q.enable_fake_quant(True)
    model.train(was_training)
    LOGGER.info(f"Calibrated {len(quantizers)} quantizers on {seen} images")
    return seen


def _default_input(batch) -> torch.Tensor:
    x = batch["img"] if isinstance(batch, dict) else batch
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    return x.float()
