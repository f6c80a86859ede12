"""Per-layer resolution of quantizer settings: the preset's layer rules, then ``layer_configs``.

The presets themselves are plain data in ``src/quantization/presets.py``. Resolution for one module starts from the config's global sections, applies the preset's layer rules
(when ``quantization.preset_layer_rules`` is on), then every ``layer_configs`` entry whose pattern matches, in file
order, later entries overriding earlier ones key by key.

Patterns are matched with ``re.search`` against two names of a module: its qualified name (``model.22.cv2.0.0.conv``)
and its *matchable name*, the qualified name with the lower-cased class of its top-level block inserted after the
block index (``model.22.detect.cv2.0.0.conv``, ``model.0.conv.conv``). So the spec's ``model.[0-9]+.detect`` selects
every Detect conv while ``model.0.conv`` still selects the first conv only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from torch import nn

from src.config import ConfigError, FakeQuantizeConfig, LayerConfig, QATConfig, QuantizerConfig
from src.integrations.ultralytics import block_modules
from src.quantization.presets import get_preset
from src.quantization.vocabulary import weight_rule_problem

LOGGER = logging.getLogger("yolov8_qat")

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
    for any other module, its direct children. A Segment or Pose head is named ``Detect`` (it is one, with an extra
    branch): rules written for the head (``model.[0-9]+.detect``) select it in every task.
    """
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Sequential):
        detect = block_modules().head.Detect
        return {f"model.{name}": "Detect" if isinstance(child, detect) else type(child).__name__
                for name, child in inner.named_children()}
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
    if weight_rule_problem(resolved.weight.dtype, resolved.weight.symmetric):
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
