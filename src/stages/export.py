"""Export: every ``export.formats`` file under --export-dir, gated by validation with --validate-exports."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from src.export.pipeline import export_and_validate
from src.stages.context import RunContext
from src.stages.validate import validation_gate

LOGGER = logging.getLogger("yolov8_qat")


def export_stage(ctx: RunContext, model: nn.Module, checkpoint: Path) -> dict:
    """Export ``model`` (saved as ``checkpoint``); returns ``{format: [paths]}``."""
    res = export_and_validate(model, ctx.cfg, ctx.export_dir, Path(ctx.output).stem,
                              data=ctx.data_yaml if ctx.data is not None else None, checkpoint=checkpoint,
                              validate=ctx.validate_exports, device=str(ctx.device))
    for fmt, paths in res["exports"].items():
        LOGGER.info(f"Exported {fmt}: {paths[0]}")
    if res["validation"] is not None:
        validation_gate(ctx.export_dir, res["validation"])
    return {k: [str(p) for p in v] for k, v in res["exports"].items()}
