"""TensorRT-ready QDQ ONNX: the rules pass for a ``tensorrt``-preset model and fail, by name, for an asymmetric one;
re-inserted Q/DQ keep outputs bit-identical; the trtexec command."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

IMGSZ = 64


def _qat_model(qconfig=None, overrides=None):
    from ultralytics.nn.tasks import DetectionModel

    from src.config import load_config
    from src.models.yolov8_qat import prepare_qat_model
    from src.quantization.calibration import calibrate

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = {0: "circle", 1: "square", 2: "triangle"}
    cfg = load_config("configs/qat_config.yaml", overrides, qconfig=qconfig)
    prepare_qat_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    calibrate(model, [torch.rand(2, 3, IMGSZ, IMGSZ, generator=g)], 2, progress=False)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def symmetric():
    # the preset's entropy histograms take seconds to calibrate; min/max gives the same symmetric int8 structure
    return _qat_model("tensorrt", {"quantization.activation.observer": "minmax"})


@pytest.fixture(scope="module")
def asymmetric():
    return _qat_model()


@pytest.fixture(scope="module")
def trt_export(symmetric, tmp_path_factory):
    from src.export.tensorrt_export import export_tensorrt

    model, _ = symmetric
    return export_tensorrt(model, tmp_path_factory.mktemp("export") / "tensorrt", "quantized_model", IMGSZ)


def test_tensorrt_rules_pass_for_the_tensorrt_preset(trt_export):
    import onnx

    from src.export.onnx_qdq import qdq_summary
    from src.export.tensorrt_export import check_tensorrt_rules

    assert trt_export.onnx.name == "quantized_model.onnx" and trt_export.onnx.parent.name == "tensorrt"
    assert check_tensorrt_rules(trt_export.onnx) == []
    proto = onnx.load(str(trt_export.onnx))
    producer = {o: n for n in proto.graph.node for o in n.output}
    s = qdq_summary(proto)
    assert len(s.quantized_convs) == 63
    for n in proto.graph.node:  # every quantized conv reads its input directly from a DequantizeLinear
        if n.name in s.quantized_convs:
            assert producer[n.input[0]].op_type == "DequantizeLinear", n.name


def test_requantized_inputs_keep_outputs_bit_identical(symmetric, trt_export, tmp_path):
    """Dropping the re-inserted Q/DQ pairs gives the plain QDQ graph back; both run to identical outputs."""
    import onnx
    import onnxruntime as ort

    from src.export.common import prepare_for_export

    proto = onnx.load(str(trt_export.onnx))
    inserted = [n for n in proto.graph.node if "/input_requant/" in n.name]
    assert len(inserted) == 2 * 21  # convs after Split/Concat/MaxPool in yolov8n
    source = {n.output[0]: n.input[0] for n in inserted if n.op_type == "QuantizeLinear"}
    for n in proto.graph.node:
        if n.op_type == "Conv" and n.input[0].endswith("/input_requant/dq"):
            n.input[0] = source[n.input[0][: -len("dq")] + "q"]
    keep = [n for n in proto.graph.node if "/input_requant/" not in n.name]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    plain = tmp_path / "plain.onnx"
    onnx.save(proto, str(plain))
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(3))
    def run(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]

    a, b = run(plain), run(trt_export.onnx)
    np.testing.assert_array_equal(a, b)
    with torch.no_grad():
        ref = prepare_for_export(symmetric[0])(x).numpy()
    assert np.abs(b - ref).max() < 1e-3


def test_build_script_and_engine_status(trt_export):
    text = trt_export.script.read_text()
    assert "trtexec --onnx=quantized_model.onnx --saveEngine=quantized_model.engine --int8 --fp16" in text
    assert trt_export.command.startswith(f"trtexec --onnx={trt_export.onnx} ")
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        assert trt_export.engine is None
        assert "not installed" in trt_export.engine_note or "no CUDA GPU" in trt_export.engine_note
    else:
        assert trt_export.engine is not None and trt_export.engine.stat().st_size > 0


def test_rules_name_the_violations_of_an_asymmetric_model(asymmetric, tmp_path):
    from src.export.onnx_qdq import export_onnx
    from src.export.tensorrt_export import check_tensorrt_rules

    model, _ = asymmetric
    path = export_onnx(model, tmp_path / "asym.onnx", IMGSZ)
    violations = check_tensorrt_rules(path)
    zp = [v for v in violations if "zero point" in v]
    assert len(zp) == 1 and "/model.0/a0/QuantizeLinear (uint8 zero point" in zp[0]
    assert "--qconfig tensorrt" in zp[0]
    # the plain QDQ file reaches convs after Split/Concat through those ops: named, with the fix
    assert any(v.startswith("/model.2/cv2/Conv: input comes from Concat") for v in violations)
    assert any(v.startswith("/model.2/m.0/cv1/Conv: input comes from Split") for v in violations)


def test_asymmetric_model_is_refused_before_anything_is_written(asymmetric, tmp_path):
    from src.errors import QATError
    from src.export.pipeline import export_all

    model, cfg = asymmetric
    cfg.export.formats = ["onnx", "tensorrt"]
    with pytest.raises(QATError, match=r"44 activation quantizer\(s\) are asymmetric.*--qconfig tensorrt"):
        export_all(model, cfg, tmp_path, imgsz=IMGSZ)
    assert not any(tmp_path.iterdir())


def test_float_by_design_convs_pass_the_rules_and_the_coverage_check(tmp_path):
    """skip_detection_head keeps the head's convs float; those at P3/P4 read a dequantized neck output."""
    import onnx

    from src.export.onnx_qdq import proto_coverage
    from src.export.tensorrt_export import check_tensorrt_rules, export_tensorrt

    model, _ = _qat_model("tensorrt", {"quantization.activation.observer": "minmax",
                                       "qat_params.skip_detection_head": True})
    res = export_tensorrt(model, tmp_path, "m", IMGSZ, build=False)
    assert check_tensorrt_rules(res.onnx) == []
    proto = onnx.load(str(res.onnx))
    producer = {o: n for n in proto.graph.node for o in n.output}
    float_weight_dq_input = [n.name for n in proto.graph.node if n.op_type == "Conv"
                             and producer.get(n.input[1], n).op_type != "DequantizeLinear"
                             and producer.get(n.input[0], n).op_type == "DequantizeLinear"]
    assert float_weight_dq_input  # the pattern is there: head convs fed by a quantized neck output
    cov = proto_coverage(proto)
    quantized = sum(l.quantized for l in model.qat_placement.layers)
    assert cov.seen == quantized and cov.int8 == quantized and cov.floats == []
