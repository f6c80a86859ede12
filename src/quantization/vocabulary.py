"""The names of quantization: integer types, granularities, observers, range methods and gradient rules.

Plain data and the rules that combine them, read by config validation (``src/config.py``) and by the modules that
build quantizers (``observers.py``, ``fake_quantize.py``), so a name or a rule is written once.
"""

from __future__ import annotations

# dtype names only the signedness of the integer grid; its size is the bit width.
DTYPES = ("qint8", "quint8")
SIGNED_DTYPE = "qint8"
SCHEMES = ("per_tensor", "per_channel")
PER_TENSOR, PER_CHANNEL = SCHEMES
# Every export container (ONNX QDQ, OpenVINO, TensorRT, TFLite) stores 8-bit integers: the widest deployable width.
STORAGE_BITS = 8
OBSERVERS = ("minmax", "moving_average_minmax", "per_channel_minmax", "histogram")
PER_TENSOR_ONLY_OBSERVERS = ("moving_average_minmax", "histogram")
HISTOGRAM_METHODS = ("percentile", "mse", "entropy")

# Gradient rules: "ste" = straight-through estimator with clipping mask, "lsq" = learned step size (its scale and
# zero-point gradients x grad_factor).
FAKE_QUANT_TYPES = ("ste", "lsq")
# The spec's configs write "custom" for the straight-through estimator: accepted as a name for it, silently.
FAKE_QUANT_ALIASES = {"custom": "ste"}
STE, LSQ = FAKE_QUANT_TYPES


def canonical_fake_quant_type(name: str) -> str:
    """``name`` with aliases resolved ("custom" -> "ste"); unknown names are returned unchanged for the caller."""
    return FAKE_QUANT_ALIASES.get(name, name)


def grad_factor_problem(fake_quant_type: str, grad_factor: float) -> str | None:
    """``grad_factor`` multiplies the gradients of learned scales and zero points (LSQ), as in torch.ao."""
    if not grad_factor > 0:
        return f"grad_factor={grad_factor} must be > 0 (1.0 = the plain LSQ gradient)"
    if grad_factor != 1.0 and canonical_fake_quant_type(fake_quant_type) != LSQ:
        return (f"grad_factor={grad_factor} scales the gradients of learned scales and zero points, and type "
                f"{fake_quant_type!r} learns none (the STE passes input gradients through unscaled); set type: lsq "
                "or grad_factor: 1.0")
    return None


def observer_scheme_problem(observer: str, scheme: str) -> str | None:
    """Why ``observer`` cannot run with ``scheme`` and what to write instead, or None when they combine."""
    if observer == "per_channel_minmax" and scheme != "per_channel":
        return (f"'per_channel_minmax' needs scheme 'per_channel' (got {scheme!r}); set scheme: per_channel, or use "
                "observer 'minmax' for one range per tensor")
    if scheme == "per_channel" and observer in PER_TENSOR_ONLY_OBSERVERS:
        return (f"{observer!r} is per-tensor only but scheme is 'per_channel'; use observer 'minmax' (or "
                "'per_channel_minmax') with per_channel, or set scheme: per_tensor")
    return None


def activation_scheme_problem(scheme: str) -> str | None:
    """Activations are quantized per tensor: every export format does, and concat inputs share one scale."""
    if scheme == PER_TENSOR:
        return None
    return (f"{scheme!r} is not supported for activations (every export format quantizes activations per tensor, "
            "and tensors meeting at a concat share one scale); use per_tensor")


def weight_rule_problem(dtype: str, symmetric: bool) -> str | None:
    """Weights are signed and symmetric (zero point 0, the form ONNX/TensorRT/TFLite int8 kernels take)."""
    if symmetric and dtype == SIGNED_DTYPE:
        return None
    return (f"weights are quantized signed and symmetric (zero-point 0, the form ONNX/TensorRT/TFLite int8 kernels "
            f"take); got dtype={dtype!r}, symmetric={symmetric}; set dtype: qint8 and symmetric: true")
