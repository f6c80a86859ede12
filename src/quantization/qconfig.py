"""QConfig presets and per-layer resolution of ``layer_configs``.

A preset is plain data: the global ``weight`` / ``activation`` / ``fake_quantize`` sections plus optional built-in
layer rules. Resolution for one module starts from the config's global sections, applies the preset's layer rules
(when ``quantization.preset_layer_rules`` is on), then every ``layer_configs`` entry whose pattern matches, in file
order, later entries overriding earlier ones key by key.

Patterns are matched with ``re.search`` against two names of a module: its qualified name (``model.22.cv2.0.0.conv``)
and its *matchable name*, the qualified name with the lower-cased class of its top-level block inserted after the
block index (``model.22.detect.cv2.0.0.conv``, ``model.0.conv.conv``). So the spec's ``model.[0-9]+.detect`` selects
every Detect conv while ``model.0.conv`` still selects the first conv only.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from torch import nn

from src.config import ConfigError, FakeQuantizeConfig, LayerConfig, QATConfig, QuantizerConfig, suggest

LOGGER = logging.getLogger("yolov8_qat")

_INT8_PER_CHANNEL_WEIGHTS = {
    "dtype": "qint8",
    "scheme": "per_channel",
    "observer": "minmax",
    "symmetric": True,
    "bit_width": 8,
    "ch_axis": 0,
}
_U8_ASYMMETRIC_ACTIVATIONS = {
    "dtype": "quint8",
    "scheme": "per_tensor",
    "observer": "moving_average_minmax",
    "symmetric": False,
    "bit_width": 8,
    "averaging_constant": 0.01,
}
_STE = {"type": "custom", "grad_factor": 1.0, "learn_zero_point": False}

# Matches the first conv by its qualified name (model.0.conv) or by the block's matchable name (model.0.conv).
FIRST_CONV_PATTERN = r"^model\.0\.conv$"
# Matches every module inside the Detect head via its matchable name (model.22.detect...).
DETECT_PATTERN = r"^model\.\d+\.detect(\.|$)"

PRESETS: dict[str, dict] = {
    "default": {
        "description": "int8 per-channel symmetric min/max weights, uint8 per-tensor asymmetric moving-average "
        "min/max activations, STE gradients",
        "weight": dict(_INT8_PER_CHANNEL_WEIGHTS),
        "activation": dict(_U8_ASYMMETRIC_ACTIVATIONS),
        "fake_quantize": dict(_STE),
        "layer_rules": [],
    },
    "sensitive": {
        "description": "for models that lose accuracy under default: histogram (MSE) activation ranges, LSQ/LSQ+ "
        "learned scales, the first conv and the Detect head pinned to 8 bits",
        "weight": dict(_INT8_PER_CHANNEL_WEIGHTS),
        # MSE picks the range that minimises rounding + clipping error of the observed distribution, which is the
        # initialisation LSQ+ recommends; a fixed percentile clips the long tails of the box branch blindly.
        "activation": {
            "dtype": "quint8",
            "scheme": "per_tensor",
            "observer": "histogram",
            "symmetric": False,
            "bit_width": 8,
            "histogram_bins": 2048,
            "histogram_method": "mse",
        },
        # LSQ+ learned offsets target Swish-like (SiLU) activations, which YOLOv8 uses everywhere.
        "fake_quantize": {"type": "lsq", "grad_factor": 1.0, "learn_zero_point": True},
        "layer_rules": [
            {
                "name": "first_conv",
                "pattern": FIRST_CONV_PATTERN,
                # The input image lies in [0, 1]: min/max gives scale 1/255, zero-point 0, so the 8-bit pixels are
                # represented exactly (a histogram range could clip bright pixels). Its 27-weight filters keep 8 bits
                # even when the global weight bit width is lowered.
                "weight": {"bit_width": 8, "observer": "per_channel_minmax"},
                "activation": {"bit_width": 8, "observer": "minmax"},
            },
            {
                "name": "detect_head",
                "pattern": DETECT_PATTERN,
                # The head produces the box distributions and class logits directly: keep it at 8 bits.
                "weight": {"bit_width": 8, "observer": "per_channel_minmax"},
                "activation": {"bit_width": 8},
            },
        ],
    },
    "tensorrt": {
        "description": "int8 everywhere with zero-point 0: symmetric per-tensor activations (histogram, entropy "
        "like TensorRT's default calibrator), symmetric per-channel weights",
        "weight": dict(_INT8_PER_CHANNEL_WEIGHTS),
        "activation": {
            "dtype": "qint8",
            "scheme": "per_tensor",
            "observer": "histogram",
            "symmetric": True,
            "bit_width": 8,
            "histogram_bins": 2048,
            "histogram_method": "entropy",
        },
        "fake_quantize": dict(_STE),
        "layer_rules": [],
    },
    "openvino": {
        # The same numerics as default, which already is the form OpenVINO's CPU plugin runs natively (NNCF's
        # "mixed" preset); named so configs can state their target.
        "description": "uint8 asymmetric per-tensor activations, int8 symmetric per-channel weights (OpenVINO CPU)",
        "weight": dict(_INT8_PER_CHANNEL_WEIGHTS),
        "activation": dict(_U8_ASYMMETRIC_ACTIVATIONS),
        "fake_quantize": dict(_STE),
        "layer_rules": [],
    },
    "w4a8": {
        "description": "4-bit per-channel symmetric weights (stored as int8 at export), 8-bit asymmetric activations",
        "weight": {**_INT8_PER_CHANNEL_WEIGHTS, "bit_width": 4},
        "activation": dict(_U8_ASYMMETRIC_ACTIVATIONS),
        "fake_quantize": dict(_STE),
        "layer_rules": [],
    },
}

PRESET_NAMES = tuple(PRESETS)


def get_preset(name: str) -> dict:
    """Return a copy of preset ``name``'s plain data.

    Raises:
        ConfigError: unknown name; the message lists the valid ones.
    """
    if name not in PRESETS:
        raise ConfigError(
            f"unknown qconfig preset {name!r}{suggest(str(name), PRESETS)}; valid presets: {', '.join(PRESETS)}"
        )
    return copy.deepcopy(PRESETS[name])


def preset_sections(name: str) -> dict:
    """Fresh, validated ``weight``/``activation``/``fake_quantize`` sections of preset ``name``."""
    preset = get_preset(name)
    return {
        "weight": QuantizerConfig.from_dict(preset["weight"], f"presets.{name}.weight"),
        "activation": QuantizerConfig.from_dict(preset["activation"], f"presets.{name}.activation"),
        "fake_quantize": FakeQuantizeConfig.from_dict(preset["fake_quantize"], f"presets.{name}.fake_quantize"),
    }


def preset_layer_rules(name: str) -> list[tuple[str, LayerConfig]]:
    """The preset's built-in layer rules as (rule name, LayerConfig), in application order."""
    rules = []
    for i, rule in enumerate(get_preset(name)["layer_rules"]):
        rule = dict(rule)
        rule_name = rule.pop("name")
        rules.append((f"{name}:{rule_name}", LayerConfig.from_dict(rule, f"presets.{name}.layer_rules[{i}]")))
    return rules


# --------------------------------------------------------------------------------------------------- matchable names


def block_types(model: nn.Module) -> dict[str, str]:
    """Top-level block name -> class name.

    For an Ultralytics model the blocks are the children of its ``model`` Sequential (``model.0`` ... ``model.22``);
    for any other module, its direct children.
    """
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Sequential):
        return {f"model.{name}": type(child).__name__ for name, child in inner.named_children()}
    return {name: type(child).__name__ for name, child in model.named_children()}


def matchable_name(qualified_name: str, blocks: Mapping[str, str]) -> str:
    """``qualified_name`` with its top-level block's lower-cased class inserted after the block name.

    ``model.22.cv2.0.0.conv`` in a Detect block becomes ``model.22.detect.cv2.0.0.conv``; the block itself
    (``model.22``) becomes ``model.22.detect``. Names outside any block are returned unchanged.
    """
    best = None
    for prefix in blocks:
        if (qualified_name == prefix or qualified_name.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best)
        ):
            best = prefix
    if best is None:
        return qualified_name
    rest = qualified_name[len(best) :]
    return f"{best}.{blocks[best].lower()}{rest}"


def layer_aliases(model: nn.Module, layer_types: tuple[type, ...] | None = (nn.Conv2d, nn.Linear)) -> dict[str, str]:
    """Qualified name -> matchable name for every module of ``layer_types`` (None: every named module)."""
    blocks = block_types(model)
    return {
        name: matchable_name(name, blocks)
        for name, module in model.named_modules()
        if name and (layer_types is None or isinstance(module, layer_types))
    }


# -------------------------------------------------------------------------------------------------------- resolution


@dataclass
class ResolvedLayerQConfig:
    """Final quantizer settings of one layer and the rules that produced them.

    ``matched`` holds indices into ``cfg.layer_configs``; ``preset_rules`` the names of preset rules that applied.
    """

    weight: QuantizerConfig
    activation: QuantizerConfig
    fake_quantize: FakeQuantizeConfig
    matched: list[int] = field(default_factory=list)
    preset_rules: list[str] = field(default_factory=list)


def _matches(regex: re.Pattern, names: Iterable[str]) -> bool:
    return any(regex.search(n) for n in names)


def _active_rules(cfg: QATConfig) -> list[tuple[str | int, LayerConfig]]:
    rules: list[tuple[str | int, LayerConfig]] = []
    if cfg.quantization.preset_layer_rules:
        rules.extend(preset_layer_rules(cfg.quantization.default_qconfig))
    rules.extend(enumerate(cfg.layer_configs))
    return rules


def resolve_layer_qconfig(cfg: QATConfig, module_name: str, alias: str | None = None) -> ResolvedLayerQConfig:
    """Resolve the quantizer settings of the module called ``module_name`` (matchable name ``alias``).

    Raises:
        ConfigError: the overrides that apply combine into an invalid setting (names the layer and entries).
    """
    names = [module_name] if alias is None or alias == module_name else [module_name, alias]
    q = cfg.quantization
    merged = {
        "weight": q.weight.to_dict(),
        "activation": q.activation.to_dict(),
        "fake_quantize": q.fake_quantize.to_dict(),
    }
    matched: list[int] = []
    preset_rules: list[str] = []
    for label, rule in _active_rules(cfg):
        if not _matches(rule.regex, names):
            continue
        (preset_rules if isinstance(label, str) else matched).append(label)
        for section in merged:
            merged[section].update(getattr(rule, section))
    where = ", ".join([*preset_rules, *(f"layer_configs[{i}]" for i in matched)]) or "global settings"
    try:
        resolved = ResolvedLayerQConfig(
            weight=QuantizerConfig.from_dict(merged["weight"], f"{module_name}.weight"),
            activation=QuantizerConfig.from_dict(merged["activation"], f"{module_name}.activation"),
            fake_quantize=FakeQuantizeConfig.from_dict(merged["fake_quantize"], f"{module_name}.fake_quantize"),
            matched=matched,
            preset_rules=preset_rules,
        )
    except ConfigError as err:
        raise ConfigError(f"layer {module_name!r} (rules applied: {where}): {err}") from None
    if not resolved.weight.symmetric or resolved.weight.dtype != "qint8":
        raise ConfigError(
            f"layer {module_name!r} (rules applied: {where}): weights must be signed symmetric; "
            "drop dtype/symmetric from the weight overrides"
        )
    return resolved


def _as_name_map(names: Mapping[str, str] | Iterable[str]) -> dict[str, str]:
    if isinstance(names, Mapping):
        return dict(names)
    return {n: n for n in names}


def layer_config_report(cfg: QATConfig, names: Mapping[str, str] | Iterable[str]) -> dict[int, list[str]]:
    """Which layers each ``layer_configs`` entry matches; entries matching nothing are logged as warnings.

    Args:
        cfg: the resolved config.
        names: qualified name -> matchable name (as from :func:`layer_aliases`), or plain qualified names.

    Returns:
        entry index -> qualified names it matched (in the given order).
    """
    name_map = _as_name_map(names)
    report: dict[int, list[str]] = {}
    for i, entry in enumerate(cfg.layer_configs):
        regex = entry.regex
        report[i] = [n for n, alias in name_map.items() if _matches(regex, (n, alias))]
        if not report[i]:
            LOGGER.warning(
                "layer_configs[%d] pattern %r matches no quantizable layer; check it against the matchable names "
                "(e.g. 'model.0.conv', 'model.22.detect.cv2.0.0.conv')",
                i,
                entry.pattern,
            )
    return report


def resolve_model_qconfigs(
    cfg: QATConfig, model: nn.Module, layer_types: tuple[type, ...] = (nn.Conv2d,)
) -> dict[str, ResolvedLayerQConfig]:
    """Resolve every ``layer_types`` module of ``model`` and warn about ``layer_configs`` entries that match nothing."""
    aliases = layer_aliases(model, layer_types)
    layer_config_report(cfg, aliases)
    return {name: resolve_layer_qconfig(cfg, name, alias) for name, alias in aliases.items()}
