"""validate_exports.py: the spec's command works, the JSON holds every field, and the gate fails an export whose mAP
is off its reference by more than the tolerance or whose quantized conv runs in float (ONNX, OpenVINO, TFLite)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

from tests.helpers import usable_detector

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
    out = _export_with_reference(model, cfg, root, str(tiny_dataset))
    return {**out, "onnx": out["exports"]["onnx"][0], "xml": out["exports"]["openvino"][0]}


@pytest.fixture(scope="module")
def tflite_exports(tiny_dataset, tmp_path_factory):
    """A QAT yolov8n with usable activation scales exported by export_all to ONNX + TFLite (one export, ~10 s)."""
    _skip_without_litert()
    from src.config import load_config

    cfg = load_config("configs/qat_config.yaml", {"export.formats": ["onnx", "tflite"]})
    model, _ = usable_detector(cfg, imgsz=IMGSZ)
    out = _export_with_reference(model, cfg, tmp_path_factory.mktemp("validate_tflite"), str(tiny_dataset))
    return {**out, "tflite": out["exports"]["tflite"][0],
            "quantized": sum(layer.quantized for layer in model.qat_placement.layers)}


def _skip_without_litert() -> None:
    from src.export.tflite_export import TFLiteExportError, _require_litert

    try:
        _require_litert()
    except TFLiteExportError as e:
        pytest.skip(str(e))


def _export_with_reference(model, cfg, root, data) -> dict:
    """Measure the fake-quant model's mAP, export with it in the metadata, and save the QAT checkpoint."""
    from src.export.pipeline import export_all
    from src.export.validate import torch_map
    from src.models.yolov8_qat import qat_checkpoint

    m50, m = torch_map(model, data, IMGSZ, "cpu", root / "work")
    ref = {"map50": m50, "map50_95": m, "imgsz": IMGSZ}
    exports = export_all(model, cfg, root / "models" / "exported", imgsz=IMGSZ, reference_metrics=ref)
    ckpt = root / "quantized_model.pt"
    torch.save(qat_checkpoint(model, cfg), ckpt)
    return {"root": root, "exports": exports, "ckpt": ckpt, "ref": ref, "data": data}


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
    ("model.tflite", "--model {p}: not a .tflite written by the TFLite export (no embedded metadata.json"),
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


@pytest.mark.parametrize("folder, main", [("onnx", "m.onnx"), ("openvino", "m.xml"), ("tensorrt", "m.onnx"),
                                          ("tflite", "m.tflite")])
def test_a_format_folder_of_the_export_dir_is_discovered(tmp_path, folder, main):
    """``<export-dir>/<format>`` holds that format's files; an IR .xml is taken there (not loose elsewhere)."""
    from src.export.discovery import Target, discover

    d = tmp_path / "exported" / folder
    d.mkdir(parents=True)
    for name in (main, "m.bin", "metadata.yaml", "build_engine.sh"):
        (d / name).write_bytes(b"x")
    assert discover([str(d)]) == [Target(d / main, folder)]


def test_an_empty_format_folder_is_no_export(tmp_path):
    from src.export.discovery import ValidationInputError, discover

    d = tmp_path / "exported" / "openvino"
    d.mkdir(parents=True)
    with pytest.raises(ValidationInputError) as e:
        discover([str(d)])
    assert str(e.value) == (f"--model {d}: no exports found (looked for onnx/*.onnx, openvino/*.xml, tensorrt/*.onnx, "
                            "tflite/*.tflite and *.xml in *_openvino_model)")


def test_the_openvino_folder_the_export_wrote_is_validated(exports, tmp_path):
    code, doc = _run(["--model", str(exports["xml"].parent), "--data", exports["data"], "--runs", "0"], tmp_path)
    assert code == 0
    (r,) = doc["exports"]
    assert (r["format"], r["path"], r["passed"]) == ("openvino", str(exports["xml"]), True)
    assert r["reference_map50_95"] == pytest.approx(exports["ref"]["map50_95"], abs=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# TFLite
# --------------------------------------------------------------------------------------------------------------------
def test_export_all_writes_onnx_and_tflite(tflite_exports):
    from src.export.discovery import Target
    from src.export.registry import FORMATS
    from src.export.validate import export_metadata

    assert set(FORMATS) == {"onnx", "openvino", "tensorrt", "tflite"}
    exported = tflite_exports["root"] / "models" / "exported"
    assert tflite_exports["exports"] == {
        "onnx": [exported / "onnx" / "quantized_model.onnx"],
        "tflite": [exported / "tflite" / "quantized_model.tflite",
                   exported / "tflite" / "quantized_model_tflite_ranges.json"],
    }
    assert all(p.stat().st_size > 0 for paths in tflite_exports["exports"].values() for p in paths)
    meta = export_metadata(Target(tflite_exports["tflite"], "tflite"))
    assert meta["imgsz"] == [IMGSZ, IMGSZ] and meta["qat_reference"]["map50_95"] == tflite_exports["ref"]["map50_95"]
    ranges = json.loads(tflite_exports["exports"]["tflite"][1].read_text())
    assert ranges["counts"]["weight"]["qat"] == tflite_exports["quantized"] == 63


def test_tflite_runner_gives_ultralytics_raw_output_in_pixels(tflite_exports):
    """Parity compares what Ultralytics' LiteRTBackend computes: boxes scaled back from input-relative to pixels."""
    from ultralytics import YOLO
    from ultralytics.utils import NUM_THREADS

    from src.export.tflite_export import run_tflite, tflite_runner

    path = tflite_exports["tflite"]
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(5))
    y = YOLO(str(path), task="detect")
    y.predict(np.zeros((IMGSZ, IMGSZ, 3), np.uint8), imgsz=IMGSZ, verbose=False)
    raw = y.predictor.model(x)
    raw = raw[0] if isinstance(raw, (list, tuple)) else raw
    ours = tflite_runner(path, NUM_THREADS)(x.numpy())  # the backend's thread count: same kernels, same codes
    np.testing.assert_array_equal(ours, raw)
    _, (relative,) = run_tflite(path, x.numpy())
    np.testing.assert_array_equal(ours[:, 4:], relative[:, 4:])
    np.testing.assert_allclose(ours[:, :4], relative[:, :4] * IMGSZ, rtol=1e-6, atol=0)


def test_tflite_is_validated_against_the_reference_checkpoint(tflite_exports, tmp_path):
    code, doc = _run(["--model", str(tflite_exports["root"] / "models" / "exported"), "--data",
                      tflite_exports["data"], "--reference", str(tflite_exports["ckpt"]), *FAST], tmp_path)
    by_format = {r["format"]: r for r in doc["exports"]}
    assert code == 0
    assert set(by_format) == {"onnx", "tflite"}
    r = by_format["tflite"]
    assert FIELDS <= set(r) and r["passed"] is True
    assert r["path"] == str(tflite_exports["tflite"])
    assert r["reference_map50_95"] == pytest.approx(tflite_exports["ref"]["map50_95"], abs=1e-9)
    assert r["map50"] is not None and abs(r["map50_95"] - r["reference_map50_95"]) * 100 <= 0.5
    # the 63 quantized convs run int8; the DFL conv of the float decoding tail is not counted as a fallback
    assert (r["int8_convs"], r["float_convs"], r["expected_quantized_convs"]) == (63, 0, 63)
    # Measured: cosine 0.9941, max 94.6 px (in a box size; the decoding is float). TFLite's extra SiLU roundings
    # (see test_export_tflite) are amplified by this random-init network: on the same image TFLite's own reference
    # kernels and XNNPACK differ from each other by as much. Boxes left input-relative would be off by the box sizes
    # themselves (up to ~550 px here).
    assert r["cosine"] > 0.99
    assert 0 < r["max_abs_err"] < 150
    assert r["latency_ms"] > 0 and r["latency_f32_ms"] is None and r["threads"] == os.cpu_count()
    assert r["size_mb"] == pytest.approx(tflite_exports["tflite"].stat().st_size / 1e6, abs=1e-3)


def _with_metadata(src, dst, meta: dict) -> None:
    """Copy a .tflite with its embedded metadata.json replaced (the flatbuffer comes first, the zip after it)."""
    with zipfile.ZipFile(src) as z:
        start = min(i.header_offset for i in z.infolist())
    dst.write_bytes(src.read_bytes()[:start])
    with zipfile.ZipFile(dst, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("metadata.json", json.dumps(meta))


def test_tflite_fails_when_map_differs_from_the_stored_reference(tflite_exports, tmp_path):
    from src.export.discovery import Target
    from src.export.validate import export_metadata

    meta = export_metadata(Target(tflite_exports["tflite"], "tflite"))
    shifted = tflite_exports["ref"]["map50_95"] + 0.006  # 0.6 points off, tolerance 0.5
    path = tmp_path / "quantized_model.tflite"
    _with_metadata(tflite_exports["tflite"], path, {**meta, "qat_reference": {"map50": 0.5, "map50_95": shifted}})
    code, doc = _run(["--model", str(path), "--data", tflite_exports["data"], "--runs", "0"], tmp_path)
    assert code == 1
    (r,) = doc["exports"]
    assert r["passed"] is False and r["reference_map50_95"] == pytest.approx(shifted)
    assert r["reasons"] == [f"mAP50-95 {r['map50_95']:.4f} differs from the reference {shifted:.4f} by 0.60 points "
                            "(> 0.5 tolerance)"]
    code, _ = _run(["--model", str(path), "--data", tflite_exports["data"], "--runs", "0", "--tolerance", "0.7"],
                   tmp_path)
    assert code == 0


def test_tflite_float_or_hybrid_convs_fail_the_gate(tmp_path):
    """int8 weights with float activations name each conv ``(partial)``; a float conversion fails on the count."""
    _skip_without_litert()
    import litert_torch
    from ai_edge_quantizer import quantizer, recipe
    from torch import nn

    from src.export.discovery import Target
    from src.export.validate import ExportResult, _judge, int8_coverage

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 2, 1)).eval()
    float_path, hybrid_path = tmp_path / "float.tflite", tmp_path / "hybrid.tflite"
    litert_torch.convert(model, (torch.rand(1, 3, 8, 8),)).export(str(float_path))
    qt = quantizer.Quantizer(str(float_path))
    qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    qt.quantize().export_model(str(hybrid_path), overwrite=True)
    int8, floats, violations = int8_coverage(Target(hybrid_path, "tflite"), expected=2)
    assert int8 == 0 and violations is None
    assert [name.rsplit(" ", 1)[-1] for name in floats] == ["(partial)"] * 2
    # a float conv may be float by design (the DFL conv of the decoding tail): only the count tells it was quantized
    int8, lost, _ = int8_coverage(Target(float_path, "tflite"), expected=2)
    assert int8 == 0 and len(lost) == 1
    assert lost[0].startswith("2 quantized conv(s) lost their quantization (float convs in the file: CONV_2D#")
    for names in (floats, lost):
        r = ExportResult(str(float_path), "tflite", int8_convs=0, float_conv_names=names, float_convs=len(names))
        _judge(r, 0.5)
        assert r.passed is False and r.reasons == [f"{len(names)} quantized conv(s) run in float: {'; '.join(names)}"]
