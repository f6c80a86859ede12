"""The one QAT configuration schema: a typed dataclass tree validated at construction.

YAML is only the serialization of :class:`QATConfig`. Every section validates its own fields when it is built;
errors name the full key path, the bad value and what to write instead, and unknown keys suggest the closest valid
ones. :func:`load_config` layers the sources in this order (later wins)::

    built-in defaults  <  preset (quantization.default_qconfig or --qconfig)  <  YAML keys  <  CLI overrides

The key-by-key reference is docs/qat_config_guide.md.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Union

import yaml

from src.errors import ConfigError, suggest
from src.export import registry as export_formats
from src.quantization import vocabulary as vocab
from src.quantization.presets import get_preset

LOGGER = logging.getLogger("yolov8_qat")

_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?|\d+(,\d+)*)$")


# Key path of the section being built, so a section validated inside a larger tree reports "quantization.weight.x"
# rather than just "x". Sections built on their own fall back to their class label.
_PATH: contextvars.ContextVar[str | None] = contextvars.ContextVar("config_path", default=None)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class OverrideError(ConfigError):
    """A command-line override (or ``--qconfig``) is invalid; ``key`` is its dotted config key, so the command line
    can name the flag instead of the config file. The message is ``"<key>: <reason>"`` like every field error."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def _unknown_key_error(path: str, key: str, valid: typing.Iterable[str]) -> ConfigError:
    valid = list(valid)
    return ConfigError(
        f"{_join(path, key)}: unknown key{suggest(key, valid)}; valid keys here: {', '.join(valid)}"
    )


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widened to float, mappings built into sections)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            try:
                return _coerce(value, non_none[0], path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, _join(path, i)) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, _Section):
        if isinstance(value, tp):
            # Adjustments mutate sections in place; never share one with another config.
            return copy.deepcopy(value)
        return tp.from_dict(value, path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads exponents without a dot (5e-4) as strings; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _check_choice(path: str, value: Any, choices: tuple, what: str = "value") -> None:
    if value not in choices:
        raise ConfigError(
            f"{path}: {value!r} is not a valid {what}; choose from {', '.join(map(str, choices))}"
            f"{suggest(str(value), [str(c) for c in choices])}"
        )


def _check_range(path: str, value: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> None:
    # nan fails every comparison and inf passes an open upper bound: neither is a usable setting
    if not math.isfinite(value):
        raise ConfigError(f"{path}: {value!r} is not a finite number; give a finite one")
    bad = (lo is not None and (value < lo or (lo_open and value == lo))) or (
        hi is not None and (value > hi or (hi_open and value == hi))
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(f"{path}: {value!r} is out of range; allowed {left}{lo_s}, {hi_s}{right}")


@dataclass
class _Section:
    """Base of every config section: typed fields checked at construction, with per-field choices and ranges."""

    _LABEL: ClassVar[str] = ""
    # field -> allowed values (for list fields: allowed items)
    _CHOICES: ClassVar[dict[str, tuple]] = {}
    # field -> noun used in choice errors ("is not a valid format")
    _CHOICE_NOUN: ClassVar[dict[str, str]] = {}
    # field -> {accepted other name: canonical value}, resolved before the choice check
    _ALIASES: ClassVar[dict[str, dict[str, str]]] = {}
    # field -> (low, high, low_open, high_open); None = unbounded
    _RANGES: ClassVar[dict[str, tuple]] = {}

    def __post_init__(self) -> None:
        path = _PATH.get()
        path = self._LABEL if path is None else path
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_field(type(self), f.name, getattr(self, f.name), _join(path, f.name)))
        self._check_combination(path)

    def _check_combination(self, path: str) -> None:
        """Cross-field rules; sections override."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def _normalize(cls, data: dict, path: str) -> dict:
        """Rewrite accepted alternative spellings of the input mapping; sections override."""
        return data

    @classmethod
    def from_dict(cls, data: Mapping | None, path: str | None = None):
        """Build and validate this section from a plain mapping; unknown keys are errors with suggestions."""
        path = cls._LABEL if path is None else path
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__} {data!r}")
        data = cls._normalize(dict(data), path)
        valid = cls.field_names()
        for key in data:
            if key not in valid:
                raise _unknown_key_error(path, str(key), valid)
        token = _PATH.set(path)
        try:
            return cls(**data)
        finally:
            _PATH.reset(token)

    def to_dict(self) -> dict:
        """Plain-data form (what YAML holds)."""
        return _plain(self)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def check_field(cls: type[_Section], name: str, value: Any, path: str) -> Any:
    """Type-check one field of section ``cls`` and its single-field rules; return the coerced value."""
    value = _coerce(value, _hints(cls)[name], path)
    value = cls._ALIASES.get(name, {}).get(value, value) if isinstance(value, str) else value
    choices = cls._CHOICES.get(name)
    if choices is not None and value is not None:
        for item in value if isinstance(value, list) else [value]:
            _check_choice(path, item, choices, cls._CHOICE_NOUN.get(name, "value"))
    bounds = cls._RANGES.get(name)
    if bounds is not None and value is not None:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            _check_range(_join(path, i) if isinstance(value, list) else path, item, *bounds)
    return value


def _plain(obj: Any) -> Any:
    if isinstance(obj, _Section):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig(_Section):
    """Which YOLOv8 family member; the variant picks models/pretrained/yolov8{variant}.pt when --model is absent."""

    architecture: str = "yolov8"
    variant: str = "n"

    _LABEL: ClassVar[str] = "model"
    _CHOICES: ClassVar[dict] = {"architecture": ("yolov8",), "variant": ("n", "s", "m", "l", "x")}


@dataclass
class QuantizerConfig(_Section):
    """How one tensor kind (weights or activations) is quantized.

    ``dtype`` names only the signedness of the integer grid (qint8 signed, quint8 unsigned); ``bit_width`` gives its
    size. ``scheme`` decides the granularity: ``minmax`` with ``per_channel`` is the per-channel min/max observer,
    which ``per_channel_minmax`` names explicitly.
    """

    dtype: str = "qint8"
    scheme: str = "per_tensor"
    observer: str = "minmax"
    symmetric: bool = True
    bit_width: int = 8
    ch_axis: int = 0
    averaging_constant: float = 0.01
    histogram_bins: int = 2048
    histogram_method: str = "percentile"
    percentile: float = 99.99

    _LABEL: ClassVar[str] = "quantizer"
    _CHOICES: ClassVar[dict] = {
        "dtype": vocab.DTYPES,
        "scheme": vocab.SCHEMES,
        "observer": vocab.OBSERVERS,
        "histogram_method": vocab.HISTOGRAM_METHODS,
    }
    _RANGES: ClassVar[dict] = {
        "bit_width": (2, 16, False, False),
        "ch_axis": (0, None, False, False),
        "averaging_constant": (0.0, 1.0, True, False),
        "histogram_bins": (16, None, False, False),
        "percentile": (0.0, 100.0, True, False),
    }

    def _check_combination(self, path: str) -> None:
        problem = vocab.observer_scheme_problem(self.observer, self.scheme)
        if problem:
            raise ConfigError(f"{path}.observer: {problem}")

    @property
    def per_channel(self) -> bool:
        return self.scheme == "per_channel"

    @property
    def signed(self) -> bool:
        return self.dtype == vocab.SIGNED_DTYPE

    @property
    def observer_kind(self) -> str:
        """Canonical observer name: 'minmax' with per_channel scheme becomes 'per_channel_minmax'."""
        if self.observer == "minmax" and self.per_channel:
            return "per_channel_minmax"
        return self.observer


@dataclass
class FakeQuantizeConfig(_Section):
    """Gradient rule of the fake quantizers: ``ste`` = STE with clipping mask (x grad_factor), ``lsq`` = LSQ.

    ``custom`` (the spec's name for the straight-through estimator) is accepted and stored as ``ste``.

    ``learn_zero_point`` (LSQ+) takes effect only with type ``lsq`` on asymmetric quantizers (see
    :meth:`learns_zero_point`); symmetric ones keep zero-point 0, so one section can serve weights and activations.
    """

    type: str = vocab.STE
    grad_factor: float = 1.0
    learn_zero_point: bool = False

    _LABEL: ClassVar[str] = "fake_quantize"
    _CHOICES: ClassVar[dict] = {"type": vocab.FAKE_QUANT_TYPES}
    _ALIASES: ClassVar[dict] = {"type": vocab.FAKE_QUANT_ALIASES}
    _RANGES: ClassVar[dict] = {"grad_factor": (0.0, None, True, False)}

    def _check_combination(self, path: str) -> None:
        problem = vocab.grad_factor_problem(self.type, self.grad_factor)
        if problem:
            raise ConfigError(f"{path}.grad_factor: {problem}")

    def learns_zero_point(self, quantizer: QuantizerConfig) -> bool:
        """Whether ``quantizer``'s zero-point is a learned parameter (LSQ+): lsq, learn_zero_point, asymmetric."""
        return self.type == vocab.LSQ and self.learn_zero_point and not quantizer.symmetric


def preset_sections(name: str) -> dict:
    """Fresh, validated ``weight``/``activation``/``fake_quantize`` sections of preset ``name``."""
    preset = get_preset(name)
    return {
        "weight": QuantizerConfig.from_dict(preset["weight"], f"presets.{name}.weight"),
        "activation": QuantizerConfig.from_dict(preset["activation"], f"presets.{name}.activation"),
        "fake_quantize": FakeQuantizeConfig.from_dict(preset["fake_quantize"], f"presets.{name}.fake_quantize"),
    }


def _preset_section(section: str) -> Any:
    return preset_sections("default")[section]


@dataclass
class QuantizationConfig(_Section):
    """Global quantizer settings; the defaults are the ``default`` preset."""

    default_qconfig: str = "default"
    weight: QuantizerConfig = field(default_factory=lambda: _preset_section("weight"))
    activation: QuantizerConfig = field(default_factory=lambda: _preset_section("activation"))
    fake_quantize: FakeQuantizeConfig = field(default_factory=lambda: _preset_section("fake_quantize"))
    # Whether the preset's built-in layer rules (e.g. sensitive's first conv / Detect head) apply before layer_configs.
    preset_layer_rules: bool = True

    _LABEL: ClassVar[str] = "quantization"

    def _check_combination(self, path: str) -> None:
        try:
            get_preset(self.default_qconfig)
        except ConfigError as err:
            raise ConfigError(f"{path}.default_qconfig: {err}") from None
        _check_weight_rules(self.weight, f"{path}.weight")
        problem = vocab.activation_scheme_problem(self.activation.scheme)
        if problem:
            raise ConfigError(f"{path}.activation.scheme: {problem}")


def _check_weight_rules(weight: QuantizerConfig, path: str) -> None:
    problem = vocab.weight_rule_problem(weight.dtype, weight.symmetric)
    if problem:
        raise ConfigError(f"{path}: {problem}")


_LAYER_SECTIONS = {"weight": QuantizerConfig, "activation": QuantizerConfig, "fake_quantize": FakeQuantizeConfig}


@dataclass
class LayerConfig(_Section):
    """Per-layer partial overrides, applied to every module whose matchable name ``re.search``-es ``pattern``.

    YAML may nest ``weight``/``activation``/``fake_quantize`` under ``config:`` (the spec's layout) or put them at
    the entry level.
    """

    pattern: str = ""
    weight: dict[str, Any] = field(default_factory=dict)
    activation: dict[str, Any] = field(default_factory=dict)
    fake_quantize: dict[str, Any] = field(default_factory=dict)

    _LABEL: ClassVar[str] = "layer_configs[]"

    @classmethod
    def _normalize(cls, data: dict, path: str) -> dict:
        if "config" not in data:
            return data
        nested = data.pop("config")
        if nested is None:
            return data
        if not isinstance(nested, Mapping):
            raise ConfigError(f"{path}.config: expected a mapping, got {type(nested).__name__} {nested!r}")
        for key, value in nested.items():
            if key not in _LAYER_SECTIONS:
                raise _unknown_key_error(f"{path}.config", str(key), _LAYER_SECTIONS)
            if key in data:
                raise ConfigError(
                    f"{path}: '{key}' is given both under 'config:' and at the entry level; keep one of them"
                )
            data[key] = value
        return data

    def _check_combination(self, path: str) -> None:
        if not self.pattern:
            raise ConfigError(f"{path}.pattern: empty pattern; give a regex such as 'model.0.conv'")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ConfigError(
                f"{path}.pattern: {self.pattern!r} is not a valid regular expression ({err}); fix or quote it"
            ) from None
        for section, section_cls in _LAYER_SECTIONS.items():
            overrides = getattr(self, section)
            valid = section_cls.field_names()
            for key in list(overrides):
                if key not in valid:
                    raise _unknown_key_error(_join(path, section), str(key), valid)
                overrides[key] = check_field(section_cls, key, overrides[key], _join(_join(path, section), key))

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"pattern": self.pattern}
        for section in _LAYER_SECTIONS:
            if getattr(self, section):
                out[section] = dict(getattr(self, section))
        return out


@dataclass
class QATParams(_Section):
    """Switches of the QAT procedure.

    ``freeze_observers_epoch`` / ``freeze_bn_epoch``: 0-based epoch index at whose start observers (ranges) and BN
    running statistics stop updating; null = never. BN freezing only matters with ``fuse_modules: false`` (folded
    models have no BN left). ``use_lsq``: true forces LSQ, false forces STE, null lets the preset decide.
    ``bias_correction``: after calibration, each quantized conv's bias absorbs the mean output shift its
    quantization causes on the calibration images (src/models/bias_correction.py). ``adaround``: before that, each
    quantized conv learns whether each weight rounds up or down (AdaRound, src/models/adaround.py), in
    ``adaround_iterations`` optimisation steps per conv. ``oscillation_dampening``: weight of the term that pulls
    every quantized weight towards its grid point during QAT (Nagel et al. 2022; in quantization steps squared,
    summed over weights, ramped from 0 by a half cosine over the QAT steps, src/models/oscillation.py); 0 = off.
    """

    skip_detection_head: bool = False
    fuse_modules: bool = True
    use_lsq: bool | None = None
    use_mixed_precision: bool = False
    use_distillation: bool = False
    post_qat_fine_tuning: bool = False
    fine_tuning_epochs: int = 1
    calibration_images: int = 256
    calibration_batch_size: int = 16
    bias_correction: bool = True
    adaround: bool = False
    adaround_iterations: int = 1000
    oscillation_dampening: float = 0.0
    freeze_observers_epoch: int | None = 1
    freeze_bn_epoch: int | None = 1
    lsq_lr_scale: float = 1.0

    _LABEL: ClassVar[str] = "qat_params"
    _RANGES: ClassVar[dict] = {
        "fine_tuning_epochs": (0, None, False, False),
        "calibration_images": (1, None, False, False),
        "calibration_batch_size": (1, None, False, False),
        "adaround_iterations": (1, None, False, False),
        "oscillation_dampening": (0.0, None, False, False),
        "freeze_observers_epoch": (0, None, False, False),
        "freeze_bn_epoch": (0, None, False, False),
        "lsq_lr_scale": (0.0, None, True, False),
    }

    def _check_combination(self, path: str) -> None:
        if self.post_qat_fine_tuning and self.fine_tuning_epochs < 1:
            raise ConfigError(
                f"{path}.fine_tuning_epochs: post_qat_fine_tuning is on but fine_tuning_epochs is "
                f"{self.fine_tuning_epochs}; set it to 1 or more, or turn post_qat_fine_tuning off"
            )


@dataclass
class TrainParams(_Section):
    """Optimisation recipe. ``epochs: 0`` means calibrate only (the PTQ baseline)."""

    epochs: int = 2
    batch_size: int = 16
    # Images per optimizer step (gradients accumulate up to it); null = batch_size, i.e. no accumulation. Ultralytics'
    # default nbs is 64, which leaves a small dataset only a few optimizer steps per epoch.
    nominal_batch_size: int | None = None
    img_size: int = 640
    lr: float = 0.0001
    lr_scheduler: str = "cosine"
    optimizer: str = "SGD"
    momentum: float = 0.937
    weight_decay: float = 0.0005
    # QAT starts from a converged model at a small lr: a warmup would only spend steps below that lr.
    warmup_epochs: float = 0.0
    workers: int = 2
    seed: int = 42
    ema: bool = True
    amp: bool = True
    device: str = "cuda"

    _LABEL: ClassVar[str] = "train_params"
    _CHOICES: ClassVar[dict] = {"lr_scheduler": ("cosine", "linear"), "optimizer": ("SGD", "AdamW")}
    _RANGES: ClassVar[dict] = {
        "epochs": (0, None, False, False),
        "batch_size": (1, None, False, False),
        "nominal_batch_size": (1, None, False, False),
        "img_size": (32, None, False, False),
        "lr": (0.0, None, True, False),
        "momentum": (0.0, 1.0, False, True),
        "weight_decay": (0.0, None, False, False),
        "warmup_epochs": (0.0, None, False, False),
        "workers": (0, None, False, False),
        "seed": (0, None, False, False),
    }

    def __post_init__(self) -> None:
        # YAML reads `device: 0` as an int; it names a GPU index just like the CLI's "0".
        if isinstance(self.device, int) and not isinstance(self.device, bool):
            self.device = str(self.device)
        super().__post_init__()

    def _check_combination(self, path: str) -> None:
        if self.img_size % 32:
            up = -(-self.img_size // 32) * 32
            raise ConfigError(
                f"{path}.img_size: {self.img_size} is not a multiple of the model stride 32; use {up} or {up - 32}"
            )
        device = self.device.replace(" ", "").lower()
        if not _DEVICE_RE.match(device):
            raise ConfigError(
                f"{path}.device: {self.device!r} is not a device; use cpu, cuda, cuda:N, N or N,M (GPU indices)"
            )
        self.device = device


@dataclass
class DistillationConfig(_Section):
    """Knowledge distillation; ``teacher_model: null`` distils from the FP32 source model itself."""

    teacher_model: str | None = None
    temperature: float = 2.0
    kd_weight: float = 1.0
    feature_weight: float = 0.0
    feature_layers: list[int] = field(default_factory=list)

    _LABEL: ClassVar[str] = "distillation"
    _RANGES: ClassVar[dict] = {
        "temperature": (0.0, None, True, False),
        "kd_weight": (0.0, None, False, False),
        "feature_weight": (0.0, None, False, False),
        "feature_layers": (0, None, False, False),
    }


@dataclass
class MixedPrecisionConfig(_Section):
    """Sensitivity-driven bit assignment.

    ``budget`` unit by ``budget_type``: avg_bits = mean weight bits over quantized parameters; weight_memory =
    fraction of the uniform-INT8 weight memory; max_map_drop = mAP50-95 points allowed to be lost.
    """

    weight_bits: list[int] = field(default_factory=lambda: [4, 8])
    activation_bits: list[int] = field(default_factory=lambda: [8])
    allow_float: bool = False
    budget_type: str = "avg_bits"
    budget: float = 6.0
    sensitivity_images: int = 64
    # what the assignment minimises: "loss" (detection-loss change) or "sqnr" (output noise-to-signal power)
    sensitivity_metric: str = "loss"
    # sensitivity tables (and PTQ mAPs of measured assignments) per model+data+config hash; null = no cache
    cache_dir: str | None = "models/checkpoints/sensitivity_cache"
    # validate calibrated PTQ models for the Pareto plot: uniform max/min width and the chosen mix
    measure_pareto: bool = True
    # max_map_drop: halvings of the average-bits interval (each one PTQ validation)
    search_steps: int = 4

    _LABEL: ClassVar[str] = "mixed_precision"
    _CHOICES: ClassVar[dict] = {"budget_type": ("avg_bits", "weight_memory", "max_map_drop"),
                                "sensitivity_metric": ("loss", "sqnr")}
    _RANGES: ClassVar[dict] = {
        "weight_bits": (2, 8, False, False),
        "activation_bits": (2, 16, False, False),
        "budget": (0.0, None, True, False),
        "sensitivity_images": (1, None, False, False),
        "search_steps": (1, 12, False, False),
    }

    def _check_combination(self, path: str) -> None:
        for key in ("weight_bits", "activation_bits"):
            if not getattr(self, key):
                raise ConfigError(f"{path}.{key}: empty list; give at least one candidate bit width, e.g. [8]")
        if len(set(self.activation_bits)) > 1:
            raise ConfigError(
                f"{path}.activation_bits: {self.activation_bits} -- the budgets constrain weight memory, so one "
                "activation width serves every layer; give a single value, e.g. [8]"
            )
        if len(set(self.weight_bits)) != len(self.weight_bits):
            raise ConfigError(f"{path}.weight_bits: {self.weight_bits} lists a width twice; list each once")
        if self.budget_type == "avg_bits" and self.budget < min(self.weight_bits):
            raise ConfigError(
                f"{path}.budget: an average of {self.budget:g} weight bits is below the smallest candidate "
                f"{min(self.weight_bits)} in weight_bits; no assignment can meet it"
            )
        if self.budget_type == "weight_memory" and self.budget < min(self.weight_bits) / 8:
            raise ConfigError(
                f"{path}.budget: {self.budget:g} of the INT8 weight memory is below what the smallest candidate "
                f"width {min(self.weight_bits)} gives ({min(self.weight_bits) / 8:g}); no assignment can meet it"
            )


@dataclass
class ExportConfig(_Section):
    """Export targets; ``tolerance`` is the largest allowed |mAP50-95 drift| in points between export and model."""

    formats: list[str] = field(default_factory=lambda: ["onnx", "openvino"])
    include_metadata: bool = True
    simplify: bool = True
    opset: int = 17
    tolerance: float = 0.5
    dynamic: bool = False
    # end-to-end heads (YOLO26): evaluate and export the one-to-one branch, NMS-free, output (batch, max_det, 6)
    # [x1, y1, x2, y2, score, class]; false: the one-to-many branch with NMS outside, as Ultralytics' export default
    end2end: bool = False

    _LABEL: ClassVar[str] = "export"
    _CHOICES: ClassVar[dict] = {"formats": export_formats.names()}
    _CHOICE_NOUN: ClassVar[dict] = {"formats": "format"}
    _RANGES: ClassVar[dict] = {"opset": (13, None, False, False), "tolerance": (0.0, None, False, False)}

    def _check_combination(self, path: str) -> None:
        dupes = sorted({f for f in self.formats if self.formats.count(f) > 1})
        if dupes:
            raise ConfigError(f"{path}.formats: {', '.join(dupes)} listed more than once")
        if self.end2end and "tflite" in self.formats:
            # as Ultralytics' LiteRT INT8 export: static activation ranges collapse the class-index output
            raise ConfigError(f"{path}.end2end: true cannot export tflite (int8 activation ranges collapse the "
                              "NMS-free head's class-index output); drop tflite from export.formats or set "
                              "export.end2end: false")


@dataclass
class QATConfig(_Section):
    """The whole resolved configuration. ``auto_adjustments`` records changes the toolkit made itself."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    layer_configs: list[LayerConfig] = field(default_factory=list)
    qat_params: QATParams = field(default_factory=QATParams)
    train_params: TrainParams = field(default_factory=TrainParams)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    auto_adjustments: list[str] = field(default_factory=list)

    _LABEL: ClassVar[str] = ""

    def __post_init__(self) -> None:
        token = _PATH.set("")
        try:
            super().__post_init__()
        finally:
            _PATH.reset(token)

    def _check_combination(self, path: str) -> None:
        self._apply_use_lsq()
        self._apply_symmetric_activation_rule()
        q = self.quantization
        bases = {"weight": q.weight, "activation": q.activation, "fake_quantize": q.fake_quantize}
        self._check_exportable("quantization.weight", q.weight)
        self._check_exportable("quantization.activation", q.activation)
        for i, entry in enumerate(self.layer_configs):
            for section, base in bases.items():
                overrides = getattr(entry, section)
                if overrides:
                    where = f"layer_configs[{i}].{section}"
                    merged = type(base).from_dict({**base.to_dict(), **overrides}, where)
                    if section == "weight":
                        _check_weight_rules(merged, where)
                    if section != "fake_quantize":
                        self._check_exportable(where, merged)
        static = export_formats.refusing_dynamic_shapes_in_config(self.export.formats)
        if static is not None and self.export.dynamic:
            raise ConfigError(
                f"export.dynamic: true cannot be combined with {static.name} in export.formats "
                f"({static.static_shapes}); set dynamic: false or drop {static.name}"
            )

    def _check_exportable(self, where: str, quantizer: "QuantizerConfig") -> None:
        """The export formats store int8 tensors (QDQ / TFLite int8): a wider quantizer cannot deploy."""
        max_bits = export_formats.max_bits(self.export.formats)
        if max_bits is not None and quantizer.bit_width > max_bits:
            raise ConfigError(
                f"{where}.bit_width: {quantizer.bit_width} bits cannot be exported to "
                f"{', '.join(self.export.formats)} (their INT8 tensors hold at most {max_bits} bits); use "
                f"bit_width <= {max_bits}, or set export.formats: [] for a model that is only trained and evaluated"
            )

    def _note(self, message: str, level: int = logging.INFO) -> None:
        LOGGER.log(level, message)
        if message not in self.auto_adjustments:
            self.auto_adjustments.append(message)

    def _apply_use_lsq(self) -> None:
        use_lsq = self.qat_params.use_lsq
        fq = self.quantization.fake_quantize
        forced = {True: vocab.LSQ, False: vocab.STE}.get(use_lsq)
        if forced is not None and fq.type != forced:
            self._note(f"quantization.fake_quantize.type: {fq.type!r} -> {forced!r} because qat_params.use_lsq is "
                       f"{str(use_lsq).lower()}")
            fq.type = forced

    def _apply_symmetric_activation_rule(self) -> None:
        # A format such as TensorRT whose int8 kernels take only zero-point-0 (signed symmetric) activations:
        # switching before calibration lets QAT train the ranges that will deploy instead of re-deriving them at
        # export.
        fmt = export_formats.needing_symmetric_activations(self.export.formats)
        if fmt is None:
            return
        act = self.quantization.activation
        if not act.symmetric or act.dtype != "qint8":
            before = f"dtype={act.dtype!r}, symmetric={act.symmetric}"
            act.symmetric, act.dtype = True, "qint8"
            self._note(
                f"quantization.activation: {before} -> dtype='qint8', symmetric=True because export.formats "
                f"includes {fmt.name} ({fmt.symmetric_activations})",
                logging.WARNING,
            )
        for i, entry in enumerate(self.layer_configs):
            over = entry.activation
            if over.get("symmetric") is False or over.get("dtype") == "quint8":
                before = {k: over[k] for k in ("dtype", "symmetric") if k in over}
                if "symmetric" in over:
                    over["symmetric"] = True
                if "dtype" in over:
                    over["dtype"] = "qint8"
                self._note(
                    f"layer_configs[{i}].activation: {before} -> symmetric qint8 because export.formats includes "
                    f"{fmt.name}",
                    logging.WARNING,
                )

    # --------------------------------------------------------------------------------------------- serialization

    @classmethod
    def from_dict(cls, data: Mapping | None, path: str | None = None) -> "QATConfig":
        """Build from plain data exactly as given (no preset layering; see :func:`build_config` for that)."""
        return super().from_dict(data, "" if path is None else path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=120)

    def save_yaml(self, path: str | Path) -> Path:
        """Write the resolved config (e.g. beside a run's outputs as config.yaml); it loads back identically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Resolved QAT configuration (every key explicit).\n" + self.to_yaml())
        return path


# ---------------------------------------------------------------------------------------------------- loading


def _schema_lookup(dotted: str) -> None:
    """Check that a dotted key names a field of the schema; raise with suggestions otherwise."""
    cls: Any = QATConfig
    done = ""
    for part in dotted.split("."):
        if not (isinstance(cls, type) and issubclass(cls, _Section)):
            raise ConfigError(f"{dotted}: '{done}' is a value, not a section; it has no key '{part}'")
        valid = cls.field_names()
        if part not in valid:
            raise _unknown_key_error(done, part, valid)
        cls = _hints(cls)[part]
        done = _join(done, part)


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_config(
    data: Mapping | None = None,
    cli_overrides: Mapping[str, Any] | None = None,
    qconfig: str | None = None,
) -> QATConfig:
    """Layer defaults < preset < ``data`` (parsed YAML) < ``cli_overrides`` and build the validated config.

    Args:
        data: the parsed config file (possibly partial); None means empty.
        cli_overrides: dotted keys to values, e.g. ``{"train_params.epochs": 5}``; None values are ignored (flag not
            given). ``quantization.default_qconfig`` here acts like ``qconfig``.
        qconfig: a preset named on the command line. It replaces the file's ``quantization.weight``, ``activation``
            and ``fake_quantize`` sections wholesale and becomes ``quantization.default_qconfig``.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"<root>: the config must be a mapping of sections, got {type(data).__name__}")
    data = copy.deepcopy(dict(data))
    overrides = {k: v for k, v in (cli_overrides or {}).items() if v is not None}
    if qconfig is None and "quantization.default_qconfig" in overrides:
        qconfig = overrides.pop("quantization.default_qconfig")
    for key in overrides:
        _schema_lookup(key)

    quant = data.get("quantization")
    if quant is not None and not isinstance(quant, Mapping):
        raise ConfigError(f"quantization: expected a mapping, got {type(quant).__name__} {quant!r}")
    quant = dict(quant or {})
    if qconfig is not None:
        try:
            get_preset(qconfig)
        except ConfigError as err:
            raise OverrideError("quantization.default_qconfig", str(err)) from None
        replaced = [s for s in ("weight", "activation", "fake_quantize") if s in quant]
        for section in replaced:
            quant.pop(section)
        if replaced:
            LOGGER.info(
                "--qconfig %s replaces the config file's quantization.%s section(s) with the preset's",
                qconfig,
                "/".join(replaced),
            )
        quant["default_qconfig"] = qconfig
        data["quantization"] = quant
    preset_name = quant.get("default_qconfig", "default")
    if not isinstance(preset_name, str):
        raise ConfigError(f"quantization.default_qconfig: expected a string, got {preset_name!r}")
    try:
        get_preset(preset_name)
    except ConfigError as err:
        raise ConfigError(f"quantization.default_qconfig: {err}") from None

    merged = QATConfig().to_dict()
    merged["quantization"].update({k: v.to_dict() for k, v in preset_sections(preset_name).items()})
    merged["quantization"]["default_qconfig"] = preset_name
    merged = _deep_merge(merged, data)
    for dotted, value in overrides.items():
        node = merged
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = copy.deepcopy(value)
    try:
        return QATConfig.from_dict(merged)
    except ConfigError as err:
        key = str(err).split(":", 1)[0]  # every field error starts with its key path
        if key in overrides:
            raise OverrideError(key, str(err).split(":", 1)[1].strip()) from None
        raise


def config_from_yaml(
    text: str, cli_overrides: Mapping[str, Any] | None = None, qconfig: str | None = None
) -> QATConfig:
    """Parse YAML text and build the config with the same layering as :func:`load_config`."""
    return build_config(_parse_yaml(text), cli_overrides, qconfig)


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config YAML does not parse: {err}") from None


def load_config(
    path: str | Path | None,
    cli_overrides: Mapping[str, Any] | None = None,
    qconfig: str | None = None,
) -> QATConfig:
    """Load the QAT config: built-in defaults < preset < YAML keys < CLI overrides (later wins).

    1. Built-in defaults (the dataclass defaults).
    2. The preset named by ``qconfig`` (CLI ``--qconfig``) or else by the file's ``quantization.default_qconfig``
       supplies ``quantization.weight``/``activation``/``fake_quantize``.
    3. Keys written in the YAML file override those, key by key. A ``qconfig`` argument instead drops the file's
       three quantization sections (logged), so ``--qconfig sensitive`` takes effect with the shipped config.
    4. ``cli_overrides`` (dotted keys such as ``"train_params.epochs"``) override everything.

    Then ``qat_params.use_lsq`` and the TensorRT symmetric-activation rule adjust the result (recorded in
    ``auto_adjustments``).

    Args:
        path: YAML file; None uses only defaults, preset and overrides.
        cli_overrides: dotted key -> value; None values mean "flag not given".
        qconfig: preset name from the command line.

    Raises:
        ConfigError: missing file, bad YAML, unknown key, wrong type or value.
        OverrideError: an invalid ``cli_overrides`` value or ``qconfig`` (not prefixed with the file's name).
    """
    if path is None:
        return build_config(None, cli_overrides, qconfig)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} not found; pass an existing --config (e.g. configs/qat_config.yaml)"
        )
    try:
        data = _parse_yaml(path.read_text())
        if data is None:
            LOGGER.warning(f"config file {path} is empty: using the built-in defaults (layer_configs is empty, "
                           "unlike the shipped configs/qat_config.yaml); fill it in or pass --config "
                           "configs/qat_config.yaml")
        return build_config(data, cli_overrides, qconfig)
    except OverrideError:
        raise  # the flag's fault, not the file's
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
