"""Batch-norm folding.

QAT here folds each BatchNorm into the preceding convolution with the BN's *frozen* running statistics before any
weight fake-quantization, so the weight quantizer sees exactly the weight that deploys. Simulating folding with batch
statistics (as in Jacob et al. 2018) costs a second convolution per layer and would break the training-step overhead
budget; with a converged FP32 starting model the running statistics are already good, so freezing them is the better
trade. The folding itself is the pure function :func:`fold_bn_into_conv_params`.
"""

from __future__ import annotations

import torch
from torch import nn

from src.errors import QATError


class FusionError(QATError):
    """A Conv+BN pair could not be folded."""


def fold_bn_into_conv_params(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the convolution that feeds it.

    ``bn(conv(x)) = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` equals a convolution with
    ``W' = W * gamma / sqrt(var + eps)`` (per output channel, axis 0) and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

    Args:
        weight: Convolution weight, output channels on axis 0.
        bias: Convolution bias or None.
        running_mean: BN running mean.
        running_var: BN running variance.
        bn_weight: BN affine scale (gamma) or None when the BN is not affine.
        bn_bias: BN affine shift (beta) or None when the BN is not affine.
        eps: BN epsilon.

    Returns:
        The folded weight and bias, computed in float64 and returned in the weight's dtype.
    """
    dtype = weight.dtype
    w = weight.detach().double()
    c = w.shape[0]
    if running_mean.numel() != c:
        raise FusionError(f"BatchNorm has {running_mean.numel()} channels but the conv has {c} output channels")
    gamma = bn_weight.detach().double() if bn_weight is not None else torch.ones(c, dtype=torch.float64)
    beta = bn_bias.detach().double() if bn_bias is not None else torch.zeros(c, dtype=torch.float64)
    b = bias.detach().double() if bias is not None else torch.zeros(c, dtype=torch.float64)
    factor = gamma / torch.sqrt(running_var.detach().double() + eps)
    w_folded = w * factor.reshape(-1, *([1] * (w.dim() - 1)))
    b_folded = (b - running_mean.detach().double()) * factor + beta
    return w_folded.to(dtype), b_folded.to(dtype)


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, name: str = "") -> nn.Conv2d:
    """Return a new Conv2d (with bias) equal to ``bn(conv(x))`` in eval mode.

    Args:
        conv: The convolution.
        bn: The batch norm that follows it.
        name: Qualified module name, used in errors.

    Raises:
        FusionError: naming the module when the pair cannot be folded.
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise FusionError(
            f"cannot fuse {name or 'module'}: expected Conv2d + BatchNorm2d, got {type(conv).__name__} + "
            f"{type(bn).__name__}. Run with --no-fuse to keep BatchNorm unfused."
        )
    if bn.running_mean is None or bn.running_var is None:
        raise FusionError(
            f"cannot fuse {name or 'module'}: its BatchNorm tracks no running statistics. Run with --no-fuse."
        )
    try:
        weight, bias = fold_bn_into_conv_params(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )
    except (RuntimeError, FusionError) as e:
        raise FusionError(f"cannot fuse {name or 'module'}: {e}. Run with --no-fuse to keep BatchNorm unfused.") from e
    fused = _conv_like(conv, bias=True)
    with torch.no_grad():
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
    fused.weight.requires_grad_(conv.weight.requires_grad)
    fused.bias.requires_grad_(conv.weight.requires_grad)
    return fused


def _conv_like(conv: nn.Conv2d, bias: bool) -> nn.Conv2d:
    """An empty Conv2d with ``conv``'s geometry, device and dtype."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, bias=bias, padding_mode=conv.padding_mode).to(device=conv.weight.device,
                                                                                dtype=conv.weight.dtype)


def identity_bn_for(conv: nn.Conv2d) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """Split a biased conv into a bias-free conv plus an eval-mode BN that adds the bias back exactly.

    Used by ``to_float`` to give Ultralytics back a ``Conv`` block (which always has ``bn``) from a folded conv.
    ``running_var = 1 - eps`` makes ``sqrt(var + eps) == 1`` so the BN is an exact shift by ``beta``.
    """
    plain = _conv_like(conv, bias=False)
    bn = nn.BatchNorm2d(conv.out_channels).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        plain.weight.copy_(conv.weight)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(bn.bias))
    bn.eval()
    return plain, bn
