"""The config schema: validation messages, precedence, adjustments and the resolved-config round trip."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from src.config import (
    ConfigError,
    FakeQuantizeConfig,
    LayerConfig,
    QATConfig,
    QuantizerConfig,
    TrainParams,
    build_config,
    config_from_yaml,
    load_config,
    preset_sections,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "qat_config.yaml"
CUSTOM = REPO / "configs" / "custom_qat_config.yaml"


def _err(data=None, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(data, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    "data, path, suggestion",
    [
        ({"trian_params": {}}, "trian_params", "train_params"),
        ({"model": {"varient": "s"}}, "model.varient", "variant"),
        ({"quantization": {"weight": {"observr": "minmax"}}}, "quantization.weight.observr", "observer"),
        ({"quantization": {"fake_quantize": {"grad_factr": 1.0}}}, "quantization.fake_quantize.grad_factr", "grad_factor"),
        ({"layer_configs": [{"pattern": "x", "config": {"weight": {"observr": "minmax"}}}]},
         "layer_configs[0].weight.observr", "observer"),
        ({"layer_configs": [{"pattern": "x", "config": {"activaton": {}}}]}, "layer_configs[0].config.activaton",
         "activation"),
        ({"layer_configs": [{"pattern": "x"}, {"patern": "y"}]}, "layer_configs[1].patern", "pattern"),
    ],
)
def test_unknown_key_names_path_and_suggests(data, path, suggestion):
    msg = _err(data)
    assert msg.startswith(f"{path}: unknown key")
    assert f"did you mean '{suggestion}'" in msg


def test_yaml_file_with_observr_fails_suggesting_observer(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("quantization:\n  weight:\n    observr: minmax\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: quantization\.weight\.observr: unknown key \(did you mean 'observer'\?\)"):
        load_config(cfg_file)


def test_unknown_cli_override_key_suggests():
    msg = _err({}, cli_overrides={"train_params.epoch": 3})
    assert msg.startswith("train_params.epoch: unknown key") and "'epochs'" in msg
    assert "is a value, not a section" in _err({}, cli_overrides={"train_params.epochs.x": 3})


def test_no_suggestion_when_nothing_close():
    msg = _err({"zzzz": 1})
    assert "did you mean" not in msg and "valid keys here: model, quantization" in msg


# ----------------------------------------------------------------------------------------------- types and values


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"export": {"formats": ["onnx", "tflit"]}},
         "export.formats: 'tflit' is not a valid format; choose from onnx, openvino, tensorrt, tflite "
         "(did you mean 'tflite'?)"),
        ({"train_params": {"epochs": "two"}}, "train_params.epochs: expected an integer, got str 'two'"),
        ({"train_params": {"epochs": 2.5}}, "train_params.epochs: expected an integer, got float 2.5"),
        ({"train_params": {"ema": "yes"}}, "train_params.ema: expected true/false, got str 'yes'"),
        ({"train_params": {"lr": "fast"}}, "train_params.lr: expected a number, got str 'fast'"),
        ({"train_params": {"optimizer": "adam"}}, "train_params.optimizer: 'adam' is not a valid value; choose from SGD, AdamW"),
        ({"train_params": {"lr": 0}}, "train_params.lr: 0.0 is out of range; allowed (0, inf]"),
        ({"train_params": {"img_size": 100}}, "train_params.img_size: 100 is not a multiple of the model stride 32; use 128 or 96"),
        ({"train_params": {"device": "gpu"}}, "train_params.device: 'gpu' is not a device"),
        ({"quantization": {"activation": {"bit_width": 17}}},
         "quantization.activation.bit_width: 17 is out of range; allowed [2, 16]"),
        ({"quantization": {"activation": {"bit_width": 1}}},
         "quantization.activation.bit_width: 1 is out of range; allowed [2, 16]"),
        ({"quantization": {"weight": {"scheme": "per_tensor", "observer": "per_channel_minmax"}}},
         "quantization.weight.observer: 'per_channel_minmax' needs scheme 'per_channel'"),
        ({"quantization": {"activation": {"scheme": "per_channel", "observer": "minmax"}}},
         "quantization.activation.scheme: 'per_channel' is not supported for activations"),
        ({"quantization": {"weight": {"symmetric": False}}}, "quantization.weight: weights are quantized signed and symmetric"),
        ({"quantization": {"activation": {"percentile": 0}}}, "quantization.activation.percentile: 0.0 is out of range; allowed (0, 100]"),
        ({"quantization": {"weight": "int8"}}, "quantization.weight: expected a mapping, got str 'int8'"),
        ({"model": {"variant": "z"}}, "model.variant: 'z' is not a valid value; choose from n, s, m, l, x"),
        ({"export": {"formats": "onnx"}}, "export.formats: expected a list of a string, got str 'onnx'"),
        ({"quantization": {"weight": {"bit_width": 12}}}, "quantization.weight.bit_width: 12 bits cannot be exported"),
        ({"export": {"opset": 11}}, "export.opset: 11 is out of range; allowed [13, inf]"),
        ({"qat_params": {"use_lsq": "yes"}}, "qat_params.use_lsq: expected true/false or null, got str 'yes'"),
        ({"qat_params": {"post_qat_fine_tuning": True, "fine_tuning_epochs": 0}},
         "qat_params.fine_tuning_epochs: post_qat_fine_tuning is on but fine_tuning_epochs is 0"),
        ({"mixed_precision": {"budget": 3.0}}, "mixed_precision.budget: an average of 3 weight bits is below"),
        ({"mixed_precision": {"weight_bits": [4, 20]}}, "mixed_precision.weight_bits[1]: 20 is out of range"),
        ({"distillation": {"temperature": -1}}, "distillation.temperature: -1.0 is out of range"),
        ({"layer_configs": {"pattern": "x"}}, "layer_configs: expected a list of a mapping"),
        ({"layer_configs": [{"pattern": "x", "config": {"weight": {"bit_width": 99}}}]},
         "layer_configs[0].weight.bit_width: 99 is out of range; allowed [2, 16]"),
        ({"layer_configs": [{"pattern": "x", "weight": {"symmetric": False}}]},
         "layer_configs[0].weight: weights are quantized signed and symmetric"),
        ({"layer_configs": [{"pattern": "x", "activation": {"observer": "histogram"},
                             "config": {"activation": {"bit_width": 4}}}]},
         "layer_configs[0]: 'activation' is given both under 'config:' and at the entry level"),
        ({"layer_configs": [{"config": {}}]}, "layer_configs[0].pattern: empty pattern"),
    ],
)
def test_bad_values_name_path_value_and_fix(data, expected):
    assert _err(data).startswith(expected)


def test_bad_regex_is_a_config_error_naming_it():
    msg = _err({"layer_configs": [{"pattern": "model.0.conv"}, {"pattern": "model.[0-9+.detect"}]})
    assert msg.startswith("layer_configs[1].pattern: 'model.[0-9+.detect' is not a valid regular expression")


def test_unknown_preset_lists_valid_ones():
    msg = _err(None, qconfig="sensitiv")
    assert "unknown qconfig preset 'sensitiv' (did you mean 'sensitive'?)" in msg
    assert "valid presets: default, sensitive, tensorrt, openvino, w4a8" in msg
    assert _err({"quantization": {"default_qconfig": "trt"}}).startswith("quantization.default_qconfig: unknown qconfig")


def test_coercions():
    cfg = build_config({"train_params": {"lr": "5e-4", "device": 0, "weight_decay": 0}})
    # PyYAML reads 5e-4 as a string; `device: 0` is an int in YAML but a GPU index string on the CLI.
    assert cfg.train_params.lr == 0.0005 and cfg.train_params.device == "0" and cfg.train_params.weight_decay == 0.0
    assert isinstance(cfg.train_params.weight_decay, float)
    assert config_from_yaml("train_params:\n  lr: 5e-4\n").train_params.lr == 0.0005


def test_direct_construction_validates_too():
    with pytest.raises(ConfigError, match=r"^quantizer\.bit_width: 40 is out of range"):
        QuantizerConfig(bit_width=40)
    with pytest.raises(ConfigError, match=r"^train_params\.epochs: -1 is out of range"):
        TrainParams(epochs=-1)
    with pytest.raises(ConfigError, match=r"^fake_quantize\.type: 'straight' is not a valid value"):
        FakeQuantizeConfig(type="straight")
    assert FakeQuantizeConfig(type="custom").type == "ste"


# ------------------------------------------------------------------------------------------------------ precedence


def test_dataclass_defaults_are_the_default_preset():
    cfg = QATConfig()
    sections = preset_sections("default")
    assert cfg.quantization.weight == sections["weight"]
    assert cfg.quantization.activation == sections["activation"]
    assert cfg.quantization.fake_quantize == sections["fake_quantize"]
    assert build_config(None) == cfg


def test_precedence_defaults_preset_yaml_cli():
    data = {
        "quantization": {"default_qconfig": "sensitive", "activation": {"histogram_method": "percentile"}},
        "train_params": {"epochs": 3, "lr": 0.001},
    }
    cfg = build_config(data, cli_overrides={"train_params.epochs": 5, "train_params.batch_size": None})
    act = cfg.quantization.activation
    assert act.observer == "histogram"  # preset over built-in default
    assert act.histogram_method == "percentile"  # YAML over preset (mse)
    assert cfg.quantization.fake_quantize.type == "lsq"  # preset, YAML silent
    assert cfg.train_params.epochs == 5  # CLI over YAML
    assert cfg.train_params.lr == 0.001  # YAML over default
    assert cfg.train_params.batch_size == 16  # None = flag not given
    assert cfg.train_params.img_size == 640  # built-in default


def test_cli_qconfig_replaces_shipped_yaml_sections(caplog):
    shipped = yaml.safe_load(SHIPPED.read_text())
    assert shipped["quantization"]["activation"]["observer"] == "histogram"
    with caplog.at_level(logging.INFO, logger="yolov8_qat"):
        cfg = load_config(SHIPPED, qconfig="sensitive")
    sensitive = preset_sections("sensitive")
    assert cfg.quantization.default_qconfig == "sensitive"
    assert cfg.quantization.weight == sensitive["weight"]
    assert cfg.quantization.activation == sensitive["activation"]
    assert cfg.quantization.fake_quantize == sensitive["fake_quantize"]
    assert any("--qconfig sensitive replaces" in r.getMessage() for r in caplog.records)
    # Everything else in the file still applies.
    assert [e.pattern for e in cfg.layer_configs] == ["model.0.conv", "model.[0-9]+.detect"]
    # Without --qconfig, the file's explicit sections win over the preset it names.
    plain = load_config(SHIPPED)
    assert (plain.quantization.activation.observer, plain.quantization.activation.histogram_method) == (
        "histogram", "percentile")
    assert plain.quantization.activation != cfg.quantization.activation


def test_cli_overrides_beat_qconfig_and_default_qconfig_override_acts_like_qconfig():
    cfg = load_config(SHIPPED, {"quantization.activation.bit_width": 6}, qconfig="tensorrt")
    assert cfg.quantization.activation.bit_width == 6 and cfg.quantization.activation.histogram_method == "entropy"
    via_override = load_config(SHIPPED, {"quantization.default_qconfig": "tensorrt", "quantization.activation.bit_width": 6})
    assert via_override == cfg


def test_shipped_config_runs_plain_qat():
    cfg = load_config(SHIPPED)
    qp = cfg.qat_params
    assert (qp.use_distillation, qp.use_mixed_precision, qp.post_qat_fine_tuning, qp.use_lsq) == (False, False, False, None)
    assert cfg.quantization.fake_quantize.type == "ste"
    assert cfg.train_params.epochs == 2 and cfg.train_params.lr == 0.0001
    assert cfg.auto_adjustments == []
    # Every section of the spec's section 6 is present in the file.
    assert set(yaml.safe_load(SHIPPED.read_text())) >= {"model", "quantization", "layer_configs", "qat_params",
                                                        "train_params", "export"}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml' not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train_params: [1,\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_config(bad)


# ------------------------------------------------------------------------------------------------ use_lsq, tensorrt


def test_use_lsq_forces_type_and_null_lets_preset_decide():
    assert build_config({"qat_params": {"use_lsq": True}}).quantization.fake_quantize.type == "lsq"
    assert build_config({}, qconfig="sensitive").quantization.fake_quantize.type == "lsq"
    forced = build_config({"qat_params": {"use_lsq": False}}, qconfig="sensitive")
    assert forced.quantization.fake_quantize.type == "ste"
    assert forced.auto_adjustments == ["quantization.fake_quantize.type: 'lsq' -> 'ste' because qat_params.use_lsq is false"]


def test_custom_is_the_spec_name_of_ste_and_is_stored_as_ste(caplog):
    # The spec's YAML writes type: "custom"; it must load as written, without warnings, and mean STE.
    text = ("quantization:\n  fake_quantize:\n    type: \"custom\"\n"
            "layer_configs:\n  - pattern: model.0.conv\n    config:\n      fake_quantize: {type: custom}\n")
    with caplog.at_level(logging.WARNING):
        cfg = config_from_yaml(text)
    assert cfg.quantization.fake_quantize.type == "ste"
    assert cfg.layer_configs[0].fake_quantize == {"type": "ste"}
    assert cfg.auto_adjustments == [] and not caplog.records
    assert config_from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ConfigError, match="'stee' is not a valid"):
        build_config({"quantization": {"fake_quantize": {"type": "stee"}}})


def test_tensorrt_switches_activations_to_symmetric(caplog):
    data = {
        "quantization": {"activation": {"dtype": "quint8", "symmetric": False}},
        "layer_configs": [
            {"pattern": "model.0.conv", "activation": {"symmetric": False, "observer": "histogram"}},
            {"pattern": "model.1.conv", "activation": {"dtype": "quint8"}},
            {"pattern": "model.2", "activation": {"bit_width": 6}},
        ],
        "export": {"formats": ["onnx", "tensorrt"]},
    }
    with caplog.at_level(logging.WARNING, logger="yolov8_qat"):
        cfg = build_config(data)
    act = cfg.quantization.activation
    assert (act.symmetric, act.dtype) == (True, "qint8")
    assert cfg.layer_configs[0].activation == {"symmetric": True, "observer": "histogram"}
    assert cfg.layer_configs[1].activation == {"dtype": "qint8"}
    assert cfg.layer_configs[2].activation == {"bit_width": 6}
    assert len(cfg.auto_adjustments) == 3
    assert "because export.formats includes tensorrt" in cfg.auto_adjustments[0]
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 3
    # The same activation settings without tensorrt are left alone.
    untouched = build_config({**data, "export": {"formats": ["onnx"]}})
    assert untouched.quantization.activation.symmetric is False and untouched.auto_adjustments == []


def test_spec_section7_tensorrt_example_and_custom_config():
    spec_example = """
quantization:
  weight:
    dtype: "qint8"
    scheme: "per_channel"
  activation:
    dtype: "quint8"
    scheme: "per_tensor"
    symmetric: false
export:
  formats: ["tensorrt"]
  simplify: true
"""
    cfg = config_from_yaml(spec_example)
    assert cfg.quantization.activation.symmetric is True and cfg.quantization.activation.dtype == "qint8"
    assert cfg.auto_adjustments and cfg.export.formats == ["tensorrt"]
    custom = load_config(CUSTOM)
    assert custom.quantization.default_qconfig == "tensorrt"
    assert custom.quantization.activation.histogram_method == "percentile"  # YAML over preset's entropy
    assert custom.model.variant == "s" and custom.qat_params.post_qat_fine_tuning is True


# ------------------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("source", ["shipped", "custom", "adjusted"])
def test_resolved_config_round_trips(tmp_path, source):
    if source == "shipped":
        cfg = load_config(SHIPPED, {"train_params.epochs": 7}, qconfig="w4a8")
    elif source == "custom":
        cfg = load_config(CUSTOM)
    else:
        cfg = build_config(
            {"qat_params": {"use_lsq": True}, "export": {"formats": ["tensorrt", "tflite"]},
             "quantization": {"activation": {"symmetric": False}}}
        )
        assert len(cfg.auto_adjustments) == 2
    out = cfg.save_yaml(tmp_path / "run" / "config.yaml")
    assert QATConfig.from_dict(yaml.safe_load(out.read_text())) == cfg
    # Loading it back through the full layering (as --config) changes nothing either.
    assert load_config(out) == cfg
    assert load_config(out).to_dict() == cfg.to_dict()


def test_sections_are_not_shared_between_configs():
    a = QATConfig()
    b = QATConfig(quantization=a.quantization)
    b.quantization.weight.bit_width = 4
    assert a.quantization.weight.bit_width == 8


def test_layer_config_accepts_both_layouts():
    nested = LayerConfig.from_dict({"pattern": "p", "config": {"weight": {"bit_width": 4}, "fake_quantize": {"type": "lsq"}}})
    flat = LayerConfig.from_dict({"pattern": "p", "weight": {"bit_width": 4}, "fake_quantize": {"type": "lsq"}})
    assert nested == flat
    assert flat.to_dict() == {"pattern": "p", "weight": {"bit_width": 4}, "fake_quantize": {"type": "lsq"}}
    assert [f.name for f in dataclasses.fields(LayerConfig)] == ["pattern", "weight", "activation", "fake_quantize"]


def test_dynamic_shapes_refused_at_load_for_tensorrt_only():
    # TensorRT's rule is a config error; TFLite refuses dynamic shapes when it exports (a checkpoint trained with such
    # a config still loads, evaluates and exports to other formats).
    with pytest.raises(ConfigError, match="export.dynamic: true cannot be combined with tensorrt"):
        build_config({"export": {"formats": ["tensorrt"], "dynamic": True}})
    assert build_config({"export": {"formats": ["tflite"], "dynamic": True}}).export.dynamic is True


def test_grad_factor_is_for_learned_qparams():
    assert build_config({"quantization": {"fake_quantize": {"type": "lsq", "grad_factor": 0.5}}})
    with pytest.raises(ConfigError, match="quantization.fake_quantize.grad_factor: grad_factor=0.5 scales the gradients"):
        build_config({"quantization": {"fake_quantize": {"type": "custom", "grad_factor": 0.5}}})
