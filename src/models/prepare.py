"""Preparing a DetectionModel for QAT in three phases (swap blocks, trace sites, attach quantizers), and undoing it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from src.errors import QATError
from src.integrations.ultralytics import block_modules, carry_layer_attrs, inactive_head_branches
from src.models.placement import GroupPlacement, LayerPlacement, Placement, plain_data
from src.models.quant_modules import QuantBottleneck, QuantConv, Site, UnsupportedModuleError
from src.models.tracing import SiteTrace, trace_sites
from src.qconfig import block_types, layer_config_report, matchable_name, resolve_layer_qconfig
from src.quantization.fake_quantize import FakeQuantize
from src.quantization.vocabulary import activation_scheme_problem


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
            key ``{"activation_bits": b}``; recorded on the placement.
        imgsz: Image size of the tracing forward pass (any stride multiple works).

    Returns:
        The placement (plain data; also stored on ``model.qat_placement``).
    """
    fuse = cfg.qat_params.fuse_modules if fuse is None else fuse
    skip_head = cfg.qat_params.skip_detection_head if skip_detection_head is None else skip_detection_head
    bit_overrides = bit_overrides or {}
    check_supported(model)
    device = next(model.parameters()).device  # the new quantizers' state joins the model where it already is
    model.eval()
    swapped = swap_modules(model, cfg, fuse, skip_head, bit_overrides)
    model.to(device)
    trace = trace_sites(model, swapped.qconvs, imgsz)
    groups = attach_quantizers(model, swapped, trace, cfg, bit_overrides)
    model.to(device)
    placement = Placement(swapped.layers, groups, fuse, skip_head, trace.mixed_concats, plain_data(bit_overrides))
    model.qat_placement = placement
    model.train()
    return placement


# --------------------------------------------------------------------------------------------------------------------
# Phase 1: swap blocks
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class SwappedModules:
    """What the swap phase did.

    Attributes:
        layers: Placement of every conv (quantized or kept float), in module order.
        qconvs: The quantized convs by name.
        resolved: The resolved layer qconfig of every conv by name.
        blocks: Block type per module name (for matchable names).
    """

    layers: list[LayerPlacement]
    qconvs: dict[str, QuantConv]
    resolved: dict[str, Any]
    blocks: dict[str, str]


def swap_modules(model: nn.Module, cfg, fuse: bool, skip_head: bool,
                 bit_overrides: dict[str, dict[str, Any]]) -> SwappedModules:
    """Replace each conv to quantize by a QuantConv holding its weight quantizer, and every Bottleneck around one by
    a QuantBottleneck (whose residual add becomes a producer site)."""
    blocks = block_types(model)
    layers: list[LayerPlacement] = []
    qconvs: dict[str, QuantConv] = {}
    resolved: dict[str, Any] = {}
    conv_sites = _conv_sites(model, skip_head)
    # patterns match the conv's own name (model.0.conv for a Conv block) and its matchable alias
    conv_name = {name: name if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) else f"{name}.conv"
                 for name, m, _ in conv_sites}
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
        if q.transposed and wcfg.scheme == "per_channel":
            # OpenVINO's CPU plugin runs a deconvolution int8 with one weight scale only (measured: per-channel
            # weights kept it and 31 of yolov8n-seg's other 75 convs in bf16)
            wcfg.scheme = "per_tensor"
            wcfg.observer = "minmax" if wcfg.observer == "per_channel_minmax" else wcfg.observer
        per_channel = wcfg.scheme == "per_channel"
        nch = _weight_channels(q.conv, wcfg.ch_axis, name) if per_channel else None
        q.weight_quant = FakeQuantize(wcfg, _fq_config_for(rl.fake_quantize, wcfg, is_weight=True),
                                      is_weight=True, num_channels=nch, name=f"{name}.weight")
        _set_submodule(model, name, q)
        qconvs[name] = q
        layers.append(LayerPlacement(name, alias, q.source, True, wcfg.bit_width, wcfg.scheme, params=params,
                                     layer_configs=[*rl.matched, *rl.preset_rules]))
    bottleneck = block_modules().block.Bottleneck
    for name, m in list(model.named_modules()):
        if type(m) is bottleneck and any(isinstance(c, QuantConv) for c in m.modules()):
            _set_submodule(model, name, QuantBottleneck.from_float(m))
    return SwappedModules(layers, qconvs, resolved, blocks)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    carry_layer_attrs(getattr(parent, child), new)
    setattr(parent, child, new)


def _detect_module(model: nn.Module) -> nn.Module:
    head_mod = block_modules().head
    supported = (head_mod.Detect, head_mod.Segment, head_mod.Pose)
    heads = [m for m in model.modules() if isinstance(m, head_mod.Detect)]
    if len(heads) != 1 or type(heads[0]) not in supported:
        found = ", ".join(type(h).__name__ for h in heads) or "none"
        raise UnsupportedModuleError(
            f"expected exactly one Ultralytics Detect, Segment or Pose head, found: {found}. Supported: Detect "
            "(YOLOv8, YOLO11, YOLO26), Segment and Pose (tested on YOLOv8); not Segment26, Pose26, OBB."
        )
    return heads[0]


def deployed_layers(model: nn.Module) -> list[LayerPlacement]:
    """The placement's convs an inference forward runs: all but an end-to-end head's unused branch (YOLO26 trains
    both branches; an export holds the one its ``end2end`` setting selects)."""
    placement = model.qat_placement
    detect = _detect_module(model)
    head = next(n for n, m in model.named_modules() if m is detect)
    unused = tuple(f"{head}.{b}." for b in inactive_head_branches(detect))
    return [l for l in placement.layers if not l.name.startswith(unused)] if unused else list(placement.layers)


def check_supported(model: nn.Module) -> None:
    """Raise on any block we would not quantize correctly, naming it (nothing falls back silently)."""
    conv_mod, block_mod, head_mod = block_modules()
    # C3k2 (YOLO11) is a C2f, C3k a C3; C2PSA / PSABlock / Attention hold convs (quantized) and the attention's
    # matmuls and softmax, which stay float by design (no conv reads them: the tracer gives them no quantizer)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict, block_mod.C2f, block_mod.C3, block_mod.SPPF,
                  block_mod.C2PSA, block_mod.PSABlock, block_mod.Attention, block_mod.Proto)
    agnostic = (conv_mod.Concat, nn.Upsample, nn.MaxPool2d, nn.Identity, nn.SiLU, nn.BatchNorm2d, block_mod.DFL)
    _detect_module(model)
    allowed = containers + agnostic + (conv_mod.Conv, block_mod.Bottleneck, head_mod.Detect, nn.Conv2d,
                                       nn.ConvTranspose2d)
    for name, m in model.model.named_modules(prefix="model"):
        if isinstance(m, (QuantConv, QuantBottleneck, FakeQuantize)):
            continue
        if type(m) in (conv_mod.Conv2, conv_mod.RepConv, conv_mod.ConvTranspose, conv_mod.GhostConv):
            raise UnsupportedModuleError(f"{name}: {type(m).__name__} blocks are not supported")
        if not isinstance(m, allowed) and any(isinstance(c, nn.Conv2d) for c in m.modules()):
            raise UnsupportedModuleError(
                f"{name}: unsupported block {type(m).__name__}. Supported: Conv, DWConv, C2f, C3k2, C3, C3k, "
                "Bottleneck, SPPF, C2PSA, PSABlock, Attention, Concat, Upsample, Detect, Segment (with Proto), Pose "
                "(YOLOv8, YOLO11 and YOLO26 blocks)."
            )


def _conv_sites(model: nn.Module, skip_head: bool) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, in_head) for every conv to quantize, in module order."""
    conv_cls = block_modules().conv.Conv
    detect = _detect_module(model)
    head_names = {n for n, m in model.named_modules() if m is detect}
    head_prefix = next(iter(head_names))
    out = []
    for name, m in model.named_modules():
        in_head = name.startswith(head_prefix + ".")
        if isinstance(m, conv_cls):
            out.append((name, m, in_head))
        elif in_head and isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and ".dfl" not in name \
                and not name.endswith(".conv"):
            out.append((name, m, in_head))
    return out


def _weight_channels(conv: nn.Conv2d, axis: int, name: str) -> int:
    if not -conv.weight.dim() <= axis < conv.weight.dim():
        raise QATError(
            f"{name}: per-channel weight quantization on axis {axis}, but the weight has {conv.weight.dim()} dims "
            f"{tuple(conv.weight.shape)}; set quantization.weight.ch_axis to 0 (output channels)"
        )
    return conv.weight.shape[axis]


def _fq_config_for(fq_cfg, qcfg, *, is_weight: bool):
    """The fake-quantize settings one quantizer gets: a learned zero point (LSQ+) only where it means something,
    i.e. LSQ on an asymmetric activation quantizer (weights are symmetric, zero point 0)."""
    learn = bool(fq_cfg.learn_zero_point) and not is_weight and fq_cfg.learns_zero_point(qcfg)
    if learn == bool(fq_cfg.learn_zero_point):
        return fq_cfg
    out = copy.deepcopy(fq_cfg)
    out.learn_zero_point = learn
    return out


# --------------------------------------------------------------------------------------------------------------------
# Phase 3: attach quantizers (phase 2 is src.models.tracing.trace_sites)
# --------------------------------------------------------------------------------------------------------------------
def attach_quantizers(model: nn.Module, swapped: SwappedModules, trace: SiteTrace, cfg,
                      bit_overrides: dict[str, dict[str, Any]]) -> list[GroupPlacement]:
    """Give every traced group one shared activation quantizer on its producers' outputs, and every conv whose
    input no group covers an input quantizer of its own; records the groups on the layer placements.

    Quantizers live once in ``model.qat_quantizers`` (keys ``a0``, ``a1``, ... in this order); sites reference them.
    """
    model.qat_quantizers = nn.ModuleDict()
    group_info: list[GroupPlacement] = []
    key_of_root: dict[int, str] = {}
    by_name = {l.name: l for l in swapped.layers}
    producers = trace.producers
    # OpenVINO's CPU plugin runs a deconvolution int8 only on an input without zero point (measured: with the
    # config's asymmetric grid yolov8n-seg's proto upsampling ran bf16, the other 75 convs stayed u8)
    zero_point_free = {trace.consumer_roots[n] for n, q in swapped.qconvs.items() if q.transposed}
    for gi, (root, members) in enumerate(sorted(trace.groups.items())):
        key = f"a{gi}"
        key_of_root[root] = key
        first_name = producers[members[0]][0]
        group_info.append(_make_group(model, key, [producers[i][0] for i in members], first_name, swapped, cfg,
                                      bit_overrides, symmetric=root in zero_point_free))
        fq = model.qat_quantizers[key]
        for si, i in enumerate(members):
            pname, pm = producers[i]
            pm._set_site("output_site", Site(fq, si, key))
            if pname in by_name:
                by_name[pname].output_group = key
    for name, q in swapped.qconvs.items():
        root = trace.consumer_roots[name]
        if root is not None:
            key = key_of_root[root]
            next(g for g in group_info if g.key == key).consumers.append(name)
            by_name[name].input_group = key
            continue
        key = f"a{len(group_info)}"
        group_info.append(_make_group(model, key, [f"{name}:input"], name, swapped, cfg, bit_overrides,
                                      symmetric=q.transposed))
        q._set_site("input_site", Site(model.qat_quantizers[key], 0, key))
        group_info[-1].consumers.append(name)
        by_name[name].input_group = key
    return group_info


def _make_group(model, key, site_names, config_layer, swapped: SwappedModules, cfg, bit_overrides, *,
                symmetric: bool = False):
    """Create the shared activation quantizer for one group (configured by its first producer; ``symmetric``: a
    signed grid with zero point 0 whatever the config says) and describe it."""
    rl = swapped.resolved.get(config_layer)
    if rl is None:  # producer is a residual add: configured by the bottleneck's own name
        rl = resolve_layer_qconfig(cfg, config_layer, matchable_name(config_layer, swapped.blocks))
    acfg = copy.deepcopy(rl.activation)
    if symmetric:
        acfg.symmetric, acfg.dtype = True, "qint8"
    if "activation_bits" in bit_overrides.get(key, {}):
        acfg.bit_width = int(bit_overrides[key]["activation_bits"])
    problem = activation_scheme_problem(acfg.scheme)
    if problem:
        raise QATError(f"{config_layer}: activation scheme {problem}")
    fq = FakeQuantize(acfg, _fq_config_for(rl.fake_quantize, acfg, is_weight=False), is_weight=False,
                      num_sites=len(site_names), name=f"act:{key}")
    model.qat_quantizers[key] = fq
    return GroupPlacement(key, list(site_names), [], acfg.bit_width, fq.signed, acfg.symmetric, acfg.observer,
                          rl.fake_quantize.type, config_layer)


# --------------------------------------------------------------------------------------------------------------------
# Undo
# --------------------------------------------------------------------------------------------------------------------
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
