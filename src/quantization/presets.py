"""The quantization presets as plain data (``--qconfig`` / ``quantization.default_qconfig``).

A preset is the global ``weight`` / ``activation`` / ``fake_quantize`` sections plus optional built-in layer rules;
``src/config.py`` turns them into validated config sections and ``src/qconfig.py`` applies the layer rules.
"""

from __future__ import annotations

import copy

from src.errors import ConfigError, suggest

_INT8_PER_CHANNEL_WEIGHTS = {
    "dtype": "qint8",
    "scheme": "per_channel",
    "observer": "minmax",
    "symmetric": True,
    "bit_width": 8,
    "ch_axis": 0,
}
# Histogram percentile ranges, not min/max: real models' activations have outliers that min/max spends the grid on
# (Ultralytics' COCO yolov8n: moving-average min/max ranges about twice as wide, PTQ -4.8 mAP50-95 points on real
# photos; percentile 99.99: -0.4; the shapes and photo sets: within 0.1 point of min/max). Histogram sites are
# frozen after calibration (the trainer lets only min/max-style observers follow during QAT).
_U8_ASYMMETRIC_ACTIVATIONS = {
    "dtype": "quint8",
    "scheme": "per_tensor",
    "observer": "histogram",
    "symmetric": False,
    "bit_width": 8,
    "histogram_bins": 2048,
    "histogram_method": "percentile",
    "percentile": 99.99,
}
_STE = {"type": "ste", "grad_factor": 1.0, "learn_zero_point": False}

# Matches the first conv by its qualified name (model.0.conv) or by the block's matchable name (model.0.conv).
FIRST_CONV_PATTERN = r"^model\.0\.conv$"
# Matches every module inside the Detect head via its matchable name (model.22.detect...).
DETECT_PATTERN = r"^model\.\d+\.detect(\.|$)"

PRESETS: dict[str, dict] = {
    "default": {
        "description": "int8 per-channel symmetric min/max weights, uint8 per-tensor asymmetric activations with "
        "histogram (99.99th percentile) ranges, STE gradients",
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
