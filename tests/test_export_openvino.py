"""OpenVINO IR from the QDQ ONNX: parity with the fake-quant model, every quantized conv INT8 in the compiled runtime
graph, Ultralytics-loadable layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import calibrated_qat_model

IMGSZ = 64


def _qat_model(qconfig=None):
    return calibrated_qat_model(IMGSZ, qconfig)


@pytest.fixture(scope="module")
def ir(tmp_path_factory):
    from src.export.metadata import build_metadata
    from src.export.onnx_qdq import export_onnx
    from src.export.openvino_export import export_openvino

    model, cfg = _qat_model()
    out = tmp_path_factory.mktemp("ov")
    meta = build_metadata(model, IMGSZ, cfg=cfg)
    onnx_path = export_onnx(model, out / "onnx" / "quantized_model.onnx", IMGSZ, metadata=meta)
    xml = export_openvino(onnx_path, out / "openvino", "quantized_model", meta)
    return model, onnx_path, xml


def test_layout_and_metadata(ir):
    from src.export.metadata import read_metadata

    _, _, xml = ir
    assert xml.name == "quantized_model.xml" and xml.parent.name == "openvino"
    assert xml.with_suffix(".bin").is_file()
    meta = read_metadata(xml)
    assert meta["names"] == {0: "circle", 1: "square", 2: "triangle"}
    assert meta["imgsz"] == [IMGSZ, IMGSZ] and meta["batch"] == 1
    assert meta["qat_quantization"]["quantized_convs"] == 63


def test_openvino_matches_fake_quant_torch(ir):
    from src.export.common import prepare_for_export
    from src.export.openvino_export import compile_model

    model, _, xml = ir
    ref = prepare_for_export(model)
    g = torch.Generator().manual_seed(7)
    xs = torch.rand(3, 1, 3, IMGSZ, IMGSZ, generator=g)
    # f32 inference precision: the float-by-design tail (DFL, decode) then runs fp32 as in torch, so what is left is
    # the INT8 part; with the default (bf16 on AVX-512 BF16 CPUs) the decode adds bf16 rounding on top
    compiled = compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    errs = []
    for x in xs:
        with torch.no_grad():
            y_t = ref(x).numpy()
        y_o = np.array(compiled([x.numpy()])[0])
        assert y_o.shape == y_t.shape
        errs.append(float(np.abs(y_o - y_t).max()))
    print(f"OpenVINO (f32 hint) vs torch fake quant: max abs err {max(errs):.3g}")
    assert max(errs) < 1e-3  # pixel-unit boxes: agreement to ~1e-4 px


def test_ir_is_compacted_and_computes_what_the_plain_conversion_does(ir, tmp_path):
    """Shared FakeQuantize limits and an unindented XML: smaller, and bit-identical outputs."""
    import openvino as ov

    _, onnx_path, xml = ir
    plain = tmp_path / "plain.xml"
    ov.save_model(ov.convert_model(str(onnx_path)), str(plain), compress_to_fp16=False)
    core = ov.Core()
    ours = core.read_model(str(xml))
    fqs = [op for op in ours.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fqs) >= 50
    for op in fqs:  # output limits read the input-limit constants
        src = [op.input(i).get_source_output().get_node() for i in range(1, 5)]
        assert src[0].get_friendly_name() == src[2].get_friendly_name()
        assert src[1].get_friendly_name() == src[3].get_friendly_name()
    assert "\n\t" not in xml.read_text()
    # names kept where they are read: model I/O tensors and every compute layer
    ref = core.read_model(str(plain))
    assert [p.get_names() for p in ours.outputs] == [p.get_names() for p in ref.outputs]
    assert [p.get_names() for p in ours.inputs] == [p.get_names() for p in ref.inputs]
    layers = lambda m: {op.get_friendly_name() for op in m.get_ops() if op.get_type_name() == "Convolution"}  # noqa: E731
    assert layers(ours) == layers(ref) and len(layers(ours)) == 64
    # measured on the benchmark's yolov8n: XML 462 -> 307 kB, IR 3.52 -> 3.37 MB (0.291x -> 0.278x the 12.10 MB FP32
    # ONNX)
    assert xml.stat().st_size < 0.8 * plain.stat().st_size
    assert xml.with_suffix(".bin").stat().st_size <= plain.with_suffix(".bin").stat().st_size
    x = np.random.default_rng(3).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    cfg = {"INFERENCE_PRECISION_HINT": "f32"}
    a = core.compile_model(str(xml), "CPU", cfg)(x)[0]
    b = core.compile_model(str(plain), "CPU", cfg)(x)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_every_quantized_conv_runs_int8(ir):
    from src.export.openvino_export import runtime_int8_report

    model, _, xml = ir
    report = runtime_int8_report(xml)
    print(report.summary())
    n_quantized = sum(l.quantized for l in model.qat_placement.layers)
    assert len(report.quantized) == n_quantized == 63
    assert report.float_fallbacks == {}
    assert len(report.int8) == 63
    assert list(report.unquantized) == ["/model.22/dfl/conv/Conv"]


def test_conv_without_input_qdq_is_not_counted_quantized(ir, tmp_path):
    """Remove the activation DQ in front of the first conv: the IR has one quantized conv fewer, named."""
    import onnx

    from src.export.openvino_export import export_openvino, runtime_int8_report

    _, onnx_path, _ = ir
    proto = onnx.load(str(onnx_path))
    producer = {o: n for n in proto.graph.node for o in n.output}
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    dq = producer[conv.input[0]]
    q = producer[dq.input[0]]
    conv.input[0] = q.input[0]  # the float image goes straight into the conv
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    report = runtime_int8_report(export_openvino(bad, tmp_path / "ov", "bad"))
    assert len(report.quantized) == 62
    assert "/model.0/Conv/WithoutBiases" in report.unquantized


def test_ultralytics_loads_the_ir_through_the_view(ir):
    from ultralytics import YOLO

    from src.export.openvino_export import ultralytics_view

    _, _, xml = ir
    with ultralytics_view(xml) as view:
        assert view.name == "quantized_model_openvino_model"
        yolo = YOLO(str(view), task="detect")
        image = (np.random.default_rng(0).random((IMGSZ, IMGSZ, 3)) * 255).astype(np.uint8)
        results = yolo.predict(image, imgsz=IMGSZ, conf=0.0, verbose=False)
        assert yolo.predictor.model.format == "openvino"
        assert results[0].names == {0: "circle", 1: "square", 2: "triangle"}
    assert not view.exists()  # the temporary view is cleaned up


def test_w4a8_exports_int4_onnx_and_an_int8_storage_ir_that_runs_int8(tmp_path):
    """OpenVINO's CPU plugin runs convs whose weights come from INT4 constants in bf16/f32 (measured on 2026.4), so
    the IR is converted from an int8-storage QDQ ONNX while the ONNX export keeps packed INT4."""
    from src.export import onnx_qdq, openvino_export
    from src.export.pipeline import export_all

    model, cfg = _qat_model("w4a8")
    cfg.export.formats = ["onnx", "openvino"]
    out = export_all(model, cfg, tmp_path, imgsz=IMGSZ)
    onnx_path, xml = out["onnx"][0], out["openvino"][0]
    assert onnx_qdq.weight_bits(onnx_path) == pytest.approx(4.0, abs=0.02)
    assert openvino_export.weight_bits(xml) == pytest.approx(8.0, abs=0.02)
    report = openvino_export.runtime_int8_report(xml)
    assert len(report.int8) == len(report.quantized) == 63, report.float_fallbacks
    # why: the IR of the packed INT4 ONNX keeps 4-bit constants but its convs do not run INT8
    packed = openvino_export.export_openvino(onnx_path, tmp_path / "int4_ir", "int4")
    assert openvino_export.weight_bits(packed) == pytest.approx(4.0, abs=0.02)
    int4_report = openvino_export.runtime_int8_report(packed)
    assert not int4_report.int8 and len(int4_report.float_fallbacks) == 63, int4_report.float_fallbacks


def test_profile_accounts_for_every_int8_conv_of_the_ir(ir, capsys):
    from benchmarks.ov_profile import main, profile
    from src.export.openvino_export import runtime_int8_report

    _, _, xml = ir
    r = profile(xml, threads=1, runs=2)
    int8_convs = sum(n for (node, kernel), (_, n) in r["by_kernel"].items()
                     if "onvolution" in node and kernel.lower().endswith(("i8", "u8")))
    assert int8_convs == len(runtime_int8_report(xml).int8) == 63
    # every executed convolution lands in one channel bucket; the buckets' time is part of the total
    assert sum(n for _, n in r["conv_by_channels"].values()) == 64  # 63 int8 + DFL's float conv
    assert 0 < sum(ms for ms, _ in r["conv_by_channels"].values()) < r["total"]
    assert main([str(xml), "--runs", "1"]) == 0
    assert "ms per inference" in capsys.readouterr().out
    assert main([str(xml) + ".missing"]) == 2
