"""Evaluate: mAP of the FP32 source (when known) and the quantized model, written to metrics.json."""

from __future__ import annotations

import logging

from torch import nn

from src.stages.context import RunContext
from src.stages.files import write_json
from src.training.evaluate import evaluate

LOGGER = logging.getLogger("yolov8_qat")


def evaluate_stage(ctx: RunContext, model: nn.Module, fp32_model: nn.Module | None, label: str) -> dict:
    """Validate both models, write ``ctx.run_dir/metrics.json`` and log a table; returns ``{label: metrics}``."""
    tp = ctx.cfg.train_params
    results = {}
    if fp32_model is not None:
        results["fp32"] = evaluate(fp32_model, ctx.data_yaml, imgsz=tp.img_size, batch=tp.batch_size,
                                   device=ctx.device)
    results[label] = evaluate(model, ctx.data_yaml, imgsz=tp.img_size, batch=tp.batch_size, device=ctx.device)
    path = write_json(results, ctx.run_dir / "metrics.json")
    LOGGER.info(f"\n{'model':<8} {'mAP50':>8} {'mAP50-95':>9}")
    for k, v in results.items():
        LOGGER.info(f"{k:<8} {v['map50']:>8.4f} {v['map50_95']:>9.4f}")
    LOGGER.info(f"Metrics written to {path}")
    return results
