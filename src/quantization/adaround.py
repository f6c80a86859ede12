"""Learned weight rounding (AdaRound, Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"): pure functions of tensors.

Each weight is rounded to ``floor(w/s) + h`` with ``h`` in {0, 1} chosen to minimise a layer's output error instead
of to the nearest code. During the optimisation ``h`` is relaxed to the rectified sigmoid ``h(V)`` of a free
parameter ``V``; a regulariser whose exponent ``beta`` is annealed from 20 to 2 pushes every ``h(V)`` to 0 or 1.
The model-level loop (which layers, which data) lives in ``src/models/adaround.py``.
"""

from __future__ import annotations

import math

import torch

# Stretch of the rectified sigmoid: h(V) reaches exactly 0 and 1 at finite V, so the regulariser can finish.
ZETA, GAMMA = 1.1, -0.1
REGULARIZATION = 0.01
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # fraction of the iterations without the rounding regulariser (reconstruction only)


def _channel_shape(x: torch.Tensor, axis: int | None) -> list[int] | tuple:
    if axis is None:
        return ()
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return shape


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``clamp(sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)``: the relaxed rounding offset ``h(V)``."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def floor_codes(w: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``floor(w * (1/s))`` in fp32, with the fake quantizer's ``x * (1/s)`` convention."""
    return torch.floor(w.float() * (1.0 / scale.float().reshape(_channel_shape(w, axis))))


def initial_logits(w: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``V`` with ``h(V)`` equal to the fractional part of ``w/s``: the relaxation starts at the float weight."""
    v = w.float() * (1.0 / scale.float().reshape(_channel_shape(w, axis)))
    frac = v - torch.floor(v)
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


def hard_offset(v: torch.Tensor) -> torch.Tensor:
    """The binary decision ``h(V) >= 0.5``, i.e. ``V >= 0``, as 0./1."""
    return (v >= 0).float()


def rounded_weight(floor: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                   axis: int | None) -> torch.Tensor:
    """``s * clamp(floor + h, qmin, qmax)`` (symmetric, zero point 0) for offsets ``h`` (relaxed or hard)."""
    return (floor + h).clamp(qmin, qmax) * scale.float().reshape(_channel_shape(floor, axis))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2h - 1| ** beta)`` of relaxed offsets ``h = h(V)``: zero once every offset is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, steps: int, warmup: float = WARMUP, start: float = BETA_START, end: float = BETA_END
            ) -> float | None:
    """Annealed exponent at ``step`` of ``steps``: None during the warm-up (no regulariser), then linear from
    ``start`` to ``end``."""
    begin = int(math.ceil(warmup * steps))
    if step < begin:
        return None
    t = (step - begin) / max(steps - begin, 1)
    return end + (start - end) * max(0.0, 1.0 - t)
