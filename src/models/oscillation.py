"""Oscillation dampening for low-bit QAT (Nagel et al. 2022): a loss term pulling weights to their grid points.

Latent weights near a rounding boundary flip between two codes from step to step under the straight-through
estimator; the term ``lambda * sum(((q(w) - clip(w)) / s) ** 2)`` (src/quantization/utils.grid_distance) pulls each
towards the code it rounds to. ``lambda`` ramps from 0 by a half cosine over training so weights can still move
early on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from src.models.quant_modules import QuantConv
from src.quantization.utils import grid_distance


def quantized_weight_convs(model: nn.Module) -> list[QuantConv]:
    """The convs whose weights are fake-quantized."""
    return [m for m in model.modules() if isinstance(m, QuantConv) and m.weight_quant is not None]


def dampening_weight(peak: float, progress: float) -> float:
    """``peak * (1 - cos(pi * progress)) / 2``: 0 at the start of training, ``peak`` at its end."""
    return peak * 0.5 * (1.0 - math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def weight_grid_distance(convs: list[QuantConv]) -> torch.Tensor:
    """Sum over ``convs`` of their weights' squared distance to the grid, in steps, at the current weight qparams."""
    terms = []
    for m in convs:
        q = m.weight_quant
        if not q.fake_quantizing:
            continue
        scale, zero_point = q.calculate_qparams()
        terms.append(grid_distance(m.conv.weight, scale, zero_point, q.qmin, q.qmax, q.ch_axis))
    if not terms:
        return torch.zeros((), device=next((m.conv.weight.device for m in convs), None))
    return torch.stack(terms).sum()
