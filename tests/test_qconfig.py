"""Presets, matchable names and per-layer resolution of layer_configs (on a real yolov8n)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from torch import nn

from src.config import ConfigError, QATConfig, build_config, load_config, preset_sections
from src.qconfig import (
    block_types,
    layer_aliases,
    layer_config_report,
    matchable_name,
    resolve_layer_qconfig,
    resolve_model_qconfigs,
)
from src.quantization.presets import PRESETS, get_preset

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "qat_config.yaml"


@pytest.fixture(scope="module")
def yolov8n() -> nn.Module:
    from src.env import prepare_environment

    prepare_environment()
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", nc=3, verbose=False)


@pytest.fixture(scope="module")
def aliases(yolov8n) -> dict[str, str]:
    return layer_aliases(yolov8n, (nn.Conv2d,))


def _hits(pattern: str, aliases: dict[str, str]) -> set[str]:
    regex = re.compile(pattern)
    return {n for n, a in aliases.items() if regex.search(n) or regex.search(a)}


# ----------------------------------------------------------------------------------------------------------- presets


def test_presets_are_what_they_claim():
    assert tuple(PRESETS) == ("default", "sensitive", "tensorrt", "openvino", "w4a8")
    d = preset_sections("default")
    assert (d["weight"].dtype, d["weight"].observer_kind, d["weight"].symmetric, d["weight"].bit_width) == (
        "qint8", "per_channel_minmax", True, 8)
    assert (d["activation"].dtype, d["activation"].scheme, d["activation"].symmetric, d["activation"].observer) == (
        "quint8", "per_tensor", False, "histogram")
    assert (d["activation"].histogram_method, d["activation"].percentile) == ("percentile", 99.99)
    assert d["fake_quantize"].type == "ste"

    t = preset_sections("tensorrt")
    assert (t["activation"].dtype, t["activation"].symmetric, t["activation"].bit_width) == ("qint8", True, 8)
    assert (t["weight"].dtype, t["weight"].symmetric, t["weight"].bit_width) == ("qint8", True, 8)

    o = preset_sections("openvino")
    assert (o["activation"].dtype, o["activation"].symmetric) == ("quint8", False)
    assert (o["weight"].dtype, o["weight"].per_channel, o["weight"].symmetric) == ("qint8", True, True)

    w = preset_sections("w4a8")
    assert (w["weight"].bit_width, w["weight"].per_channel, w["activation"].bit_width) == (4, True, 8)

    s = preset_sections("sensitive")
    assert (s["activation"].observer, s["activation"].histogram_method) == ("histogram", "mse")
    assert s["fake_quantize"].type == "lsq" and s["fake_quantize"].learns_zero_point(s["activation"])
    assert not s["fake_quantize"].learns_zero_point(s["weight"])  # symmetric weights keep zero-point 0


def test_preset_sections_are_fresh_objects():
    a = preset_sections("default")
    a["weight"].bit_width = 3
    assert preset_sections("default")["weight"].bit_width == 8


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown qconfig preset 'openvno' \(did you mean 'openvino'\?\); "
                                          r"valid presets: default, sensitive, tensorrt, openvino, w4a8"):
        get_preset("openvno")


def test_sensitive_differs_from_default_on_yolov8n(yolov8n, aliases):
    default = resolve_model_qconfigs(build_config({}), yolov8n)
    sensitive = resolve_model_qconfigs(build_config({}, qconfig="sensitive"), yolov8n)
    assert default.keys() == sensitive.keys() == aliases.keys()
    for name in aliases:
        assert default[name].activation != sensitive[name].activation
        assert default[name].fake_quantize.type == "ste" and sensitive[name].fake_quantize.type == "lsq"
    # The first conv sees the [0, 1] image: min/max, not the histogram used elsewhere.
    assert sensitive["model.0.conv"].activation.observer == "minmax"
    assert sensitive["model.0.conv"].preset_rules == ["sensitive:first_conv"]
    assert sensitive["model.1.conv"].activation.observer == "histogram"
    assert sensitive["model.22.cv3.0.2"].preset_rules == ["sensitive:detect_head"]
    assert sensitive["model.21.cv1.conv"].preset_rules == []


def test_sensitive_pins_first_conv_and_head_to_8_bits(yolov8n, aliases):
    # --qconfig drops the file's quantization sections; CLI keys come after it, so lower the bits there.
    cfg = build_config({}, qconfig="sensitive",
                       cli_overrides={"quantization.weight.bit_width": 4, "quantization.activation.bit_width": 6})
    resolved = resolve_model_qconfigs(cfg, yolov8n)
    head = {n for n in aliases if n.startswith("model.22.")}
    for name, r in resolved.items():
        pinned = name == "model.0.conv" or name in head
        assert r.weight.bit_width == (8 if pinned else 4), name
        assert r.activation.bit_width == (8 if pinned else 6), name
    off = build_config({"quantization": {"preset_layer_rules": False}}, qconfig="sensitive",
                       cli_overrides={"quantization.weight.bit_width": 4})
    assert resolve_layer_qconfig(off, "model.0.conv", aliases["model.0.conv"]).weight.bit_width == 4


# --------------------------------------------------------------------------------------------------- matchable names


def test_matchable_name_inserts_block_type():
    blocks = {"model.0": "Conv", "model.2": "C2f", "model.22": "Detect", "model.1": "Conv"}
    assert matchable_name("model.22.cv2.0.0.conv", blocks) == "model.22.detect.cv2.0.0.conv"
    assert matchable_name("model.22", blocks) == "model.22.detect"
    assert matchable_name("model.0.conv", blocks) == "model.0.conv.conv"
    assert matchable_name("model.2.m.0.cv1.conv", blocks) == "model.2.c2f.m.0.cv1.conv"
    # "model.2" is not a prefix of "model.22..." (dot boundary), and unknown names pass through.
    assert matchable_name("model.22.dfl.conv", {"model.2": "C2f"}) == "model.22.dfl.conv"
    assert matchable_name("head.fc", blocks) == "head.fc"


def test_block_types_of_plain_module():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2))
    assert block_types(net) == {"0": "Conv2d", "1": "ReLU", "2": "Linear"}
    assert layer_aliases(net) == {"0": "0.conv2d", "2": "2.linear"}


def test_spec_patterns_select_first_conv_and_detect_head(yolov8n, aliases):
    assert len(aliases) == 64
    assert block_types(yolov8n)["model.22"] == "Detect"
    assert aliases["model.22.cv2.0.0.conv"] == "model.22.detect.cv2.0.0.conv"
    assert _hits("model.0.conv", aliases) == {"model.0.conv"}
    detect = {n for n in aliases if n.startswith("model.22.")}
    assert len(detect) == 19  # 2 branches x 3 scales x 3 convs + DFL
    assert _hits("model.[0-9]+.detect", aliases) == detect
    # "." is a regex wildcard: model.1.conv must not reach model.16 / model.19, nor model.2.c2f reach model.21.
    assert _hits("model.1.conv", aliases) == {"model.1.conv"}
    assert _hits("model.2.c2f", aliases) == {n for n in aliases if n.startswith("model.2.")}
    assert _hits(r"sppf", aliases) == {"model.9.cv1.conv", "model.9.cv2.conv"}


# -------------------------------------------------------------------------------------------------------- resolution


def test_entries_apply_in_order_key_by_key():
    cfg = build_config({"layer_configs": [
        {"pattern": "model.0", "activation": {"observer": "minmax", "bit_width": 6}, "weight": {"bit_width": 4}},
        {"pattern": "conv$", "activation": {"bit_width": 7}},
        {"pattern": "nothing-here", "activation": {"bit_width": 2}},
    ]})
    r = resolve_layer_qconfig(cfg, "model.0.conv")
    assert r.matched == [0, 1]
    assert r.activation.bit_width == 7  # later entry wins
    assert r.activation.observer == "minmax"  # earlier key not touched by the later entry survives
    assert r.weight.bit_width == 4
    assert r.activation.averaging_constant == cfg.quantization.activation.averaging_constant  # global
    other = resolve_layer_qconfig(cfg, "model.3.conv")
    assert other.matched == [1] and other.activation.observer == "histogram" and other.weight.bit_width == 8
    untouched = resolve_layer_qconfig(cfg, "model.3.m")
    assert untouched.matched == [] and untouched.activation == cfg.quantization.activation
    # Swapping the two overlapping entries flips the winner.
    swapped = build_config({"layer_configs": [cfg.layer_configs[1].to_dict(), cfg.layer_configs[0].to_dict()]})
    assert resolve_layer_qconfig(swapped, "model.0.conv").activation.bit_width == 6


def test_user_entries_override_preset_rules(aliases):
    cfg = build_config({"layer_configs": [{"pattern": "model.0.conv", "activation": {"observer": "histogram"}}]},
                       qconfig="sensitive")
    r = resolve_layer_qconfig(cfg, "model.0.conv", aliases["model.0.conv"])
    assert r.preset_rules == ["sensitive:first_conv"] and r.matched == [0]
    assert r.activation.observer == "histogram"


def test_use_lsq_everywhere_unless_a_layer_says_otherwise(yolov8n):
    cfg = build_config({"qat_params": {"use_lsq": True},
                        "layer_configs": [{"pattern": "model.[0-9]+.detect", "fake_quantize": {"type": "custom"}}]})
    resolved = resolve_model_qconfigs(cfg, yolov8n)
    for name, r in resolved.items():
        assert r.fake_quantize.type == ("ste" if name.startswith("model.22.") else "lsq"), name


def test_shipped_config_on_yolov8n(yolov8n):
    resolved = resolve_model_qconfigs(load_config(SHIPPED), yolov8n)
    assert resolved["model.0.conv"].activation.observer == "histogram"
    assert resolved["model.0.conv"].matched == [0]
    assert resolved["model.1.conv"].activation.observer == "histogram"  # the preset's, no rule matched
    assert resolved["model.1.conv"].matched == []
    for name, r in resolved.items():
        in_head = name.startswith("model.22.")
        assert r.fake_quantize.type == ("lsq" if in_head else "ste"), name
        assert r.weight.observer_kind == "per_channel_minmax"


def test_tensorrt_resolution_is_symmetric_everywhere(yolov8n):
    cfg = build_config({"export": {"formats": ["tensorrt"]},
                        "layer_configs": [{"pattern": "model.1.conv", "activation": {"symmetric": False}}]},
                       qconfig="sensitive")
    for name, r in resolve_model_qconfigs(cfg, yolov8n).items():
        assert (r.activation.symmetric, r.activation.dtype) == (True, "qint8"), name
        assert not r.fake_quantize.learns_zero_point(r.activation)


def test_invalid_combination_names_layer_and_entries():
    cfg = build_config({"layer_configs": [
        {"pattern": "model.0", "weight": {"observer": "per_channel_minmax"}},
        {"pattern": "conv", "weight": {"scheme": "per_tensor"}},
    ]})
    assert resolve_layer_qconfig(cfg, "model.5.conv").weight.scheme == "per_tensor"
    with pytest.raises(ConfigError, match=r"layer 'model.0.conv' \(rules applied: layer_configs\[0\], layer_configs\[1\]\)"
                                          r": model.0.conv.weight.observer: 'per_channel_minmax' needs scheme"):
        resolve_layer_qconfig(cfg, "model.0.conv")


def test_report_lists_matches_and_warns_on_dead_entries(aliases, caplog):
    cfg = build_config({"layer_configs": [
        {"pattern": "model.0.conv"}, {"pattern": "model.[0-9]+.detect"}, {"pattern": "model.99.conv"},
    ]})
    with caplog.at_level(logging.WARNING, logger="yolov8_qat"):
        report = layer_config_report(cfg, aliases)
    assert report[0] == ["model.0.conv"]
    assert report[1] == [n for n in aliases if n.startswith("model.22.")]
    assert report[2] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "layer_configs[2] pattern 'model.99.conv' matches no quantizable layer" in warnings[0]
    # Plain names (no aliases) work too; then the Detect pattern has nothing to match.
    assert layer_config_report(cfg, list(aliases))[1] == []


def test_default_config_resolves_to_globals(yolov8n):
    cfg = QATConfig()
    for r in resolve_model_qconfigs(cfg, yolov8n).values():
        assert (r.weight, r.activation, r.fake_quantize) == (
            cfg.quantization.weight, cfg.quantization.activation, cfg.quantization.fake_quantize)
        assert r.matched == [] and r.preset_rules == []
