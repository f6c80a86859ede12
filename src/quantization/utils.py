"""Pure quantization numerics: integer ranges, qparams from ranges, fake quantization and its gradients.

Everything here is a function of tensors (no modules, no state). Forward values of every fake-quant path are
bit-identical to ``torch.fake_quantize_per_{tensor,channel}_affine``, which compute
``q = clamp(nearbyint(x * (1/s)) + zp, qmin, qmax)`` and ``(q - zp) * s`` in fp32 with round-half-to-even; the tests
check this with atol=0. Gradients are computed in fp32.
"""

from __future__ import annotations

import math

import torch

from src.errors import QATError
from src.integrations.torch_ops import fused_fake_quantize_with_mask, learnable_fake_quantize_backward

_FP32 = torch.finfo(torch.float32)
EPS = _FP32.eps
# Largest scale we hand out: (q - zp) * scale must stay finite for every 16-bit code (|q - zp| < 2**17).
MAX_SCALE = _FP32.max / 2.0**17
MIN_BITS, MAX_BITS = 2, 16


class QuantizationError(QATError, ValueError):
    """A quantization setting or argument is invalid; the message names the value and the fix."""


class NonFiniteObservationError(QATError, FloatingPointError):
    """An observer saw NaN or inf values; the message names the layer."""

    def __init__(self, layer_name: str, detail: str = ""):
        self.layer_name = layer_name
        where = f"layer '{layer_name}'" if layer_name else "an unnamed layer"
        msg = (
            f"non-finite values (NaN/inf) observed at {where}{': ' + detail if detail else ''}. "
            "The float model diverged or its input is corrupt; lower the learning rate, check the data, "
            "or enable gradient clipping before quantizing."
        )
        super().__init__(msg)


def check_finite_stats(min_val: torch.Tensor, max_val: torch.Tensor, layer_name: str) -> None:
    """Raise NonFiniteObservationError if reduced statistics hold NaN/inf.

    Checking the reduced min/max (which propagate NaN and inf) is as strict as checking the whole tensor but costs
    next to nothing: NaN and inf survive ``abs().max()``.
    """
    if not math.isfinite(float(min_val.abs().max()) + float(max_val.abs().max())):
        raise NonFiniteObservationError(
            layer_name, f"observed min={min_val.flatten()[:4].tolist()} max={max_val.flatten()[:4].tolist()}"
        )


def quant_range(bit_width: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer code range for ``bit_width`` bits.

    Args:
        bit_width: Number of bits, 2..16.
        signed: Two's-complement range ``[-2^(b-1), 2^(b-1)-1]``; else ``[0, 2^b-1]``.
        narrow: Drop the most negative code (signed) or the top code (unsigned), giving a range symmetric around 0
            for signed weights: ``[-(2^(b-1)-1), 2^(b-1)-1]``.

    Returns:
        ``(qmin, qmax)``.
    """
    if isinstance(bit_width, bool) or not isinstance(bit_width, int) or not MIN_BITS <= bit_width <= MAX_BITS:
        raise QuantizationError(f"bit_width={bit_width!r} is unsupported; use an integer in [{MIN_BITS}, {MAX_BITS}]")
    if signed:
        qmin, qmax = -(2 ** (bit_width - 1)), 2 ** (bit_width - 1) - 1
        return (qmin + 1, qmax) if narrow else (qmin, qmax)
    return (0, 2**bit_width - 2) if narrow else (0, 2**bit_width - 1)


def symmetric_zero_point(qmin: int, qmax: int) -> int:
    """Zero point of a symmetric range: 0 for signed ranges, ``(qmin + qmax + 1) // 2`` (e.g. 128) for unsigned."""
    return 0 if qmin < 0 else (qmin + qmax + 1) // 2


def compute_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a float range into (scale, zero_point); the only place this conversion happens.

    With ``lo = min(min_val, 0)`` and ``hi = max(max_val, 0)`` (the range always contains 0, so 0 is exact):

    * symmetric: ``scale = max(-lo, hi) / ((qmax - qmin) / 2)``, ``zero_point = 0`` for signed ranges and
      ``(qmin + qmax + 1) // 2`` for unsigned ones (128 for 8 bits, as torch.ao's default quint8 symmetric).
    * asymmetric: ``scale = (hi - lo) / (qmax - qmin)``,
      ``zero_point = clamp(qmin - round(lo / scale), qmin, qmax)``.

    ``scale`` is then clamped to ``[eps, MAX_SCALE]``, so all-zero, constant, tiny (1e-30) and huge (1e38, even when
    ``hi - lo`` overflows to inf) ranges give a finite, positive scale. The arithmetic is fp32 and matches
    torch.ao.quantization's observers bit for bit (same eps) except for symmetric unsigned with a customized qrange,
    where torch.ao uses ``(qmin + qmax) // 2``.

    Args:
        min_val: Range minimum; 0-d for per-tensor, 1-d (one per channel / candidate) otherwise.
        max_val: Range maximum, same shape as ``min_val``.
        qmin: Smallest integer code.
        qmax: Largest integer code.
        symmetric: Symmetric range around zero.
        eps: Smallest scale returned.

    Returns:
        ``(scale float32, zero_point int32)`` with the shape of ``min_val``.
    """
    if qmin >= qmax:
        raise QuantizationError(f"quantization range qmin={qmin}, qmax={qmax} is empty; need qmin < qmax")
    if min_val.shape != max_val.shape:
        raise QuantizationError(f"min_val shape {tuple(min_val.shape)} != max_val shape {tuple(max_val.shape)}")
    if min_val.dtype != torch.float32:
        min_val, max_val = min_val.float(), max_val.float()
    lo = torch.clamp(min_val.detach(), max=0.0)
    hi = torch.clamp(max_val.detach(), min=0.0)
    if symmetric:
        scale = torch.max(-lo, hi) / (float(qmax - qmin) / 2)
        scale = scale.clamp_(eps, MAX_SCALE)  # an overflowed (inf) range clamps to MAX_SCALE
        zero_point = torch.full_like(scale, symmetric_zero_point(qmin, qmax), dtype=torch.int32)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        scale = scale.clamp_(eps, MAX_SCALE)
        zero_point = (qmin - torch.round(lo / scale)).clamp_(qmin, qmax).to(torch.int32)
    return scale, zero_point


# --------------------------------------------------------------------------------------------------------- forward
def _as_qparams(x: torch.Tensor, scale, zero_point) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not (isinstance(scale, torch.Tensor) and scale.dtype == torch.float32):
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if zero_point is not None:
        if not isinstance(zero_point, torch.Tensor):
            zero_point = torch.as_tensor(zero_point, device=x.device)
        if zero_point.is_floating_point():
            zero_point = torch.round(zero_point)
        if zero_point.dtype != torch.int32:
            zero_point = zero_point.to(torch.int32)
    return scale, zero_point


def _broadcast_shape(x: torch.Tensor, axis: int | None) -> tuple | list:
    """The shape that broadcasts per-tensor (``()``) or per-channel (-1 at ``axis``) qparams against ``x``."""
    if axis is None:
        return ()
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return shape


def _check_zero_point(zero_point: torch.Tensor, qmin: int, qmax: int) -> None:
    # An out-of-range zero point would silently shift the representable range.
    if bool(((zero_point < qmin) | (zero_point > qmax)).any()):
        raise QuantizationError(
            f"zero_point {zero_point.tolist()} is outside [{qmin}, {qmax}]; clamp it into the range")


def fake_quantize_with_mask(
    x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize ``x`` and return the STE mask ``qmin <= round(x/s) + zp <= qmax``.

    Bit-identical to torch's ``fake_quantize_per_{tensor,channel}_affine(_cachemask)`` kernels (same fp32 ``x * (1/s)``,
    round-half-to-even, and ``(q - zp) * s``, which is exact before its single rounding in both), but built from
    vectorized tensor ops: on CPU these are several times faster than torch's scalar fake-quant kernels.

    Args:
        x: float32 input.
        scale: Positive scale(s): scalar / 0-d / 1-element for per-tensor, 1-d of length ``x.shape[axis]`` otherwise.
        zero_point: Integer zero point(s) (float values are rounded), same layout as ``scale``; None means 0.
        qmin: Smallest integer code.
        qmax: Largest integer code.
        axis: Channel axis for per-channel quantization; None for per-tensor.

    Returns:
        ``(fake-quantized x, bool mask)``.
    """
    scale, zero_point = _as_qparams(x, scale, zero_point)
    # On CUDA one fused kernel (per-tensor, or per-channel with a known zero point: torch's per-channel kernel reads
    # an integer zero point back to the host to range-check it); on CPU the vectorized ops below are faster. Same
    # values either way (tests).
    if x.device.type == "cuda" and (axis is None or zero_point is None):
        return fused_fake_quantize_with_mask(x, scale.float(), zero_point, qmin, qmax,
                                             None if axis is None else axis % x.dim())
    shape = _broadcast_shape(x, axis)
    scale = scale.reshape(shape)
    v = x * (1.0 / scale)
    v.round_()
    if zero_point is None:  # known zero (symmetric signed): two passes fewer
        q = v.clamp(qmin, qmax)
        mask = q == v  # before q is scaled in place
        return q.mul_(scale), mask
    zp = zero_point.reshape(shape).to(torch.float32)  # integer-valued and < 2**24: exact
    v.add_(zp)
    q = v.clamp(qmin, qmax)
    mask = q == v  # NaN inputs are outside
    return q.sub_(zp).mul_(scale), mask


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """Forward-only fake quantization, ``(clamp(round(x/s) + zp, qmin, qmax) - zp) * s``.

    Values are identical to ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine``
    (rounding is half-to-even, ``x/s`` is computed as ``x * (1/s)`` in fp32). See ``fake_quantize_with_mask`` for
    the arguments.
    """
    _, zp = _as_qparams(x, scale, zero_point)
    if zp is not None:
        _check_zero_point(zp, qmin, qmax)
    with torch.no_grad():
        return fake_quantize_with_mask(x, scale, zero_point, qmin, qmax, axis)[0]


def grid_distance(w: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None) -> torch.Tensor:
    """Oscillation dampening term (Nagel et al. 2022): ``sum(((stopgrad(q(w)) - clip(w)) / s) ** 2)``.

    Measured in quantization steps, so every layer's weights are pulled towards their grid points alike whatever
    their scale; the clip keeps weights beyond the range (which the STE mask already stops) out of the pull. The
    gradient is ``2 (clip(w) - q(w)) / s**2`` inside the range and 0 outside.
    """
    scale, zero_point = _as_qparams(w, scale, zero_point)
    shape = _broadcast_shape(w, axis)
    s = scale.reshape(shape)
    zp = 0.0 if zero_point is None else zero_point.reshape(shape).to(torch.float32)
    target = fake_quantize_with_mask(w.detach().float(), scale, zero_point, qmin, qmax, axis)[0]
    clipped = torch.minimum(torch.maximum(w.float(), (qmin - zp) * s), (qmax - zp) * s)
    return ((target - clipped) / s).pow(2).sum()


# ------------------------------------------------------------------------------------------------------- autograd
class STEFakeQuant(torch.autograd.Function):
    """Fake quantization with the clipped straight-through estimator: dx = dy * mask."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, axis: int | None):
        y, mask = fake_quantize_with_mask(x.float(), scale, zero_point, qmin, qmax, axis)
        ctx.save_for_backward(mask)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return grad_out * mask, None, None, None, None, None


def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ gradient scale ``g = 1 / sqrt(N * Qp)`` (Esser et al. 2020) with ``Qp = qmax``."""
    return 1.0 / math.sqrt(max(int(numel_per_scale), 1) * max(int(qmax), 1))


class LSQFakeQuant(torch.autograd.Function):
    """LSQ/LSQ+ fake quantization: STE for x, learned-step-size gradients (x g x grad_factor) for scale and zero point."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, axis: int | None, grad_scale: float,
                grad_factor: float = 1.0):
        # A learned scale can be pushed to <= 0 by the optimizer; the kernel needs a positive one.
        s = scale.detach().float().clamp(EPS, MAX_SCALE)
        zp = torch.round(zero_point.detach().float()).clamp(qmin, qmax)
        y = fake_quantize_with_mask(x.float(), s, zp, qmin, qmax, axis)[0]
        # x is saved in its own dtype: under AMP an fp32 copy would double the memory LSQ keeps per quantizer, and
        # fp16/bf16 -> fp32 is exact, so backward recomputes the very fp32 values forward used
        ctx.save_for_backward(x, s, zp)
        ctx.qrange, ctx.axis, ctx.grad_scale, ctx.grad_factor = (qmin, qmax), axis, grad_scale, grad_factor
        ctx.scale_meta = (scale.shape, scale.dtype)
        ctx.zp_meta = (zero_point.shape, zero_point.dtype, zero_point.requires_grad)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        """Per element, with v = x/s and q = round(v) + zp (all fp32):

        * dx = dy where qmin <= q <= qmax, else 0;
        * ds = g * dy * (round(v) - v inside, qmin - zp below, qmax - zp above) -- Esser et al. 2020, eq. 3;
        * dzp = g * dy * (0 inside, -s outside) -- LSQ+ (Bhalgat et al. 2020) for an integer-rounded zero point;

        ds and dzp are summed per scale and multiplied by ``grad_factor``, as torch.ao's learnable fake quantize does:
        it tunes the qparams' learning rate and, unlike a factor on dx, does not compound through the network's depth. torch's fused learnable-fake-quant backward kernels compute exactly these
        expressions in one pass, so they are used here (tests check them against an independent float64 formula).
        """
        x, s, zp = ctx.saved_tensors
        x = x.float()
        qmin, qmax = ctx.qrange
        grad_out = grad_out.float().contiguous()
        grad_x, grad_s, grad_zp = learnable_fake_quantize_backward(grad_out, x, s, zp, qmin, qmax, ctx.grad_scale,
                                                                   ctx.axis)
        if ctx.grad_factor != 1.0:
            grad_s, grad_zp = grad_s * ctx.grad_factor, grad_zp * ctx.grad_factor
        grad_s = grad_s.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1])
        zp_shape, zp_dtype, zp_requires_grad = ctx.zp_meta
        grad_zp = grad_zp.reshape(zp_shape).to(zp_dtype) if zp_requires_grad else None
        return grad_x, grad_s, grad_zp, None, None, None, None, None
