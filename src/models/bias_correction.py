"""Bias correction after calibration: each quantized conv's bias absorbs the mean shift its quantization causes.

Rounding a conv's weights and its input moves the mean of its output channels (Nagel et al. 2019, "Data-Free
Quantization": the biased error of a quantized layer); deep nets accumulate those shifts. On calibration images
each conv compares, on the input it actually receives, its quantized output ``conv(Q(x), Q(W))`` with the float
``conv(x, W)``; the per-channel mean of the difference is subtracted from the bias it started from. All convs are
measured in one forward pass; a second pass, on the corrected model, measures the shifts the corrected upstream
layers leave (close to correcting layer by layer, as NNCF's bias correction does, at two forwards per image).

Measured on Ultralytics' COCO yolov8n, PTQ on its pseudo-labelled real photos at 320 px (mAP50-95, FP32 0.9215):
0.8579 without, 0.8713 after one pass, 0.8789 after two, 0.8760 after three.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from src.models.quant_modules import QuantConv

LOGGER = logging.getLogger("yolov8_qat")
PASSES = 2


class OutputShift:
    """Calibrator of one conv's quantization-induced output shift (collect / reset / compute, as observers)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def collect(self, block: QuantConv, x: torch.Tensor) -> None:
        """Accumulate ``conv(Q(x), Q(W)) - conv(x, W)`` summed over batch and positions, for ``block``'s input ``x``."""
        site = block._site("input_site")
        xq = site(x) if site is not None else x
        diff = block.conv_with(xq, block.quantized_weight(), None) - block.conv_with(x, block.conv.weight, None)
        s = diff.sum(dim=(0, 2, 3))
        self.total = s if self.total is None else self.total + s
        self.count += diff.shape[0] * diff.shape[2] * diff.shape[3]

    def compute(self) -> torch.Tensor:
        """Mean shift per output channel."""
        if self.total is None:
            raise RuntimeError("OutputShift.compute: no input was collected; run calibration images first")
        return self.total / self.count


def correctable_convs(model: nn.Module) -> list[tuple[str, QuantConv]]:
    """Quantized convs whose bias directly follows the conv (fused or plain); unfused ones keep BN after it."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv) and m.weight_quant is not None
            and m.conv.bias is not None and m.norm is None]


@torch.no_grad()
def correct_biases(model: nn.Module, images: Callable[[], Iterable[torch.Tensor]], num_images: int,
                   passes: int = PASSES) -> int:
    """Correct the biases of a calibrated model in place on ``num_images`` images; ``images`` opens the image
    batches anew for every pass. Returns how many convs were corrected."""
    convs = correctable_convs(model)
    if not convs or passes < 1:
        return 0
    start = {n: m.conv.bias.detach().clone() for n, m in convs}
    shifts = {n: OutputShift() for n, _ in convs}
    was_training = model.training
    model.eval()
    try:
        for _ in range(passes):
            for s in shifts.values():
                s.reset()
            handles = [m.register_forward_pre_hook(lambda mod, args, s=shifts[n]: s.collect(mod, args[0]))
                       for n, m in convs]
            try:
                seen = 0
                for x in images():
                    x = x[: num_images - seen]
                    model(x)
                    seen += x.shape[0]
                    if seen >= num_images:
                        break
            finally:
                for h in handles:
                    h.remove()
            for n, m in convs:
                m.conv.bias.copy_(start[n] - shifts[n].compute().to(m.conv.bias.dtype))
    finally:
        model.train(was_training)
    LOGGER.info(f"Bias correction: {len(convs)} convs, {passes} pass(es) over {min(seen, num_images)} images")
    return len(convs)
