"""YOLO11 detection (C3k2 / C3k bottlenecks, C2PSA attention, depthwise head convs) through the same traced
placement: every conv quantized and INT8 in ONNX Runtime's graph and OpenVINO's compiled graph, the attention's
matmuls float by design; PTQ, QAT, export and validation from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from src.cli import main
from tests.helpers import onnx_runtime_and_torch_outputs, prepared_model_family

IMGSZ = 64


@pytest.fixture(scope="module")
def yolo11n():
    return prepared_model_family("yolo11n.yaml", IMGSZ)


def test_every_yolo11_conv_is_quantized_including_attention_and_depthwise_convs(yolo11n):
    from src.models.quant_modules import QuantConv

    model, placement = yolo11n
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and ".dfl" not in n}
    quantized = {l.name for l in placement.layers if l.quantized}
    assert len(quantized) == len(placement.layers) == 87
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, QuantConv)}
    assert {"model.10.m.0.attn.qkv", "model.10.m.0.attn.proj", "model.10.m.0.attn.pe"} <= set(blocks)
    assert blocks["model.10.m.0.attn.pe"].conv.groups > 1  # the positional depthwise conv
    assert any(b.source == "DWConv" for n, b in blocks.items() if n.startswith("model.23.cv3"))
    assert len(convs) == 87


def test_yolo11_onnx_runs_every_conv_int8_and_matches_fake_quant(yolo11n, tmp_path):
    import onnx

    from src.export.onnx_qdq import export_onnx, qdq_summary
    from src.export.openvino_export import export_openvino, runtime_int8_report

    model, _ = yolo11n
    path = export_onnx(model, tmp_path / "y11.onnx", IMGSZ)
    s = qdq_summary(onnx.load(str(path)))
    assert len(s.quantized_convs) == len(s.int8_weight_convs) == 87
    assert s.float_convs == ["/model.23/dfl/conv/Conv"]
    # the attention's MatMul / Softmax read no Q/DQ: float by design
    names = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"MatMul", "Softmax"} <= names
    report = runtime_int8_report(export_openvino(path, tmp_path / "ov", "y11"))
    assert len(report.int8) == len(report.quantized) == 87, report.float_fallbacks
    for got, expected in onnx_runtime_and_torch_outputs(model, path, IMGSZ):
        assert np.abs(got - expected).max() < 1e-3


def test_yolo11n_ptq_qat_export_and_validation_from_the_command_line(tiny_dataset, tmp_path):
    common = ["--model", "yolo11n.yaml", "--data", str(tiny_dataset), "--img-size", "64", "--batch-size", "4",
              "--device", "cpu", "--workers", "0", "--seed", "1"]
    ptq = tmp_path / "ptq"
    assert main([*common, "--epochs", "0", "--save-dir", str(ptq), "--log-dir", str(ptq / "logs")]) == 0
    run = tmp_path / "qat"
    assert main([*common, "--epochs", "1", "--eval", "--export", "--validate-exports", "--export-dir",
                 str(run / "exported"), "--save-dir", str(run), "--log-dir", str(run / "logs")]) == 0
    ckpt = torch.load(run / "quantized_model.pt", weights_only=True)
    assert sum(l["quantized"] for l in ckpt["placement"]["layers"]) == 87
    rows = json.loads((run / "exported" / "validation.json").read_text())["exports"]
    assert {r["format"] for r in rows} == {"onnx", "openvino"}
    assert all(r["int8_convs"] == 87 and r["float_convs"] == 0 for r in rows)
