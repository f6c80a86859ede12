"""Evaluate: mAP of the FP32 source (when known) and the quantized model, written to metrics.json."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from src.models.yolov8_qat import FP32_METRICS_KEY, fp32_metrics_record
from src.stages.context import RunContext
from src.stages.files import write_json
from src.training.checkpoint import atomic_save, load_checkpoint_file
from src.training.evaluate import evaluate

LOGGER = logging.getLogger("yolov8_qat")


def evaluate_stage(ctx: RunContext, model: nn.Module, fp32_model: nn.Module | None, label: str) -> dict:
    """Validate both models, write ``ctx.run_dir/metrics.json`` and log a table; returns ``{label: metrics}``.

    Without ``fp32_model`` the FP32 row is the mAP stored in the QAT checkpoint (``ctx.fp32_metrics``), or absent;
    a note says which. A run that saved a checkpoint stores its FP32 mAP there, so the checkpoint carries the row on.
    """
    tp = ctx.cfg.train_params
    results = {}
    note = None
    if fp32_model is not None:
        results["fp32"] = evaluate(fp32_model, ctx.data_yaml, imgsz=tp.img_size, batch=tp.batch_size,
                                   device=ctx.device)
        if ctx.train:
            record_fp32_metrics(ctx.run_dir / ctx.output, fp32_metrics_record(results["fp32"], tp.img_size,
                                                                               ctx.data_yaml))
    elif ctx.fp32_metrics:
        stored = ctx.fp32_metrics
        results["fp32"] = {**stored, "source": "stored in the QAT checkpoint"}
        note = (f"fp32: stored in the QAT checkpoint (measured at {stored['imgsz']} px on {stored['data']}), "
                f"as its FP32 source {ctx.fp32_source or '(not recorded)'} is not at hand")
    else:
        note = (f"fp32: skipped; the FP32 source {ctx.fp32_source or '(not recorded)'} is not at hand and the QAT "
                "checkpoint stores no FP32 mAP (it predates them, or its run did not --eval)")
    results[label] = evaluate(model, ctx.data_yaml, imgsz=tp.img_size, batch=tp.batch_size, device=ctx.device)
    path = write_json(results, ctx.run_dir / "metrics.json")
    LOGGER.info(f"\n{'model':<8} {'mAP50':>8} {'mAP50-95':>9}")
    for k, v in results.items():
        LOGGER.info(f"{k:<8} {v['map50']:>8.4f} {v['map50_95']:>9.4f}")
    if note:
        LOGGER.info(note)
    LOGGER.info(f"Metrics written to {path}")
    return results


def record_fp32_metrics(checkpoint: Path, record: dict) -> None:
    """Store the FP32 mAP in the run's saved checkpoint, so a later --eval has the row without the source file."""
    ckpt = load_checkpoint_file(checkpoint)
    ckpt[FP32_METRICS_KEY] = record
    atomic_save(ckpt, checkpoint)
