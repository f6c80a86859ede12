"""The --analyze report: <out>/analysis/report.md, report.json and PNG plots, mirrored to TensorBoard.

Sections: quantization ratio, model size (FP32, INT8 storage, and the QDQ ONNX's packed INT4 size below 8 bits), layer-wise
error (SQNR/MSE per layer, isolated and cumulative, worst first), the placement table, and performance (FP32 / PTQ /
QAT mAP when a dataset is given; latency of exported models when exports exist).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from src.analysis import plots
from src.analysis.layer_error import layer_errors
from src.analysis.model_stats import model_sizes, quantization_ratio
from src.training.data import build_loader, hyperparameters, preprocess_batch

LOGGER = logging.getLogger("yolov8_qat")

ONNX_STORAGE = ("the QDQ ONNX export's size: weights of <= 4 bits packed INT4 (two per byte), 5-8 bits int8; "
                "OpenVINO (whose CPU plugin runs INT4-weight convs in bf16) and TFLite store every quantized weight "
                "as int8, i.e. the INT8 storage size")


def analysis_images(data: dict, cfg, n: int = 8) -> torch.Tensor:
    """``n`` validation images (letterboxed, [0, 1]) at ``train_params.img_size`` for the layer-wise error."""
    loader = build_loader(hyperparameters(cfg, mode="val"), data, "val", n, mode="val", shuffle=False, workers=0)
    batch = next(iter(loader))
    return preprocess_batch(batch, torch.device("cpu"))["img"][:n]


def _json_safe(v):
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def build_report(model: nn.Module, images: torch.Tensor, *, performance: dict | None = None,
                 latency: list[dict] | None = None, mixed_precision: dict | None = None) -> dict:
    """Every number of the report as plain data (see the module docstring)."""
    ratio = quantization_ratio(model)
    sizes = model_sizes(model)
    p = next(model.parameters())
    errors = layer_errors(model, images.to(p.device, p.dtype))
    bits = {l.name: l.weight_bits for l in model.qat_placement.layers}
    rows = [{"name": e.name, "weight_bits": bits.get(e.name), "sqnr_isolated_db": e.sqnr_isolated_db,
             "mse_isolated": e.mse_isolated, "sqnr_cumulative_db": e.sqnr_cumulative_db,
             "mse_cumulative": e.mse_cumulative} for e in errors]
    rows.sort(key=lambda r: (r["sqnr_cumulative_db"], r["sqnr_isolated_db"]))  # worst first
    report = {"quantization_ratio": ratio, "sizes": sizes, "layer_errors": rows, "layer_error_images":
              int(images.shape[0]), "placement": model.qat_placement.to_dict(),
              "bit_overrides": model.qat_placement.bit_overrides,
              "performance": performance or {}, "latency": latency or []}
    if sizes["sub_8_bit"]:
        report["sizes"]["note"] = ONNX_STORAGE
    if mixed_precision:
        report["mixed_precision"] = mixed_precision
    return report


def _mb(b: float) -> str:
    return f"{b / 1e6:.3f} MB"


def to_markdown(report: dict, placement_text: str) -> str:
    r, s = report["quantization_ratio"], report["sizes"]
    lines = ["# Quantization analysis", "", "## Quantization ratio", "",
             f"- layers: {r['layers_quantized']}/{r['layers_total']} conv/linear layers quantized "
             f"({100 * r['ratio_layers']:.1f}%)",
             f"- parameters: {r['weight_params_quantized']}/{r['weight_params_total']} weights quantized "
             f"({100 * r['ratio_params']:.2f}%)"]
    if r["float_layers"]:
        lines += ["- kept float: " + ", ".join(f"{f['name']} ({f['reason']})" for f in r["float_layers"])]
    lines += ["", "## Model size", "", "| model | size | vs FP32 |", "|---|---:|---:|",
              f"| FP32 | {_mb(s['fp32_bytes'])} | 1.000 |",
              f"| INT8 storage (as exported) | {_mb(s['int8_storage_bytes'])} | "
              f"{s['int8_storage_bytes'] / s['fp32_bytes']:.3f} |"]
    if "onnx_storage_bytes" in s:
        lines.append(f"| QDQ ONNX (<= 4-bit weights packed INT4) | {_mb(s['onnx_storage_bytes'])} | "
                     f"{s['onnx_storage_bytes'] / s['fp32_bytes']:.3f} |")
        lines += ["", f"QDQ ONNX is {ONNX_STORAGE}."]
    lines += ["", f"Weights + biases ({s['params']} parameters) and quantizer parameters ({s['quantizer_bytes']} "
              f"bytes); weight widths present: {s['weight_bits']}.", "",
              "## Layer-wise error (worst cumulative SQNR first)", "",
              f"On {report['layer_error_images']} validation images. Isolated: only this layer's weight and input "
              "quantizers on. Cumulative: the whole model quantized.", "",
              "| layer | w bits | SQNR isolated (dB) | MSE isolated | SQNR cumulative (dB) | MSE cumulative |",
              "|---|---:|---:|---:|---:|---:|"]
    for e in report["layer_errors"]:
        lines.append(f"| {e['name']} | {e['weight_bits'] or '-'} | {e['sqnr_isolated_db']:.2f} | "
                     f"{e['mse_isolated']:.3e} | {e['sqnr_cumulative_db']:.2f} | {e['mse_cumulative']:.3e} |")
    lines += ["", "## Placement", "", "```", placement_text, "```", "", "## Performance", ""]
    perf = report["performance"]
    if perf:
        lines += ["| model | mAP50 | mAP50-95 | source |", "|---|---:|---:|---|"]
        for k, v in perf.items():
            lines.append(f"| {k} | {v['map50']:.4f} | {v['map50_95']:.4f} | {v.get('source', '')} |")
    else:
        lines.append("No dataset given: accuracy not measured.")
    lat = [l for l in report["latency"] if "median_ms" in l]
    if lat:
        lines += ["", "| export | format | variant | threads | median ms | IQR ms | size MB |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for l in lat:
            lines.append(f"| {l['path']} | {l['format']} | {l['variant']} | {l['threads']} | {l['median_ms']:.2f} | "
                         f"{l['iqr_ms']:.2f} | {l['size_mb']:.3f} |")
    else:
        lines += ["", "No exported models found: latency skipped."]
    mp = report.get("mixed_precision")
    if mp:
        a = mp["assignment"]
        lines += ["", "## Mixed precision", "",
                  f"Budget {mp['budget_type']} = {mp['budget']}; average weight bits {a['avg_bits']:.3f}, "
                  f"{100 * a['weight_memory_vs_int8']:.1f}% of INT8 weight memory ({mp['note']}). "
                  f"Float-kept: {', '.join(a['float_layers']) or 'none'}. See mixed_precision/ for the sensitivity "
                  "table and the Pareto plot."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, model: nn.Module, out_dir: Path, log_dir: Path | None = None) -> Path:
    """report.json, report.md and the PNGs in ``out_dir``; scalars and the markdown to TensorBoard in ``log_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    md = to_markdown(report, model.qat_placement.report())
    (out_dir / "report.md").write_text(md)
    r, s = report["quantization_ratio"], report["sizes"]
    plots.ratio_plot(r["ratio_layers"], r["ratio_params"], out_dir / "quantization_ratio.png")
    sizes = {"FP32": s["fp32_bytes"] / 1e6, "INT8 storage": s["int8_storage_bytes"] / 1e6}
    if "onnx_storage_bytes" in s:
        sizes["QDQ ONNX (INT4 packed)"] = s["onnx_storage_bytes"] / 1e6
    plots.size_plot(sizes, out_dir / "model_size.png")
    if report["layer_errors"]:
        plots.layer_error_plot(report["layer_errors"], out_dir / "layer_error.png")
    if report["performance"]:
        plots.map_plot(report["performance"], out_dir / "map.png")
    if log_dir is not None:
        _tensorboard(report, md, Path(log_dir))
    LOGGER.info(f"Analysis written to {out_dir / 'report.md'}")
    return out_dir / "report.md"


def _tensorboard(report: dict, md: str, log_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter  # deferred: heavy optional dependency (tensorboard)

    w = SummaryWriter(str(log_dir))
    try:
        r, s = report["quantization_ratio"], report["sizes"]
        w.add_scalar("analysis/ratio_layers", r["ratio_layers"], 0)
        w.add_scalar("analysis/ratio_params", r["ratio_params"], 0)
        w.add_scalar("analysis/size_fp32_mb", s["fp32_bytes"] / 1e6, 0)
        w.add_scalar("analysis/size_int8_storage_mb", s["int8_storage_bytes"] / 1e6, 0)
        if "onnx_storage_bytes" in s:
            w.add_scalar("analysis/size_onnx_storage_mb", s["onnx_storage_bytes"] / 1e6, 0)
        for k, v in report["performance"].items():
            w.add_scalar(f"analysis/map50_95/{k}", v["map50_95"], 0)
            w.add_scalar(f"analysis/map50/{k}", v["map50"], 0)
        order = {l["name"]: i for i, l in enumerate(report["placement"]["layers"])}
        for e in sorted(report["layer_errors"], key=lambda e: order.get(e["name"], 0)):
            step = order.get(e["name"], 0)
            for key in ("sqnr_isolated_db", "sqnr_cumulative_db"):
                if math.isfinite(e[key]):
                    w.add_scalar(f"analysis/{key}", e[key], step)
        w.add_text("analysis/report", md, 0)
    finally:
        w.close()
