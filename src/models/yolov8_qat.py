"""YOLOv8 model surgery for QAT: reversible module swaps, quantizer placement and sharing, QAT checkpoints.

Placement (why it looks like this): OpenVINO and TensorRT run a convolution in INT8 when both its input and its
weight arrive through Quantize/Dequantize, and they fuse a quantizer that directly follows a conv (+activation) into
that conv so it writes INT8. So activation quantizers sit on the *outputs* of producers (each conv block, each
residual add, and the image input), and every tensor that reaches a quantized conv only through
quantization-agnostic ops (concat, chunk/split, max-pool, nearest upsample) is covered by them. Tensors that meet in
a concat must share one scale (otherwise the concat needs requantization); this is derived by tracing one forward
pass, not from a list of layer indices, so it holds for every model built from the supported blocks.

A shared quantizer serves several producer "sites"; each site keeps its own observer statistics and the scale covers
their union (see ``ObserverBase``). Shared quantizers live once in ``model.qat_quantizers`` (a ModuleDict) and sites
hold plain references, so ``state_dict`` holds each scale once and ``deepcopy`` (EMA) keeps the sharing.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from src.errors import QATError
from src.quantization.fake_quantize import FakeQuantize
from src.quantization.fusion import fuse_conv_bn, identity_bn_for

LOGGER = logging.getLogger("yolov8_qat")

QAT_CHECKPOINT_KEY = "yolov8_qat"
QAT_FORMAT_VERSION = 1


class UnsupportedModuleError(QATError):
    """The model holds a block this toolkit cannot quantize."""


def _ul():
    """Import Ultralytics' block classes lazily (src.env must have prepared the environment first)."""
    from ultralytics.nn.modules import block, conv, head

    return conv, block, head


# --------------------------------------------------------------------------------------------------------------------
# Sites: a (shared quantizer, site index) pair that a module calls on one of its tensors.
# --------------------------------------------------------------------------------------------------------------------
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


class _TraceSite:
    """Placeholder site used while tracing: tags the tensor it sees with its site id and returns it unchanged."""

    def __init__(self, tracer: "_PlacementTracer", site_id: int):
        self.tracer, self.site_id = tracer, site_id

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.tracer.tag(x, self.site_id)
        return x


class _SiteMixin:
    """Holds sites as plain attributes (kept out of ``_modules`` so shared quantizers are registered once)."""

    def _site(self, name: str):
        return self.__dict__.get(name)

    def _set_site(self, name: str, site) -> None:
        self.__dict__[name] = site


class QuantConv(_SiteMixin, nn.Module):
    """A convolution block with fake-quantized weight, optional input site and optional output site.

    Replaces Ultralytics' ``Conv``/``DWConv`` blocks (conv + BN + activation) and the Detect head's plain ``Conv2d``.
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
        self.source = source  # original block type: Conv, DWConv or Conv2d
        self._set_site("input_site", None)
        self._set_site("output_site", None)
        self._set_site("consumer_hook", None)

    @classmethod
    def from_float(cls, block: nn.Module, fuse: bool, name: str = "") -> "QuantConv":
        """Build from an Ultralytics ``Conv``/``DWConv`` block or a plain ``nn.Conv2d`` (weight quantizer set later)."""
        if isinstance(block, nn.Conv2d):
            return cls(block, nn.Identity(), None, None, "Conv2d")
        conv_mod, _, _ = _ul()
        if not isinstance(block, conv_mod.Conv):
            raise UnsupportedModuleError(f"{name}: expected an Ultralytics Conv block, got {type(block).__name__}")
        source = type(block).__name__
        if not hasattr(block, "bn"):  # already fused by Ultralytics
            return cls(block.conv, block.act, None, None, source)
        if fuse:
            return cls(fuse_conv_bn(block.conv, block.bn, name), block.act, None, None, source)
        return cls(block.conv, block.act, block.bn, None, source)

    def to_float(self) -> nn.Module:
        """Return the equivalent float module (an Ultralytics Conv block, or the plain Conv2d for head outputs)."""
        if self.source == "Conv2d":
            return self.conv
        conv_mod, _, _ = _ul()
        cls = conv_mod.DWConv if self.source == "DWConv" else conv_mod.Conv
        block = cls.__new__(cls)
        nn.Module.__init__(block)
        if self.norm is not None:
            block.conv, block.bn = self.conv, self.norm
        else:
            block.conv, block.bn = identity_bn_for(self.conv)
        block.act = self.act
        return block

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the conv uses it (fake-quantized when the weight quantizer is on)."""
        w = self.conv.weight
        q = self.weight_quant
        if q is None:
            return w
        if q.training and bool(q.observer_enabled):
            q.observer.reset()  # weight ranges follow the current weights, not their history
        return q(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hook = self._site("consumer_hook")
        if hook is not None:
            hook(self, x)
        site = self._site("input_site")
        if site is not None:
            x = site(x)
        c = self.conv
        y = F.conv2d(x, self.quantized_weight(), c.bias, c.stride, c.padding, c.dilation, c.groups)
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
        _, block_mod, _ = _ul()
        b = block_mod.Bottleneck.__new__(block_mod.Bottleneck)
        nn.Module.__init__(b)
        b.cv1, b.cv2, b.add = self.cv1, self.cv2, self.add
        return b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        if not self.add:
            return y
        y = x + y
        site = self._site("output_site")
        return site(y) if site is not None else y


# --------------------------------------------------------------------------------------------------------------------
# Tracing: which producer sites reach which quantized convs, and which must share a scale.
# --------------------------------------------------------------------------------------------------------------------
_AGNOSTIC = ("chunk", "split", "max_pool", "interpolate", "upsample", "__getitem__", "contiguous", "unbind")
_CONCAT = ("cat", "concat", "concatenate")


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def add(self, a: int) -> None:
        self.parent.setdefault(a, a)

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class _PlacementTracer(TorchFunctionMode):
    """Follows site tags through quantization-agnostic ops during one forward pass."""

    def __init__(self):
        super().__init__()
        self.tags: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps traced tensors alive so their ids stay unique
        self.uf = _UnionFind()
        self.consumer_inputs: dict[str, int | None] = {}
        self.mixed_concats = 0

    def tag(self, x: torch.Tensor, site_id: int) -> None:
        self.uf.add(site_id)
        self.tags[id(x)] = site_id
        self.keep.append(x)

    def tag_of(self, x: Any) -> int | None:
        return self.tags.get(id(x)) if isinstance(x, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if any(k == name for k in _CONCAT):
            tensors = args[0] if args else kwargs.get("tensors")
            tags = [self.tag_of(t) for t in tensors]
            if tags and all(t is not None for t in tags):
                for t in tags[1:]:
                    self.uf.union(tags[0], t)
                self._tag_out(out, tags[0])
            elif any(t is not None for t in tags):
                self.mixed_concats += 1
        elif any(k in name for k in _AGNOSTIC) and args:
            t = self.tag_of(args[0])
            if t is not None:
                self._tag_out(out, t)
        return out

    def _tag_out(self, out: Any, site_id: int) -> None:
        if isinstance(out, torch.Tensor):
            self.tags[id(out)] = site_id
            self.keep.append(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                self._tag_out(o, site_id)


# --------------------------------------------------------------------------------------------------------------------
# Placement description (plain data: saved in checkpoints and reports)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LayerPlacement:
    """How one convolution is quantized."""

    name: str
    match_name: str
    source: str
    quantized: bool
    weight_bits: int | None = None
    weight_scheme: str | None = None
    input_group: str | None = None
    output_group: str | None = None
    layer_configs: list[int] = field(default_factory=list)
    params: int = 0
    reason: str = ""


@dataclass
class GroupPlacement:
    """One activation quantizer and the producer sites that share it."""

    key: str
    sites: list[str]
    consumers: list[str]
    bits: int
    signed: bool
    symmetric: bool
    observer: str
    fq_type: str
    config_from: str


@dataclass
class Placement:
    layers: list[LayerPlacement]
    groups: list[GroupPlacement]
    fused: bool
    skip_detection_head: bool
    mixed_concats: int = 0

    def to_dict(self) -> dict:
        return {
            "layers": [vars(l) for l in self.layers],
            "groups": [vars(g) for g in self.groups],
            "fused": self.fused,
            "skip_detection_head": self.skip_detection_head,
            "mixed_concats": self.mixed_concats,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        return cls(
            [LayerPlacement(**l) for l in d["layers"]],
            [GroupPlacement(**g) for g in d["groups"]],
            d["fused"],
            d["skip_detection_head"],
            d.get("mixed_concats", 0),
        )

    def quantized_ratio(self) -> tuple[float, float]:
        """Quantized conv layers over all conv layers, by count and by parameter count."""
        q = [l for l in self.layers if l.quantized]
        n = len(self.layers) or 1
        p = sum(l.params for l in self.layers) or 1
        return len(q) / n, sum(l.params for l in q) / p

    def report(self) -> str:
        """Human-readable placement table."""
        lines = [
            f"{'layer':<34} {'match name':<40} {'quant':<5} {'w':>3} {'in group':<9} {'out group':<9} {'cfg':<6}",
        ]
        for l in self.layers:
            cfg = ",".join(map(str, l.layer_configs)) or "-"
            lines.append(
                f"{l.name:<34} {l.match_name:<40} {'yes' if l.quantized else 'no':<5} "
                f"{l.weight_bits or '-':>3} {l.input_group or '-':<9} {l.output_group or '-':<9} {cfg:<6}"
                + (f" {l.reason}" if l.reason else "")
            )
        lines.append("")
        lines.append(f"{'group':<6} {'bits':>4} {'sign':<5} {'obs':<22} {'type':<6} sites -> consumers")
        for g in self.groups:
            lines.append(
                f"{g.key:<6} {g.bits:>4} {'i' if g.signed else 'u':<5} {g.observer:<22} {g.fq_type:<6} "
                f"{', '.join(g.sites)} -> {', '.join(g.consumers) or '(none)'}"
            )
        r, rp = self.quantized_ratio()
        lines.append(f"quantized convs: {sum(l.quantized for l in self.layers)}/{len(self.layers)} "
                     f"({100 * r:.1f}% of layers, {100 * rp:.1f}% of conv parameters)")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Swapping modules
# --------------------------------------------------------------------------------------------------------------------
_LAYER_ATTRS = ("f", "i", "type", "np")  # set on top-level layers by Ultralytics' parse_model, read by its forward


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    for a in _LAYER_ATTRS:
        if hasattr(old, a) and not hasattr(new, a):
            setattr(new, a, getattr(old, a))
    setattr(parent, child, new)


def _supported_types():
    conv_mod, block_mod, head_mod = _ul()
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict, block_mod.C2f, block_mod.SPPF)
    agnostic = (conv_mod.Concat, nn.Upsample, nn.MaxPool2d, nn.Identity, nn.SiLU, nn.BatchNorm2d, block_mod.DFL)
    return containers, agnostic


def _detect_module(model: nn.Module) -> nn.Module:
    _, _, head_mod = _ul()
    heads = [m for m in model.modules() if isinstance(m, head_mod.Detect)]
    if len(heads) != 1 or type(heads[0]) is not head_mod.Detect:
        found = ", ".join(type(h).__name__ for h in heads) or "none"
        raise UnsupportedModuleError(
            f"expected exactly one Ultralytics Detect head, found: {found}. Only detection models are supported."
        )
    return heads[0]


def _check_supported(model: nn.Module) -> None:
    """Raise on any block we would not quantize correctly, naming it (nothing falls back silently)."""
    conv_mod, block_mod, head_mod = _ul()
    containers, agnostic = _supported_types()
    detect = _detect_module(model)
    if getattr(detect, "one2one_cv2", None) is not None:
        raise UnsupportedModuleError("end-to-end (one2one) Detect heads are not supported yet")
    allowed = containers + agnostic + (conv_mod.Conv, block_mod.Bottleneck, head_mod.Detect, nn.Conv2d)
    for name, m in model.model.named_modules(prefix="model"):
        if isinstance(m, (QuantConv, QuantBottleneck, FakeQuantize)):
            continue
        if type(m) in (conv_mod.Conv2, conv_mod.RepConv, conv_mod.ConvTranspose, conv_mod.GhostConv):
            raise UnsupportedModuleError(f"{name}: {type(m).__name__} blocks are not supported")
        if not isinstance(m, allowed) and any(isinstance(c, nn.Conv2d) for c in m.modules()):
            raise UnsupportedModuleError(
                f"{name}: unsupported block {type(m).__name__}. Supported: Conv, DWConv, C2f, Bottleneck, SPPF, "
                "Concat, Upsample, Detect (YOLOv8 blocks)."
            )


def _conv_sites(model: nn.Module, skip_head: bool) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, in_head) for every conv to quantize, in module order."""
    conv_mod, _, _ = _ul()
    detect = _detect_module(model)
    head_names = {n for n, m in model.named_modules() if m is detect}
    head_prefix = next(iter(head_names))
    out = []
    for name, m in model.named_modules():
        in_head = name.startswith(head_prefix + ".")
        if isinstance(m, conv_mod.Conv):
            out.append((name, m, in_head))
        elif in_head and isinstance(m, nn.Conv2d) and ".dfl" not in name and not name.endswith(".conv"):
            out.append((name, m, in_head))
    return out


def _weight_channels(conv: nn.Conv2d, axis: int, name: str) -> int:
    if not -conv.weight.dim() <= axis < conv.weight.dim():
        raise QATError(
            f"{name}: per-channel weight quantization on axis {axis}, but the weight has {conv.weight.dim()} dims "
            f"{tuple(conv.weight.shape)}; set quantization.weight.ch_axis to 0 (output channels)"
        )
    return conv.weight.shape[axis]


def prepare_qat_model(
    model: nn.Module,
    cfg,
    *,
    fuse: bool | None = None,
    skip_detection_head: bool | None = None,
    bit_overrides: dict[str, dict[str, Any]] | None = None,
    imgsz: int = 64,
) -> Placement:
    """Swap an Ultralytics DetectionModel's blocks for fake-quantized ones, in place.

    Args:
        model: An Ultralytics ``DetectionModel`` (float32).
        cfg: The resolved ``QATConfig``.
        fuse: Fold BN into conv weights (default: ``cfg.qat_params.fuse_modules``).
        skip_detection_head: Keep the Detect convs float (default: ``cfg.qat_params.skip_detection_head``).
        bit_overrides: Per layer name, ``{"weight_bits": b}`` or ``{"float": True}`` (mixed precision), and per group
            key ``{"activation_bits": b}``.
        imgsz: Image size of the tracing forward pass (any stride multiple works).

    Returns:
        The placement (plain data; also stored on ``model.qat_placement``).
    """
    from src.quantization.qconfig import block_types, layer_config_report, matchable_name, resolve_layer_qconfig

    fuse = cfg.qat_params.fuse_modules if fuse is None else fuse
    skip_head = cfg.qat_params.skip_detection_head if skip_detection_head is None else skip_detection_head
    bit_overrides = bit_overrides or {}
    _check_supported(model)
    blocks = block_types(model)
    _, block_mod, _ = _ul()

    model.eval()
    layers: list[LayerPlacement] = []
    qconvs: dict[str, QuantConv] = {}
    resolved: dict[str, Any] = {}
    conv_sites = _conv_sites(model, skip_head)
    # patterns match the conv's own name (model.0.conv for a Conv block) and its matchable alias
    conv_name = {name: name if isinstance(m, nn.Conv2d) else f"{name}.conv" for name, m, _ in conv_sites}
    aliases = {name: matchable_name(conv_name[name], blocks) for name, _, _ in conv_sites}
    layer_config_report(cfg, {conv_name[n]: a for n, a in aliases.items()})
    for name, m, in_head in conv_sites:
        alias = aliases[name]
        rl = resolve_layer_qconfig(cfg, conv_name[name], alias)
        resolved[name] = rl
        params = sum(p.numel() for p in m.parameters() if p.dim() > 1)
        override = bit_overrides.get(name, {})
        if (in_head and skip_head) or override.get("float"):
            reason = "skip_detection_head" if in_head and skip_head else "mixed precision: kept float"
            layers.append(LayerPlacement(name, alias, type(m).__name__, False, params=params, reason=reason,
                                         layer_configs=[*rl.matched, *rl.preset_rules]))
            continue
        q = QuantConv.from_float(m, fuse, name)
        wcfg = copy.deepcopy(rl.weight)
        if "weight_bits" in override:
            wcfg.bit_width = int(override["weight_bits"])
        per_channel = wcfg.scheme == "per_channel"
        nch = _weight_channels(q.conv, wcfg.ch_axis, name) if per_channel else None
        q.weight_quant = FakeQuantize(wcfg, _fq_config_for(rl.fake_quantize, wcfg, is_weight=True),
                                      is_weight=True, num_channels=nch, name=f"{name}.weight")
        _set_submodule(model, name, q)
        qconvs[name] = q
        layers.append(LayerPlacement(name, alias, q.source, True, wcfg.bit_width, wcfg.scheme, params=params,
                                     layer_configs=[*rl.matched, *rl.preset_rules]))
    for name, m in list(model.named_modules()):
        if type(m) is block_mod.Bottleneck and any(isinstance(c, QuantConv) for c in m.modules()):
            _set_submodule(model, name, QuantBottleneck.from_float(m))

    # Producer sites: every quantized conv block with an activation (not the head's output convs), every residual add.
    producers: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantConv) and m.source != "Conv2d":
            producers.append((name, m))
        elif isinstance(m, QuantBottleneck) and m.add:
            producers.append((name, m))

    tracer = _PlacementTracer()
    for i, (name, m) in enumerate(producers):
        m._set_site("output_site", _TraceSite(tracer, i))
    for name, q in qconvs.items():
        q._set_site("consumer_hook", lambda mod, x, n=name: tracer.consumer_inputs.__setitem__(n, tracer.tag_of(x)))
    try:
        p = next(model.parameters())
        with torch.no_grad(), tracer:
            model(torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype))
    finally:
        for name, m in producers:
            m._set_site("output_site", None)
        for q in qconvs.values():
            q._set_site("consumer_hook", None)

    # Sites whose tensors reach no quantized conv would be wasted Q/DQ pairs: keep only the useful ones (and their
    # concat partners, which must share the scale anyway).
    used_roots = {tracer.uf.find(t) for t in tracer.consumer_inputs.values() if t is not None}
    groups: dict[int, list[int]] = {}
    for i in range(len(producers)):
        if i in tracer.uf.parent and tracer.uf.find(i) in used_roots:
            groups.setdefault(tracer.uf.find(i), []).append(i)

    model.qat_quantizers = nn.ModuleDict()
    group_info: list[GroupPlacement] = []
    key_of_root: dict[int, str] = {}
    by_name = {l.name: l for l in layers}
    for gi, (root, members) in enumerate(sorted(groups.items())):
        key = f"a{gi}"
        key_of_root[root] = key
        first_name = producers[members[0]][0]
        group_info.append(_make_group(model, key, [producers[i][0] for i in members], first_name, resolved,
                                      blocks, cfg, bit_overrides))
        fq = model.qat_quantizers[key]
        for si, i in enumerate(members):
            pname, pm = producers[i]
            pm._set_site("output_site", Site(fq, si, key))
            if pname in by_name:
                by_name[pname].output_group = key
    # Convs whose input is not covered by a producer site (the image input, or after an unsupported op) get an input
    # quantizer of their own.
    for name, q in qconvs.items():
        t = tracer.consumer_inputs.get(name)
        if t is not None:
            key = key_of_root[tracer.uf.find(t)]
            next(g for g in group_info if g.key == key).consumers.append(name)
            by_name[name].input_group = key
            continue
        key = f"a{len(group_info)}"
        group_info.append(_make_group(model, key, [f"{name}:input"], name, resolved, blocks, cfg, bit_overrides))
        q._set_site("input_site", Site(model.qat_quantizers[key], 0, key))
        group_info[-1].consumers.append(name)
        by_name[name].input_group = key

    placement = Placement(layers, group_info, fuse, skip_head, tracer.mixed_concats)
    model.qat_placement = placement
    model.train()
    return placement


def _fq_config_for(fq_cfg, qcfg, *, is_weight: bool):
    """The fake-quantize settings one quantizer gets: a learned zero point (LSQ+) only where it means something,
    i.e. LSQ on an asymmetric activation quantizer (weights are symmetric, zero point 0)."""
    learn = bool(fq_cfg.learn_zero_point) and not is_weight and fq_cfg.learns_zero_point(qcfg)
    if learn == bool(fq_cfg.learn_zero_point):
        return fq_cfg
    out = copy.deepcopy(fq_cfg)
    out.learn_zero_point = learn
    return out


def _make_group(model, key, site_names, config_layer, resolved, blocks, cfg, bit_overrides):
    """Create the shared activation quantizer for one group (configured by its first producer) and describe it."""
    from src.quantization.qconfig import matchable_name, resolve_layer_qconfig

    rl = resolved.get(config_layer)
    if rl is None:  # producer is a residual add: configured by the bottleneck's own name
        rl = resolve_layer_qconfig(cfg, config_layer, matchable_name(config_layer, blocks))
    acfg = copy.deepcopy(rl.activation)
    if "activation_bits" in bit_overrides.get(key, {}):
        acfg.bit_width = int(bit_overrides[key]["activation_bits"])
    if acfg.scheme == "per_channel":
        raise QATError(
            f"{config_layer}: per-channel activation quantization is not deployable with shared concat scales; "
            "set quantization.activation.scheme: per_tensor"
        )
    fq = FakeQuantize(acfg, _fq_config_for(rl.fake_quantize, acfg, is_weight=False), is_weight=False,
                      num_sites=len(site_names), name=f"act:{key}")
    model.qat_quantizers[key] = fq
    return GroupPlacement(key, list(site_names), [], acfg.bit_width, fq.signed, acfg.symmetric, acfg.observer,
                          rl.fake_quantize.type, config_layer)


def to_float(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_qat_model` in place: Ultralytics blocks back, quantizers removed."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantBottleneck):
            _set_submodule(model, name, m.to_float())
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantConv):
            _set_submodule(model, name, m.to_float())
    if hasattr(model, "qat_quantizers"):
        del model.qat_quantizers
    if hasattr(model, "qat_placement"):
        del model.qat_placement
    return model


# --------------------------------------------------------------------------------------------------------------------
# Switches
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain data only (loads with torch.load(weights_only=True))
# --------------------------------------------------------------------------------------------------------------------
def _plain(obj: Any) -> Any:
    """Convert to plain data (dict/list/str/int/float/bool/None) for weights_only checkpoints."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def qat_checkpoint(model: nn.Module, cfg, *, extra: dict | None = None, state_dict: dict | None = None) -> dict:
    """The self-describing QAT checkpoint dict for ``model``.

    Holds float weights and quantizer state as tensors, and the model YAML, class names, placement and resolved
    config as plain data, so ``build_from_checkpoint`` rebuilds the exact model without unpickling any class.
    """
    if not is_qat_model(model):
        raise QATError("model is not prepared for QAT; call prepare_qat_model first")
    placement: Placement = model.qat_placement
    overrides = getattr(model, "qat_bit_overrides", {}) or {}
    sd = state_dict if state_dict is not None else model.state_dict()
    ckpt = {
        QAT_CHECKPOINT_KEY: {"format_version": QAT_FORMAT_VERSION},
        "model_yaml": _plain(model.yaml),
        "names": _plain(dict(model.names)),
        "nc": int(model.yaml.get("nc", len(model.names))),
        "stride": [float(s) for s in model.stride],
        "config": cfg.to_dict(),
        "placement": placement.to_dict(),
        "bit_overrides": _plain(overrides),
        "state_dict": {k: v.detach().clone().cpu() for k, v in sd.items()},
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def build_from_checkpoint(ckpt: dict, cfg=None) -> tuple[nn.Module, Any]:
    """Rebuild the fake-quantized model stored by :func:`qat_checkpoint` (bit-identical outputs).

    Args:
        ckpt: The loaded checkpoint dict.
        cfg: Config to use instead of the stored one (the placement always comes from the checkpoint).

    Returns:
        (model, cfg)
    """
    from ultralytics.nn.tasks import DetectionModel

    from src.config import QATConfig

    if QAT_CHECKPOINT_KEY not in ckpt:
        raise QATError("not a yolov8_qat checkpoint")
    version = ckpt[QAT_CHECKPOINT_KEY].get("format_version")
    if version != QAT_FORMAT_VERSION:
        raise QATError(f"unsupported QAT checkpoint format {version}; this toolkit reads {QAT_FORMAT_VERSION}")
    stored_cfg = QATConfig.from_dict(ckpt["config"])
    cfg = cfg or stored_cfg
    placement = Placement.from_dict(ckpt["placement"])
    yaml_cfg = copy.deepcopy(ckpt["model_yaml"])
    model = DetectionModel(yaml_cfg, nc=ckpt["nc"], verbose=False)
    model.names = {int(k): v for k, v in ckpt["names"].items()}
    overrides = ckpt.get("bit_overrides") or {}
    # placement structure (what is quantized and how) always follows the checkpoint
    pcfg = copy.deepcopy(stored_cfg)
    prepare_qat_model(model, pcfg, fuse=placement.fused, skip_detection_head=placement.skip_detection_head,
                      bit_overrides=overrides)
    model.qat_bit_overrides = overrides
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise QATError(
            f"checkpoint does not match the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "was it written by another version of this toolkit?"
        )
    return model, cfg


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
            if not bool(q.observer_enabled) or isinstance(q.scale, nn.Parameter):
                continue
            was = q.training
            q.train()
            m.quantized_weight()
            q.train(was)
