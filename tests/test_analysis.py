"""--analyze: the report's numbers against direct computation, and the CLI on a run and on a checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from src.analysis.model_stats import model_sizes, quantization_ratio
from src.analysis.report import build_report, write_report
from src.config import load_config
from src.models.yolov8_qat import QuantConv, prepare_qat_model, quantizers
from src.quantization.calibration import calibrate


def _prepared(bit_overrides=None):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    m = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    cfg = load_config(None)
    prepare_qat_model(m, cfg, bit_overrides=bit_overrides)
    torch.manual_seed(1)
    calibrate(m, [torch.rand(2, 3, 64, 64)], 2, progress=False)
    return m.eval()


MIXED = {"model.1": {"weight_bits": 4}, "model.2.cv1": {"weight_bits": 4}, "model.0": {"float": True}}


def test_ratio_and_sizes_match_parameter_counts():
    m = _prepared(MIXED)
    placement = m.qat_placement
    r = quantization_ratio(m)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    quant = [l for l in placement.layers if l.quantized]
    assert r["layers_total"] == len(convs) == len(placement.layers) + 1  # + the DFL's fixed conv
    assert r["layers_quantized"] == len(quant)
    assert r["ratio_layers"] == len(quant) / len(convs)
    assert r["ratio_params"] == sum(l.params for l in quant) / sum(c.weight.numel() for c in convs)
    names = {f["name"]: f["reason"] for f in r["float_layers"]}
    assert names["model.0"] == "mixed precision: kept float" and "DFL" in names["model.22.dfl.conv"]

    s = model_sizes(m)
    n_params = sum(p.numel() for n, p in m.named_parameters() if "qat_quantizers" not in n and "weight_quant" not in n)
    assert s["fp32_bytes"] == 4 * n_params
    wq = sum(l.params for l in quant)
    # scales float32 + 1-byte zero points: one per output channel of each quantized weight, one per activation group
    out_ch = sum(m.get_submodule(l.name).conv.out_channels for l in quant)
    qbytes = 5 * out_ch + 5 * len(placement.groups)
    assert s["quantizer_bytes"] == qbytes
    assert s["int8_storage_bytes"] == wq * 1 + 4 * (n_params - wq) + qbytes
    packed = sum(l.params * l.weight_bits / 8 for l in quant)
    assert s["sub_8_bit"] and s["onnx_storage_bytes"] == packed + 4 * (n_params - wq) + qbytes  # 4 bits: INT4
    assert s["weight_bits"] == [4, 8]
    uniform = model_sizes(_prepared())
    assert not uniform["sub_8_bit"] and "onnx_storage_bytes" not in uniform


def test_report_layer_errors_recomputed_and_files_written(tmp_path):
    m = _prepared(MIXED)
    torch.manual_seed(2)
    x = torch.rand(2, 3, 64, 64)
    report = build_report(m, x, performance={"fp32": {"map50": 0.5, "map50_95": 0.3}})
    rows = report["layer_errors"]
    assert [r["sqnr_cumulative_db"] for r in rows] == sorted(r["sqnr_cumulative_db"] for r in rows)  # worst first
    worst = rows[0]
    conv = m.get_submodule(worst["name"])
    outs = []
    h = conv.register_forward_hook(lambda mod, i, o: outs.append(o.double()))
    with torch.no_grad():
        for _, q in quantizers(m):
            q.enable_fake_quant(False)
        m(x)
        for _, q in quantizers(m):
            q.enable_fake_quant(True)
        m(x)
    h.remove()
    ref, q = outs
    sqnr = 10 * math.log10(float((ref ** 2).sum()) / float(((ref - q) ** 2).sum()))
    assert worst["sqnr_cumulative_db"] == pytest.approx(sqnr, abs=1e-9)
    assert worst["mse_cumulative"] == pytest.approx(float(((ref - q) ** 2).mean()), rel=1e-12)
    assert worst["weight_bits"] == next(l.weight_bits for l in m.qat_placement.layers if l.name == worst["name"])
    write_report(report, m, tmp_path / "analysis", tmp_path / "tb")
    md = (tmp_path / "analysis" / "report.md").read_text()
    assert "packed INT4" in md and "model.0 (mixed precision: kept float)" in md
    for png in ("quantization_ratio.png", "model_size.png", "layer_error.png", "map.png"):
        assert (tmp_path / "analysis" / png).stat().st_size > 1000
    back = json.loads((tmp_path / "analysis" / "report.json").read_text())
    assert back["sizes"]["fp32_bytes"] == report["sizes"]["fp32_bytes"]
    assert back["quantization_ratio"]["ratio_params"] == report["quantization_ratio"]["ratio_params"]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_cli_analyze_on_a_run_and_on_its_checkpoint(tiny_dataset, tmp_path):
    from src.cli import main

    run = tmp_path / "run"
    common = ["--data", str(tiny_dataset), "--img-size", "64", "--batch-size", "4", "--device", "cpu",
              "--workers", "0", "--log-dir", str(tmp_path / "logs"), "--export-dir", str(tmp_path / "none")]
    assert main(["--model", "yolov8n.yaml", "--epochs", "0", "--eval", "--analyze", "--save-dir", str(run),
                 *common]) == 0
    rep = json.loads((run / "analysis" / "report.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert rep["performance"]["ptq"]["map50_95"] == metrics["ptq"]["map50_95"]
    assert rep["performance"]["ptq"]["source"] == str(run / "metrics.json")  # reused, not re-validated
    assert rep["latency"] == []  # no exports: skipped
    # analysing the checkpoint alone (no training) gives the same static numbers
    run2 = tmp_path / "ckpt_only"
    run2.mkdir()
    (run2 / "m.pt").write_bytes((run / "quantized_model.pt").read_bytes())
    assert main(["--model", str(run2 / "m.pt"), "--analyze", *common]) == 0
    rep2 = json.loads((run2 / "analysis" / "report.json").read_text())
    assert rep2["sizes"] == rep["sizes"] and rep2["quantization_ratio"] == rep["quantization_ratio"]
    assert rep2["performance"]["ptq"]["map50_95"] == metrics["ptq"]["map50_95"]  # validated again: same model
