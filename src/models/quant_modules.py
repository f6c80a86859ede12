"""The fake-quantized blocks swapped into a YOLOv8 model, and the sites through which they call shared quantizers."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from src.errors import QATError
from src.integrations.ultralytics import block_modules, conv_block_bn, rebuild_bottleneck, rebuild_conv_block
from src.quantization.fake_quantize import FakeQuantize
from src.quantization.fusion import fuse_conv_bn, identity_bn_for


class UnsupportedModuleError(QATError):
    """The model holds a block this toolkit cannot quantize."""


class Site:
    """A reference to one producer site of a (possibly shared) activation quantizer; not a registered module."""

    __slots__ = ("quantizer", "index", "key")

    def __init__(self, quantizer: FakeQuantize, index: int, key: str):
        self.quantizer, self.index, self.key = quantizer, index, key

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(x, site=self.index)

    def __deepcopy__(self, memo):
        return Site(copy.deepcopy(self.quantizer, memo), self.index, self.key)

    def __repr__(self) -> str:
        return f"Site({self.key}[{self.index}])"


class _SiteMixin:
    """Holds sites as plain attributes (kept out of ``_modules`` so shared quantizers are registered once)."""

    def _site(self, name: str):
        return self.__dict__.get(name)

    def _set_site(self, name: str, site) -> None:
        self.__dict__[name] = site


class QuantConv(_SiteMixin, nn.Module):
    """A convolution block with fake-quantized weight, optional input site and optional output site.

    Replaces Ultralytics' ``Conv``/``DWConv`` blocks (conv + BN + activation), the head's plain ``Conv2d`` and a
    segmentation head's mask-prototype upsampling ``ConvTranspose2d``.
    With fusion the BN is folded into ``conv``; without it the BN is kept as ``norm`` (not ``bn``, so Ultralytics'
    own ``fuse()`` leaves this block alone).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        act: nn.Module,
        norm: nn.BatchNorm2d | None,
        weight_quant: FakeQuantize | None,
        source: str,
    ):
        super().__init__()
        self.conv = conv
        self.norm = norm
        self.act = act
        self.weight_quant = weight_quant
        self.source = source  # original block type: Conv, DWConv, Conv2d or ConvTranspose2d
        self._set_site("input_site", None)
        self._set_site("output_site", None)
        self._set_site("consumer_hook", None)

    @classmethod
    def from_float(cls, block: nn.Module, fuse: bool, name: str = "") -> "QuantConv":
        """Build from an Ultralytics ``Conv``/``DWConv`` block, a plain ``nn.Conv2d`` or ``nn.ConvTranspose2d``
        (weight quantizer set later)."""
        if isinstance(block, (nn.Conv2d, nn.ConvTranspose2d)):
            return cls(block, nn.Identity(), None, None, type(block).__name__)
        if not isinstance(block, block_modules().conv.Conv):
            raise UnsupportedModuleError(f"{name}: expected an Ultralytics Conv block, got {type(block).__name__}")
        source = type(block).__name__
        bn = conv_block_bn(block)
        if bn is None:
            return cls(block.conv, block.act, None, None, source)
        if fuse:
            return cls(fuse_conv_bn(block.conv, bn, name), block.act, None, None, source)
        return cls(block.conv, block.act, bn, None, source)

    def to_float(self) -> nn.Module:
        """Return the equivalent float module (an Ultralytics Conv block, or the plain Conv2d for head outputs)."""
        if self.source in ("Conv2d", "ConvTranspose2d"):
            return self.conv
        conv, bn = (self.conv, self.norm) if self.norm is not None else identity_bn_for(self.conv)
        return rebuild_conv_block(self.source, conv, bn, self.act)

    @property
    def transposed(self) -> bool:
        """Whether this is a transposed conv (weight (in, out, kh, kw); a segmentation head's proto upsampling)."""
        return isinstance(self.conv, nn.ConvTranspose2d)

    def conv_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """This block's convolution (plain or transposed, its stride, padding, ...) of ``x`` with ``weight``."""
        c = self.conv
        if self.transposed:
            return F.conv_transpose2d(x, weight, bias, c.stride, c.padding, c.output_padding, c.groups, c.dilation)
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the conv uses it (fake-quantized when the weight quantizer is on)."""
        w = self.conv.weight
        q = self.weight_quant
        if q is None:
            return w
        if q.training and q.observing:
            q.observer.reset()  # weight ranges follow the current weights, not their history
        return q(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hook = self._site("consumer_hook")
        if hook is not None:
            hook(self, x)
        site = self._site("input_site")
        if site is not None:
            x = site(x)
        y = self.conv_with(x, self.quantized_weight(), self.conv.bias)
        if self.norm is not None:
            y = self.norm(y)
        y = self.act(y)
        site = self._site("output_site")
        return site(y) if site is not None else y

    def extra_repr(self) -> str:
        i, o = self._site("input_site"), self._site("output_site")
        return f"source={self.source}, input_site={i!r}, output_site={o!r}"


class QuantBottleneck(_SiteMixin, nn.Module):
    """Ultralytics ``Bottleneck`` whose residual add output is quantized (a producer site)."""

    def __init__(self, cv1: nn.Module, cv2: nn.Module, add: bool):
        super().__init__()
        self.cv1, self.cv2, self.add = cv1, cv2, add
        self._set_site("output_site", None)

    @classmethod
    def from_float(cls, block: nn.Module) -> "QuantBottleneck":
        return cls(block.cv1, block.cv2, bool(block.add))

    def to_float(self) -> nn.Module:
        return rebuild_bottleneck(self.cv1, self.cv2, self.add)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        if not self.add:
            return y
        y = x + y
        site = self._site("output_site")
        return site(y) if site is not None else y
