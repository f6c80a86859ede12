"""validate_exports.py: the spec's command works, the JSON holds every field, and the gate fails an export whose mAP
is off its reference by more than the tolerance or whose quantized conv runs in float (ONNX and OpenVINO)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

IMGSZ = 64
FIELDS = {"path", "format", "map50", "map50_95", "reference_map50_95", "max_abs_err", "cosine", "latency_ms",
          "threads", "int8_convs", "float_convs", "size_mb", "passed"}
FAST = ["--runs", "3", "--warmup", "1", "--parity-images", "2"]


@pytest.fixture(scope="module")
def exports(tiny_dataset, tmp_path_factory):
    """A calibrated QAT yolov8n (nc=3) exported to ONNX + OpenVINO with its true reference mAP in the metadata."""
    from ultralytics.nn.tasks import DetectionModel

    from src.config import load_config
    from src.export.pipeline import export_all
    from src.export.validate import torch_map
    from src.models.yolov8_qat import prepare_qat_model, qat_checkpoint
    from src.quantization.calibration import calibrate

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = {0: "circle", 1: "square", 2: "triangle"}
    cfg = load_config("configs/qat_config.yaml", {"export.formats": ["onnx", "openvino"]})
    prepare_qat_model(model, cfg)
    calibrate(model, [torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))], 2,
              progress=False)
    model.eval()
    root = tmp_path_factory.mktemp("validate")
    m50, m = torch_map(model, str(tiny_dataset), IMGSZ, "cpu", root / "work")
    ref = {"map50": m50, "map50_95": m, "imgsz": IMGSZ}
    out = export_all(model, cfg, root / "models" / "exported", imgsz=IMGSZ, reference_metrics=ref)
    ckpt = root / "quantized_model.pt"
    torch.save(qat_checkpoint(model, cfg), ckpt)
    return {"root": root, "onnx": out["onnx"][0], "xml": out["openvino"][0], "ckpt": ckpt, "ref": ref,
            "data": str(tiny_dataset)}


def _run(argv, tmp_path) -> tuple[int, dict | None]:
    from src.export.validate import main

    out = tmp_path / "result.json"
    code = main([*argv, "--json", str(out)])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_gate_arithmetic_is_in_map_points():
    from src.export.validate import map_within_tolerance

    assert map_within_tolerance(0.300, 0.305, 0.5)  # 0.5 points
    assert map_within_tolerance(0.305, 0.300, 0.5)
    assert not map_within_tolerance(0.300, 0.3051, 0.5)
    assert not map_within_tolerance(0.3061, 0.300, 0.5)
    assert map_within_tolerance(0.42, 0.42, 0.0)
    assert not map_within_tolerance(0.42, 0.4201, 0.0)


def test_spec_command_passes_and_writes_every_field(exports, tmp_path, monkeypatch):
    monkeypatch.chdir(exports["root"])  # the spec's relative path: models/exported/onnx/quantized_model.onnx
    code, doc = _run(["--model", "models/exported/onnx/quantized_model.onnx", "--data", exports["data"]], tmp_path)
    assert code == 0
    (r,) = doc["exports"]
    assert FIELDS <= set(r)
    assert r["format"] == "onnx" and r["passed"] is True
    assert r["reference_map50_95"] == pytest.approx(exports["ref"]["map50_95"], abs=1e-12)  # from the metadata
    assert abs(r["map50_95"] - r["reference_map50_95"]) * 100 <= 0.5
    assert (r["int8_convs"], r["float_convs"]) == (63, 0)
    assert r["size_mb"] == pytest.approx(exports["onnx"].stat().st_size / 1e6, abs=1e-3)
    assert r["threads"] == os.cpu_count() and r["latency_ms"] > 0
    assert r["max_abs_err"] is None and r["cosine"] is None  # no --reference: no parity


def test_reference_checkpoint_gives_parity_for_each_export(exports, tmp_path):
    code, doc = _run(["--model", str(exports["root"] / "models" / "exported"), "--data", exports["data"],
                      "--reference", str(exports["ckpt"]), *FAST], tmp_path)
    assert code == 0
    by_format = {r["format"]: r for r in doc["exports"]}
    assert set(by_format) == {"onnx", "openvino"}
    for fmt, r in by_format.items():
        assert r["reference_map50_95"] == pytest.approx(exports["ref"]["map50_95"], abs=1e-9)
        assert r["cosine"] > 0.9999, fmt
        assert r["int8_convs"] == 63 and r["float_convs"] == 0
    assert by_format["onnx"]["max_abs_err"] < 1e-3
    assert by_format["openvino"]["max_abs_err"] < 0.05  # default precision may run the float DFL/decode in bf16
    assert by_format["openvino"]["latency_f32_ms"] > 0 and by_format["onnx"]["latency_f32_ms"] is None


def test_fails_when_map_differs_from_the_stored_reference(exports, tmp_path):
    import onnx

    from src.export.onnx_qdq import set_metadata

    proto = onnx.load(str(exports["onnx"]))
    shifted = exports["ref"]["map50_95"] + 0.006  # 0.6 points off, tolerance 0.5
    set_metadata(proto, {"qat_reference": json.dumps({"map50": 0.5, "map50_95": shifted})})
    path = tmp_path / "quantized_model.onnx"
    onnx.save(proto, str(path))
    code, doc = _run(["--model", str(path), "--data", exports["data"], "--runs", "0"], tmp_path)
    assert code == 1
    (r,) = doc["exports"]
    assert r["passed"] is False and r["reference_map50_95"] == pytest.approx(shifted)
    assert "differs from the reference" in r["reasons"][0]
    code, _ = _run(["--model", str(path), "--data", exports["data"], "--runs", "0", "--tolerance", "0.7"], tmp_path)
    assert code == 0


def test_fails_when_a_quantized_conv_runs_in_float(exports, tmp_path):
    """The first conv's input DQ is bypassed (float image in): ONNX names the conv, OpenVINO counts it missing."""
    import onnx

    from src.export.openvino_export import export_openvino

    proto = onnx.load(str(exports["onnx"]))
    producer = {o: n for n in proto.graph.node for o in n.output}
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    conv.input[0] = producer[producer[conv.input[0]].input[0]].input[0]
    bad = tmp_path / "onnx" / "quantized_model.onnx"
    bad.parent.mkdir()
    onnx.save(proto, str(bad))
    xml = export_openvino(bad, tmp_path / "openvino", "quantized_model")
    shutil.copy(exports["xml"].parent / "metadata.yaml", xml.parent / "metadata.yaml")
    code, doc = _run(["--model", str(bad), str(xml), "--data", exports["data"], "--runs", "0"], tmp_path)
    assert code == 1
    onnx_r, ov_r = doc["exports"]
    assert onnx_r["passed"] is False and ov_r["passed"] is False
    assert onnx_r["float_convs"] == 1 and onnx_r["float_conv_names"] == ["/model.0/Conv (partial)"]
    assert ov_r["int8_convs"] == 62 and ov_r["float_convs"] == 1
    assert "/model.0/Conv/WithoutBiases" in ov_r["float_conv_names"][0]


@pytest.mark.parametrize("name, message", [
    ("missing.onnx", "--model {p}: no such file or directory"),
    ("model.tflite", "TFLite validation is not implemented yet"),
    ("model.pt", "unsupported export format .pt"),
])
def test_bad_input_is_one_line_without_traceback(exports, tmp_path, capsys, name, message):
    from src.export.validate import main

    p = tmp_path / name
    if name != "missing.onnx":
        p.write_bytes(b"x")
    code = main(["--model", str(p), "--data", exports["data"]])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2
    assert message.format(p=p) in text
    assert "Traceback" not in text
    assert len([line for line in text.splitlines() if line.startswith("ERROR")]) == 1
