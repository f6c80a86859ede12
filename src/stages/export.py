"""Export: every ``export.formats`` file under --export-dir, gated by validation with --validate-exports."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from src.data.resolve import resolve_data
from src.errors import DataError
from src.export.common import CalibrationImages
from src.export.pipeline import export_and_validate
from src.stages.calibrate import TrainingImages
from src.stages.context import RunContext
from src.stages.validate import validation_gate
from src.training.checkpoint import load_checkpoint_file
from src.training.data import loader_stride

LOGGER = logging.getLogger("yolov8_qat")


def export_stage(ctx: RunContext, model: nn.Module, checkpoint: Path) -> dict:
    """Export ``model`` (saved as ``checkpoint``); returns ``{format: [paths]}``."""
    res = export_and_validate(model, ctx.cfg, ctx.export_dir, Path(ctx.output).stem,
                              data=ctx.data_yaml if ctx.data is not None else None, checkpoint=checkpoint,
                              validate=ctx.validate_exports, device=str(ctx.device),
                              calibration=lambda: export_calibration(ctx, model, checkpoint))
    if res["validation"] is not None:
        validation_gate(ctx.export_dir, res["validation"])
    return {k: [str(p) for p in v] for k, v in res["exports"].items()}


def export_calibration(ctx: RunContext, model: nn.Module, checkpoint: Path) -> CalibrationImages | None:
    """The images an export calibrates its own ranges on: the model's training data, as the QAT calibration sees it.

    The run's data (--data), else the data YAML recorded in ``checkpoint``; None when there is neither. Unaugmented
    training images in the QAT calibration's order, letterboxed to ``train_params.img_size`` (the export size).
    """
    data_yaml, data = (ctx.data_yaml, ctx.data) if ctx.data is not None else _recorded_data(checkpoint)
    if data is None:
        return None
    return CalibrationImages(str(data_yaml), TrainingImages(ctx.cfg, data, torch.device("cpu"), loader_stride(model)))


def _recorded_data(checkpoint: Path) -> tuple[str | None, dict | None]:
    """The data YAML a QAT checkpoint recorded (``ckpt["data"]``) and its checked dict; Nones when it is unusable."""
    recorded = load_checkpoint_file(checkpoint).get("data")
    if not recorded:
        return None, None
    try:
        return recorded, resolve_data(recorded)
    except DataError as e:
        LOGGER.warning(f"{checkpoint} was trained on {recorded}, which cannot be read now ({e}); pass "
                       "--data <data.yaml> to calibrate the export on it")
        return None, None
