"""Analyze (--analyze): the report under ``<run>/analysis`` -- FP32 / PTQ / QAT mAP, sizes, layer errors, latency."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from src.analysis.mixed_precision_report import MixedPrecisionResult
from src.analysis.performance import collect_map, export_latency
from src.analysis.report import analysis_images, build_report, write_report
from src.errors import QATError
from src.stages.calibrate import ptq_baseline
from src.stages.context import RunContext


def analyze_stage(ctx: RunContext, model: nn.Module, fp32_model: nn.Module | None, label: str, *,
                  ptq_state: dict | None = None, mixed_precision: MixedPrecisionResult | None = None,
                  exports: dict[str, list[str]] | None = None) -> dict:
    """Gather accuracy and latency, build the report and write it; returns the report's data.

    Args:
        model: The quantized model (the run's final model or a loaded QAT checkpoint).
        fp32_model: The float source (FP32 mAP; and the PTQ baseline when there is no ``ptq_state``).
        label: Stage of ``model`` ("qat" or "ptq"; a "ptq" model is its own PTQ baseline).
        ptq_state: State dict of this run's calibrated, untrained model, when the run kept it.
        mixed_precision: This run's mixed-precision result.
        exports: This run's exports (``{format: [paths]}``, the first path of each the one timed); None: it made
            none, so no latency is reported (exports of other runs may share --export-dir).

    Raises:
        QATError: No dataset (the layer-wise error needs images).
    """
    if ctx.data is None:
        raise QATError("--analyze needs images for the layer-wise error; pass --data <data.yaml>")
    cfg = ctx.cfg
    if label == "ptq":
        ptq_model = model
    elif ptq_state is not None:
        ptq_model = copy.deepcopy(model)
        ptq_model.load_state_dict(ptq_state)
    else:
        ptq_model = None
    images = analysis_images(ctx.data, cfg)
    if ptq_model is None and fp32_model is not None:
        ptq_model = ptq_baseline(ctx, fp32_model, model.qat_placement.bit_overrides)
    models = {"fp32": fp32_model, "ptq": ptq_model, label: model}
    performance = collect_map(ctx.run_dir, models, ctx.data_yaml, cfg, ctx.device)
    latency = export_latency([Path(paths[0]) for paths in (exports or {}).values() if paths],
                             cfg.train_params.img_size)
    report = build_report(model, images, performance=performance, latency=latency,
                          mixed_precision=mixed_precision.to_dict() if mixed_precision else None)
    write_report(report, model, ctx.run_dir / "analysis", ctx.tensorboard_dir)
    return report
