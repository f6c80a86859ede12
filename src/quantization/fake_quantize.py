"""``FakeQuantize``: an observer, the live scale/zero point, on/off switches and the ONNX export form.

Numerics live in ``utils``; this module only holds state and decides which path runs:

* training + observer on: collect ``x``; with fake quant on, scale/zero point are refreshed once per forward pass, at
  the quantizer's first site, so every site of a shared quantizer uses one scale (with fake quant off, e.g. during
  calibration, lazily: at the latest when the observer is switched off or the state is saved). An LSQ quantizer stops
  observing once its scale came from data (calibration, or its first forward pass): from there on it learns the scale. Eval mode never updates
  statistics.
* fake quant on: ``STEFakeQuant`` (type ``ste``, alias ``custom``) or ``LSQFakeQuant`` (type ``lsq``, learned scale and optionally
  a learned zero point, LSQ+).
* ``export_mode``: plain ``torch.fake_quantize_per_{tensor,channel}_affine`` with an 8-bit container range, which the
  TorchScript ONNX exporter (``torch.onnx.export(..., dynamo=False)``, opset >= 13) turns into
  QuantizeLinear/DequantizeLinear.

Quantization always runs in fp32: autocast is disabled around it, the input is cast to float and the output back to
the input dtype.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from src.quantization import vocabulary as vocab
from src.quantization.observers import build_observer
from src.quantization.utils import (
    EPS,
    MAX_SCALE,
    LSQFakeQuant,
    QuantizationError,
    STEFakeQuant,
    lsq_grad_scale,
    quant_range,
)

# Ranges the TorchScript ONNX exporter accepts for fake_quantize_* ops.
EXPORT_RANGES = {True: (-128, 127), False: (0, 255)}


class FakeQuantize(nn.Module):
    """Simulated quantization of weights or activations.

    Args:
        qcfg: QuantizerConfig-like object (``dtype``, ``scheme``, ``observer``, ``symmetric``, ``bit_width``,
            ``ch_axis``, ``averaging_constant``, ``histogram_*``, ``percentile``).
        fq_cfg: FakeQuantizeConfig-like object (``type``, ``grad_factor``, ``learn_zero_point``).
        is_weight: Weights use the signed narrow symmetric range ``[-(2^(b-1)-1), 2^(b-1)-1]`` with zero point 0.
        num_channels: Size of ``qcfg.ch_axis``; required for ``scheme: per_channel``.
        num_sites: Number of producer tensors sharing this quantizer (see observers).
        name: Layer name for messages.
    """

    def __init__(self, qcfg, fq_cfg, *, is_weight: bool, num_channels: int | None = None, num_sites: int = 1,
                 name: str = ""):
        super().__init__()
        where = name or ("weight quantizer" if is_weight else "activation quantizer")
        self.name, self.is_weight = name, bool(is_weight)
        if qcfg.dtype not in vocab.DTYPES:
            raise QuantizationError(
                f"{where}: dtype={qcfg.dtype!r} is unknown; use qint8 (signed) or quint8 (unsigned)")
        signed = qcfg.dtype == vocab.SIGNED_DTYPE
        problem = vocab.weight_rule_problem(qcfg.dtype, qcfg.symmetric) if is_weight else None
        if problem:
            raise QuantizationError(f"{where}: {problem}")
        if qcfg.scheme not in vocab.SCHEMES:
            raise QuantizationError(f"{where}: scheme={qcfg.scheme!r} is unknown; use per_tensor or per_channel")
        fq_type = vocab.canonical_fake_quant_type(getattr(fq_cfg, "type", vocab.STE))
        if fq_type not in vocab.FAKE_QUANT_TYPES:
            raise QuantizationError(f"{where}: fake_quantize type={fq_type!r} is unknown; use "
                                    f"{' or '.join(vocab.FAKE_QUANT_TYPES)}")
        grad_factor = float(getattr(fq_cfg, "grad_factor", 1.0))
        problem = vocab.grad_factor_problem(fq_type, grad_factor)
        if problem:
            raise QuantizationError(f"{where}: {problem}")
        learn_zp = bool(getattr(fq_cfg, "learn_zero_point", False))
        if learn_zp and fq_type != vocab.LSQ:
            raise QuantizationError(f"{where}: learn_zero_point needs fake_quantize type: lsq")
        if learn_zp and (is_weight or qcfg.symmetric):
            raise QuantizationError(f"{where}: learn_zero_point (LSQ+) is for asymmetric activations; "
                                    "set symmetric: false or learn_zero_point: false")
        per_channel = qcfg.scheme == "per_channel"
        ch_axis = getattr(qcfg, "ch_axis", 0) if per_channel else None
        if per_channel and (not isinstance(num_channels, int) or num_channels < 1):
            raise QuantizationError(f"{where}: scheme per_channel needs num_channels (size of axis {ch_axis}), "
                                    f"got {num_channels!r}")

        self._qmin, self._qmax = quant_range(qcfg.bit_width, signed, narrow=is_weight)
        self._bit_width, self._signed, self._symmetric = int(qcfg.bit_width), signed, bool(qcfg.symmetric)
        self._ch_axis, self.fq_type, self.grad_factor, self.learn_zero_point = ch_axis, fq_type, grad_factor, learn_zp
        self.export_mode = False
        self._stale = False  # qparams lag the observer (observed with fake quant off)
        self._from_data = False  # scale/zero point derived from observed data (or loaded) rather than the default
        self.observer = build_observer(qcfg, self._qmin, self._qmax, self._symmetric, num_channels=num_channels,
                                       num_sites=num_sites, name=name)
        self.observer.sync_distributed = not is_weight

        scale, zero_point = self.observer.compute()  # the no-data default
        if fq_type == vocab.LSQ:
            self.scale = nn.Parameter(scale.clone())
        else:
            self.register_buffer("scale", scale.clone())
        if learn_zp:
            self.zero_point = nn.Parameter(zero_point.float())
        else:
            self.register_buffer("zero_point", zero_point.clone())
        # The switches are buffers (saved, replicated) mirrored by Python flags, so the forward pass never reads a
        # tensor back to the host: every change goes through enable_* or a state_dict load (copy_switches_from for EMA).
        self.register_buffer("observer_enabled", torch.ones((), dtype=torch.uint8))
        self.register_buffer("fake_quant_enabled", torch.ones((), dtype=torch.uint8))
        self._observing = self._fake_quantizing = True

    # -- properties --------------------------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        return self._qmin

    @property
    def qmax(self) -> int:
        return self._qmax

    @property
    def bit_width(self) -> int:
        return self._bit_width

    @property
    def per_channel(self) -> bool:
        return self._ch_axis is not None

    @property
    def ch_axis(self) -> int | None:
        return self._ch_axis

    @property
    def symmetric(self) -> bool:
        return self._symmetric

    @property
    def signed(self) -> bool:
        return self._signed

    # -- switches ----------------------------------------------------------------------------------------------------
    @property
    def observing(self) -> bool:
        """The observer switch (``observer_enabled``), read without a device sync."""
        return self._observing

    @property
    def fake_quantizing(self) -> bool:
        """The fake-quant switch (``fake_quant_enabled``), read without a device sync."""
        return self._fake_quantizing

    def enable_observer(self, flag: bool = True) -> "FakeQuantize":
        """Turn range observation on/off; switching it off finalizes scale/zero point from the observer."""
        if not flag:
            self._refresh_if_stale()
        self.observer_enabled.fill_(int(bool(flag)))
        self._observing = bool(flag)
        return self

    def enable_fake_quant(self, flag: bool = True) -> "FakeQuantize":
        """Turn fake quantization on/off (off: identity)."""
        if flag:
            self._refresh_if_stale()
        self.fake_quant_enabled.fill_(int(bool(flag)))
        self._fake_quantizing = bool(flag)
        return self

    def copy_switches_from(self, other: "FakeQuantize") -> None:
        """Take ``other``'s Python mirrors of its buffers after they were copied into this module's (the EMA does)."""
        self._observing, self._fake_quantizing = other._observing, other._fake_quantizing
        # a shared quantizer ends a training pass stale (its later sites observed after site 0's refresh): the copied
        # statistics are newer than the copied scale until this copy refreshes too
        self._stale, self._from_data = other._stale, other._from_data
        self.observer.copy_state_flags_from(other.observer)

    def freeze(self) -> "FakeQuantize":
        """Stop observing: the scale stays fixed (custom) or is learned from here on (lsq)."""
        return self.enable_observer(False)

    def set_export_mode(self, flag: bool = True) -> "FakeQuantize":
        """Use the ONNX-exportable ``torch.fake_quantize_*`` form in ``forward``."""
        if flag:
            self._refresh_if_stale()
        self.export_mode = bool(flag)
        return self

    # -- qparams -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _refresh_qparams(self) -> None:
        scale, zero_point = self.observer.compute()
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self._stale = False
        self._from_data = True

    def _refresh_if_stale(self) -> None:
        if self._stale:
            self._refresh_qparams()

    def _int_zero_point(self) -> torch.Tensor:
        zp = self.zero_point.detach()
        if zp.is_floating_point():
            zp = torch.round(zp).clamp(self._qmin, self._qmax)
        return zp.to(torch.int32)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Current ``(scale float32, zero_point int32)``, detached copies."""
        self._refresh_if_stale()
        scale = self.scale.detach().float().clamp(EPS, MAX_SCALE).clone()
        return scale, self._int_zero_point().clone()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self._refresh_if_stale()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._stale = False  # a saved state is always refreshed (see _save_to_state_dict)
        self._from_data = True
        self._observing, self._fake_quantizing = bool(self.observer_enabled), bool(self.fake_quant_enabled)

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, site: int = 0) -> torch.Tensor:
        """Observe (training + observer on) and fake-quantize (fake quant on) ``x``."""
        if self.export_mode:
            return self._export_forward(x)
        observe = self.training and self._observing
        quantize = self._fake_quantizing
        if not (observe or quantize):
            return x
        if x.device.type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._quantize(x, site, observe, quantize)
        return self._quantize(x, site, observe, quantize)

    def _quantize(self, x: torch.Tensor, site: int, observe: bool, quantize: bool) -> torch.Tensor:
        xf = x if x.dtype == torch.float32 else x.float()
        if observe and quantize and self.fq_type == vocab.LSQ and self._from_data:
            observe = False  # the scale is a learned parameter now: the observer only initialised it
        if observe:
            self.observer.collect(xf.detach(), site)
            self._stale = True
        if not quantize:
            return x
        # Sites run in order within a forward pass (the placement orders them so): the scale is refreshed at site 0,
        # and every later site of a shared quantizer uses that same scale (their statistics enter at the next pass).
        if site == 0 or not observe:
            self._refresh_if_stale()
        axis = None if self._ch_axis is None else self._ch_axis % x.dim()
        if self.fq_type == vocab.LSQ:
            numel_per_scale = xf.numel() // max(self.scale.numel(), 1)
            g = lsq_grad_scale(numel_per_scale, self._qmax)
            y = LSQFakeQuant.apply(x, self.scale, self.zero_point, self._qmin, self._qmax, axis, g,
                                   self.grad_factor)
        else:
            # symmetric signed ranges have zero_point 0 by construction: None skips two passes
            zero_point = None if self._symmetric and self._signed else self.zero_point
            y = STEFakeQuant.apply(xf, self.scale, zero_point, self._qmin, self._qmax, axis)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Traceable form with constant qparams in an 8-bit container range.

        Ranges other than the container (narrow-range weights, sub-8-bit) clamp to their own representable range
        first, so the 8-bit Q/DQ pair reproduces the QAT numerics exactly; the ONNX graph then holds a Clip (or
        Max/Min per channel) before QuantizeLinear, which the export step may fold or rewrite.
        """
        if not self._fake_quantizing:
            return x
        if self._bit_width > vocab.STORAGE_BITS:
            raise QuantizationError(f"{self.name or 'quantizer'}: ONNX QDQ export supports at most "
                                    f"{vocab.STORAGE_BITS} bits, this "
                                    f"quantizer has bit_width={self._bit_width}; export it as float or use 8 bits")
        scale, zero_point = self.calculate_qparams()
        cmin, cmax = EXPORT_RANGES[self._signed]
        # Tensors built from Python values are traced as constants, so QuantizeLinear gets constant scale/zp.
        const = lambda t, dtype: torch.tensor(t.tolist(), dtype=dtype, device=x.device)  # noqa: E731
        xf = x.float()
        if (self._qmin, self._qmax) != (cmin, cmax):
            lo, hi = (self._qmin - zero_point) * scale, (self._qmax - zero_point) * scale
            if self._ch_axis is None:
                xf = torch.clamp(xf, float(lo), float(hi))
            else:
                shape = [1] * x.dim()
                shape[self._ch_axis % x.dim()] = -1
                xf = torch.clamp(xf, const(lo, torch.float32).reshape(shape), const(hi, torch.float32).reshape(shape))
        scale, zero_point = const(scale, torch.float32), const(zero_point, torch.int32)
        if self._ch_axis is None:
            y = torch.fake_quantize_per_tensor_affine(xf, scale, zero_point, cmin, cmax)
        else:
            y = torch.fake_quantize_per_channel_affine(xf, scale, zero_point, self._ch_axis % x.dim(), cmin, cmax)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        self._refresh_if_stale()
        axis = "per-tensor" if self._ch_axis is None else f"per-channel(axis={self._ch_axis})"
        scale, zp = self.scale.detach(), self._int_zero_point()
        if scale.numel() == 1:
            s, z = f"{float(scale):.6g}", f"{int(zp)}"
        else:
            s = f"[{float(scale.min()):.6g}, {float(scale.max()):.6g}]"
            z = f"[{int(zp.min())}, {int(zp.max())}]"
        return (f"bits={self._bit_width}, {'signed' if self._signed else 'unsigned'}, {axis}, "
                f"qrange=[{self._qmin}, {self._qmax}], symmetric={self._symmetric}, type={self.fq_type}, "
                f"observer={self.observer.kind}, scale={s}, zero_point={z}, "
                f"observer_enabled={self._observing}, fake_quant_enabled={self._fake_quantizing}")


def fake_quantizers(model: nn.Module) -> Iterator[FakeQuantize]:
    """All FakeQuantize modules of ``model``."""
    return (m for m in model.modules() if isinstance(m, FakeQuantize))


@contextlib.contextmanager
def export_mode(model: nn.Module):
    """Within the block, every FakeQuantize of ``model`` runs its ONNX-exportable form."""
    quantizers = list(fake_quantizers(model))
    previous = [q.export_mode for q in quantizers]
    for q in quantizers:
        q.set_export_mode(True)
    try:
        yield model
    finally:
        for q, flag in zip(quantizers, previous):
            q.export_mode = flag
