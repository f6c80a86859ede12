"""Prepare: a fake-quantized copy of the float model, and the run folder's record of its placement."""

from __future__ import annotations

import copy
import logging
import time

from torch import nn

from src.analysis.mixed_precision_report import MixedPrecisionResult
from src.models.yolov8_qat import prepare_qat_model
from src.stages.context import RunContext
from src.stages.files import write_json

LOGGER = logging.getLogger("yolov8_qat")


def prepare_model(fp32_model: nn.Module, cfg, bit_overrides: dict | None, *, announce: bool = False) -> nn.Module:
    """A deep copy of ``fp32_model`` with fake quantizers placed by ``cfg`` and ``bit_overrides`` (mixed precision).

    Args:
        announce: Log the placement summary (the run's own model, not the scratch copies of measurements).
    """
    model = copy.deepcopy(fp32_model)
    t0 = time.time()
    placement = prepare_qat_model(model, cfg, bit_overrides=bit_overrides)
    if announce:
        LOGGER.info(f"Prepared model in {time.time() - t0:.1f}s: "
                    f"{sum(l.quantized for l in placement.layers)}/{len(placement.layers)} convs quantized, "
                    f"{len(placement.groups)} activation quantizers")
    return model


def record_run(ctx: RunContext, model: nn.Module, mixed_precision: MixedPrecisionResult | None) -> None:
    """config.yaml, placement.txt/json and the mixed-precision folder in the run directory."""
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    ctx.cfg.save_yaml(ctx.run_dir / "config.yaml")
    (ctx.run_dir / "placement.txt").write_text(model.qat_placement.report() + "\n")
    write_json(model.qat_placement.to_dict(), ctx.run_dir / "placement.json")
    LOGGER.debug(model.qat_placement.report())
    if mixed_precision:
        mixed_precision.write(ctx.run_dir)
