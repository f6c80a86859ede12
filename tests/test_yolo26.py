"""YOLO26 detection: the end-to-end head's two branches (one-to-many for the training loss and Ultralytics' default
inference with NMS outside, one-to-one for NMS-free inference) quantized by the same traced placement, no DFL
(reg_max 1); export of either branch, and PTQ, QAT, export and validation from the command line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from src.cli import main
from tests.helpers import onnx_runtime_and_torch_outputs, prepared_model_family

IMGSZ = 64
ANCHORS = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))  # 84 at 64 px
BRANCH_CONVS = 3 * (3 + 5)  # per level: box branch Conv, Conv, Conv2d; class branch DWConv, Conv, DWConv, Conv, Conv2d


@pytest.fixture(scope="module")
def yolo26n():
    return prepared_model_family("yolo26n.yaml", IMGSZ)


def _e2e(model, on: bool):
    from src.integrations.ultralytics import select_end2end

    m = copy.deepcopy(model)
    assert select_end2end(m, on)
    return m


def _separate_classes(model) -> None:
    """Class biases -3, 0, 3 on the one-to-one class convs: a random-init model scores every anchor almost alike, so
    the NMS-free top-k (k = all anchors here) would pick among near-ties; this way it holds exactly the last class at
    every anchor, in either runtime, and only the order of equal-score rows may differ."""
    for branch in model.model[-1].one2one_cv3:
        conv = branch[-1].conv
        with torch.no_grad():
            conv.bias.copy_(torch.linspace(-3.0, 3.0, conv.bias.numel()))


def _rows(out: np.ndarray, end2end: bool) -> np.ndarray:
    """NMS-free rows in one canonical order (by box, then score and class); the one-to-many output as it is."""
    if not end2end:
        return out
    rows = out[0]
    key = np.round(rows[:, :4], 2)  # float noise in a coordinate must not reorder rows
    return rows[np.lexsort(key.T[::-1])]


def test_both_head_branches_are_quantized_and_read_the_same_input_quantizers(yolo26n):
    model, placement = yolo26n
    by_name = {l.name: l for l in placement.layers}
    assert len(placement.layers) == sum(l.quantized for l in placement.layers) == 126
    o2o = [n for n in by_name if ".one2one_cv" in n]
    assert len(o2o) == BRANCH_CONVS
    for n in o2o:  # the first conv of each one-to-one branch reads the neck output the one-to-many twin reads
        if n.endswith((".0.0", ".0.0.0")):
            twin = n.replace("one2one_", "")
            assert by_name[n].input_group == by_name[twin].input_group is not None
    assert not any(".dfl" in n for n in by_name)  # reg_max 1: no DFL conv


@pytest.mark.parametrize("end2end", [False, True])
def test_deployed_convs_are_the_selected_branch(yolo26n, end2end):
    from src.models.yolov8_qat import deployed_layers

    m = _e2e(yolo26n[0], end2end)
    names = [l.name for l in deployed_layers(m)]
    assert len(names) == 126 - BRANCH_CONVS
    unused = (".cv2.", ".cv3.") if end2end else (".one2one_cv2.", ".one2one_cv3.")
    assert not any(u in n for n in names for u in unused)


@pytest.mark.parametrize("end2end", [False, True])
def test_yolo26_onnx_and_openvino_run_the_selected_branch_int8_and_match_fake_quant(yolo26n, end2end, tmp_path):
    import onnx

    from src.export.onnx_qdq import export_onnx, qdq_summary
    from src.export.openvino_export import export_openvino, runtime_int8_report

    model = _e2e(yolo26n[0], end2end)
    _separate_classes(model)
    path = export_onnx(model, tmp_path / "y26.onnx", IMGSZ)
    graph = onnx.load(str(path))
    s = qdq_summary(graph)
    deployed = 126 - BRANCH_CONVS
    assert len(s.quantized_convs) == len(s.int8_weight_convs) == deployed and s.float_convs == []
    assert any("one2one" in n.name for n in graph.graph.node if n.op_type == "Conv") is end2end
    report = runtime_int8_report(export_openvino(path, tmp_path / "ov", "y26"))
    assert len(report.int8) == len(report.quantized) == deployed, report.float_fallbacks
    for got, expected in onnx_runtime_and_torch_outputs(model, path, IMGSZ):
        # NMS-free: (1, k, 6) rows [x1, y1, x2, y2, score, class], k = min(max_det 300, anchors)
        assert got.shape == ((1, ANCHORS, 6) if end2end else (1, 4 + 3, ANCHORS))
        assert np.abs(_rows(got, end2end) - _rows(expected, end2end)).max() < 1e-3


def _config(tmp_path, **export) -> str:
    cfg = yaml.safe_load(open("configs/qat_config.yaml"))
    cfg["export"].update(export)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_yolo26n_qat_export_and_validation_from_the_command_line(tiny_dataset, tmp_path):
    run = tmp_path / "qat"
    config = _config(tmp_path, formats=["onnx", "openvino"])
    assert main(["--model", "yolo26n.yaml", "--data", str(tiny_dataset), "--config", config, "--img-size", "64",
                 "--batch-size", "4", "--device", "cpu", "--workers", "0", "--seed", "1", "--epochs", "1", "--eval",
                 "--export", "--validate-exports", "--export-dir", str(run / "exported"), "--save-dir", str(run),
                 "--log-dir", str(run / "logs")]) == 0
    ckpt = torch.load(run / "quantized_model.pt", weights_only=True)
    assert sum(l["quantized"] for l in ckpt["placement"]["layers"]) == 126
    rows = json.loads((run / "exported" / "validation.json").read_text())["exports"]
    assert {r["format"] for r in rows} == {"onnx", "openvino"}
    assert all(r["passed"] and r["int8_convs"] == r["expected_quantized_convs"] == 126 - BRANCH_CONVS for r in rows)


def test_yolo26n_nms_free_ptq_export_and_validation_from_the_command_line(tiny_dataset, tmp_path):
    from src.export.metadata import read_metadata

    # the TensorRT target too: its symmetric preset, and TopK in the NMS-free graph
    config = _config(tmp_path, end2end=True, formats=["onnx", "openvino", "tensorrt"])
    run = tmp_path / "ptq"
    assert main(["--model", "yolo26n.yaml", "--data", str(tiny_dataset), "--config", config, "--img-size", "64",
                 "--batch-size", "4", "--device", "cpu", "--workers", "0", "--epochs", "0", "--export",
                 "--validate-exports", "--export-dir", str(run / "exported"), "--save-dir", str(run),
                 "--log-dir", str(run / "logs")]) == 0
    rows = json.loads((run / "exported" / "validation.json").read_text())["exports"]
    assert {r["format"] for r in rows} == {"onnx", "openvino", "tensorrt"}
    assert all(r["passed"] and r["int8_convs"] == 126 - BRANCH_CONVS for r in rows), rows
    meta = read_metadata(run / "exported" / "onnx" / "quantized_model.onnx")
    assert meta["end2end"] is True  # Ultralytics' backends then skip NMS


def test_nms_free_export_needs_an_end_to_end_head_and_no_tflite(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    from src.config import load_config
    from src.errors import ConfigError
    from src.stages.resolve import select_inference_head

    with pytest.raises(ConfigError, match=r"export.end2end: true, but the model has no end-to-end"):
        select_inference_head(load_config(_config(tmp_path, end2end=True)),
                              DetectionModel("yolov8n.yaml", nc=3, verbose=False))
    with pytest.raises(ConfigError, match=r"export.end2end: true cannot export tflite"):
        load_config(_config(tmp_path, end2end=True, formats=["onnx", "tflite"]))


def test_distillation_refuses_an_end_to_end_head(yolo26n):
    from src.training.distill import DistillationError, _raw

    model = copy.deepcopy(yolo26n[0]).train()
    preds = model(torch.rand(1, 3, IMGSZ, IMGSZ))
    with pytest.raises(DistillationError, match=r"end-to-end heads \(YOLO26.*run without --distillation"):
        _raw(preds)
