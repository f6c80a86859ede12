"""Finding a prepared model's quantizers and switching their observers and fake quantization on and off."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from src.models.quant_modules import QuantConv
from src.quantization.fake_quantize import FakeQuantize


def quantizers(model: nn.Module) -> Iterator[tuple[str, FakeQuantize]]:
    """Every FakeQuantize in the model (shared ones once)."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantize):
            yield name, m


def set_observers(model: nn.Module, enabled: bool, weights: bool = True, activations: bool = True,
                  histograms: bool = True) -> None:
    """Switch observers on/off; ``histograms=False`` leaves histogram observers as they are.

    Histogram range searches (percentile/MSE/entropy) are a calibration technique: the trainer keeps them frozen after
    calibration and only lets min/max-style observers follow the weights and activations during QAT.
    """
    for _, q in quantizers(model):
        if not histograms and q.observer.kind == "histogram":
            continue
        if (q.is_weight and weights) or (not q.is_weight and activations):
            q.enable_observer(enabled)


def set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for _, q in quantizers(model):
        q.enable_fake_quant(enabled)


def is_qat_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, "qat_quantizers", None), nn.ModuleDict)


@torch.no_grad()
def refresh_weight_qparams(model: nn.Module) -> None:
    """Recompute observed weight ranges from the weights the model holds now.

    The EMA model averages weights but never runs its observers (it stays in eval mode), so after each EMA update
    its weight ranges are re-derived from its own averaged weights; learned (LSQ) scales are parameters and are
    averaged like weights instead.
    """
    for m in model.modules():
        if isinstance(m, QuantConv) and m.weight_quant is not None:
            q = m.weight_quant
            if not q.observing or isinstance(q.scale, nn.Parameter):
                continue
            was = q.training
            q.train()
            m.quantized_weight()
            q.train(was)
