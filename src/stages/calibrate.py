"""Calibrate: the PTQ model of a configuration (prepared copy of the float model, ranges from training images)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from src.models.adaround import adaround
from src.models.bias_correction import correct_biases
from src.quantization.calibration import calibrate
from src.stages.context import RunContext
from src.stages.prepare import prepare_model
from src.training.data import build_loader, hyperparameters, loader_stride, preprocess_batch


def build_ptq_model(fp32_model: nn.Module, cfg, bit_overrides: dict | None,
                    images: Callable[[], Iterable[torch.Tensor]], num_images: int, device: torch.device, *,
                    progress: bool = True) -> nn.Module:
    """Prepare a copy of ``fp32_model`` with ``bit_overrides`` and calibrate it on ``num_images`` of ``images``.

    The one way every PTQ model is made besides the run's own (which records its placement before calibrating: see
    :func:`calibrate_stage`): the analysis baseline and each mixed-precision candidate. Both use
    :func:`~src.stages.prepare.prepare_model` and :func:`~src.quantization.calibration.calibrate`.

    Args:
        images: Opens the preprocessed image batches ([0, 1] floats, on ``device``); called once the model is
            prepared, so a data loader's messages follow the placement summary.
        progress: Calibration progress bar.
    """
    model = prepare_model(fp32_model, cfg, bit_overrides).to(device)
    calibrate(model, images(), num_images, progress=progress)
    refine_calibrated(model, cfg, images, num_images, progress=progress)
    return model


def refine_calibrated(model: nn.Module, cfg, images: Callable[[], Iterable[torch.Tensor]], num_images: int, *,
                      progress: bool = True) -> None:
    """What follows the ranges: learned weight rounding (``qat_params.adaround``), then bias correction."""
    params = cfg.qat_params
    if params.adaround:
        adaround(model, images, num_images, iterations=params.adaround_iterations, seed=cfg.train_params.seed,
                 progress=progress)
    if params.bias_correction:
        correct_biases(model, images, num_images)


class TrainingImages:
    """Training images without augmentation, shuffled with ``train_params.seed``, as [0, 1] batches on a device.

    ``len()`` is the number of images in the split, so calibration's progress bar counts what it can actually use.
    """

    def __init__(self, cfg, data: dict, device: torch.device, stride: int) -> None:
        self.loader = build_loader(hyperparameters(cfg, mode="val"), data, "train",
                                   cfg.qat_params.calibration_batch_size, mode="val", stride=stride, shuffle=True,
                                   seed=cfg.train_params.seed)
        self.device = device

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (preprocess_batch(b, self.device)["img"] for b in self.loader)


def calibrate_stage(ctx: RunContext, model: nn.Module) -> nn.Module:
    """Calibrate the run's prepared ``model`` in place on ``qat_params.calibration_images`` training images."""
    model.to(ctx.device)
    images = TrainingImages(ctx.cfg, ctx.data, ctx.device, loader_stride(model))
    calibrate(model, images, ctx.cfg.qat_params.calibration_images)
    refine_calibrated(model, ctx.cfg, lambda: images, ctx.cfg.qat_params.calibration_images)
    return model


def ptq_baseline(ctx: RunContext, fp32_model: nn.Module, bit_overrides: dict | None) -> nn.Module:
    """The PTQ model of this run's configuration, calibrated on ``qat_params.calibration_images`` training images."""
    stride = loader_stride(fp32_model)
    return build_ptq_model(fp32_model, ctx.cfg, bit_overrides,
                           lambda: TrainingImages(ctx.cfg, ctx.data, ctx.device, stride),
                           ctx.cfg.qat_params.calibration_images, ctx.device)
