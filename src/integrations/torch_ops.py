"""torch 2.14 private names this toolkit relies on (contract-tested in tests/test_integrations.py)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase


def learnable_fake_quantize_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    grad_scale: float,
    axis: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's fused LSQ/LSQ+ backward kernel: ``(dx, dscale, dzero_point)`` in one pass.

    Args:
        grad_out: Contiguous fp32 upstream gradient.
        x: fp32 input of the forward pass.
        scale: Positive scale(s); per-tensor: a single element (any shape).
        zero_point: Integer-valued zero point(s), same layout as ``scale``.
        qmin: Smallest integer code.
        qmax: Largest integer code.
        grad_scale: LSQ gradient scale ``g`` applied to dscale and dzero_point.
        axis: Channel axis for per-channel quantization; None for per-tensor.
    """
    if axis is None:
        return torch.ops.aten._fake_quantize_learnable_per_tensor_affine_backward(
            grad_out, x, scale.reshape(1), zero_point.reshape(1), qmin, qmax, grad_scale)
    return torch.ops.aten._fake_quantize_learnable_per_channel_affine_backward(
        grad_out, x, scale, zero_point, axis, qmin, qmax, grad_scale)


def fused_fake_quantize_with_mask(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: int,
                                  qmax: int, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's one-pass fake-quant kernels that also return the STE mask: ``(y, qmin <= round(x/s) + zp <= qmax)``.

    Args:
        x: fp32 input.
        scale: fp32 scale(s); per-tensor: a single element (any shape), per-channel: 1-d along ``axis``.
        zero_point: int32 zero point(s), same layout as ``scale``; None means 0. Per-channel takes None only: its
            kernel reads an integer zero point back to the host (a range check), a float zero of 0 it does not.
        qmin: Smallest integer code.
        qmax: Largest integer code.
        axis: Channel axis for per-channel quantization; None for per-tensor.
    """
    if axis is None:  # the tensor-qparams variant: scale and zero point stay on the device (no host read)
        zp = torch.zeros(1, dtype=torch.int32, device=x.device) if zero_point is None else zero_point.reshape(1)
        return torch.ops.aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, scale.reshape(1), zp, torch.ones(1, dtype=torch.long, device=x.device), qmin, qmax)
    if zero_point is not None:
        raise ValueError("fused per-channel fake quantization takes zero_point=None (symmetric) only")
    return torch.ops.aten.fake_quantize_per_channel_affine_cachemask(x, scale, torch.zeros_like(scale), axis, qmin,
                                                                     qmax)


def is_batch_norm(module: nn.Module) -> bool:
    """Any batch norm (1d/2d/3d, lazy, synchronized): the modules whose running statistics ``eval()`` freezes."""
    return isinstance(module, _BatchNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """Batch or instance norm: the layers whose weights get no weight decay (as Ultralytics' optimizer groups)."""
    return isinstance(module, _NormBase)
