"""The train_qat.py pipeline: the stages of src/stages, run in order on one RunContext by :func:`run`."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from src.data.resolve import load_fp32_source
from src.models.yolov8_qat import FP32_METRICS_KEY

from src.stages.analyze import analyze_stage
from src.stages.calibrate import calibrate_stage
from src.stages.context import RunContext, RunRequest
from src.stages.device import leave_distributed
from src.stages.evaluate import evaluate_stage
from src.stages.export import export_stage
from src.stages.files import check_writable
from src.stages.mixed_precision import mixed_precision_stage
from src.stages.prepare import prepare_model, record_run
from src.stages.resolve import StartingPoint, resolve_resume, resolve_run, select_inference_head
from src.stages.train import save_model, train_stage

LOGGER = logging.getLogger("yolov8_qat")


def run(args, overrides: dict) -> dict:
    """Run the pipeline for parsed CLI ``args``; returns a summary dict (paths and metrics)."""
    request = RunRequest.from_args(args)
    check_output_dirs(request)
    if request.resume:
        return resume(request, overrides)
    ctx, start = resolve_run(request, overrides)
    if start.qat_model is not None and not ctx.train:
        return reuse_checkpoint(ctx, start)
    cfg = ctx.cfg
    mp = None
    if start.qat_model is not None:
        model = start.qat_model
    else:
        if cfg.qat_params.use_mixed_precision:
            mp = mixed_precision_stage(ctx, start.fp32_model)
        model = prepare_model(start.fp32_model, cfg, mp.bit_overrides if mp else None, announce=True)
    record_run(ctx, model, mp)
    if start.qat_model is None:
        calibrate_stage(ctx, model)
    # the PTQ baseline of the report, before training changes the model
    ptq_state = copy.deepcopy(model.state_dict()) \
        if start.qat_model is None and ctx.analyze and cfg.train_params.epochs > 0 else None
    stage = "ptq" if cfg.train_params.epochs == 0 else "qat"
    extra = {"fp32_source": ctx.fp32_source, FP32_METRICS_KEY: ctx.fp32_metrics, "stage": stage, "data": ctx.data_yaml}
    final = model
    if cfg.train_params.epochs > 0 or (cfg.qat_params.post_qat_fine_tuning and cfg.qat_params.fine_tuning_epochs):
        final = train_stage(ctx, model, extra, fp32_model=start.fp32_model)
    summary: dict = {}
    if leave_distributed(ctx.rank):  # DDP helpers stop here; the main process saves, evaluates and exports
        return summary
    out_path = save_model(ctx, final, extra, stage)
    summary["model"] = str(out_path)
    if ctx.eval:
        summary["metrics"] = evaluate_stage(ctx, final, start.fp32_model, stage)
        if mp and stage == "qat":
            mp.add_point("mixed (chosen)", mp.assignment, summary["metrics"][stage]["map50_95"], "qat")
            mp.write(ctx.run_dir)
    if ctx.export or ctx.validate_exports:
        summary["exports"] = export_stage(ctx, final, out_path)
    if ctx.analyze:
        analyze_stage(ctx, final, start.fp32_model, stage, ptq_state=ptq_state, mixed_precision=mp,
                      exports=summary.get("exports"))
    LOGGER.info(f"Results saved to {ctx.run_dir}")
    summary["run_dir"] = str(ctx.run_dir)
    return summary


def check_output_dirs(request: RunRequest) -> None:
    """Every folder the run may write to is writable, before any model or data work."""
    dirs = {"--save-dir": request.save_dir, "--log-dir": request.log_dir}
    if request.export or request.validate_exports:
        dirs["--export-dir"] = request.export_dir
    for flag, path in dirs.items():
        check_writable(Path(path), flag)


def reuse_checkpoint(ctx: RunContext, start: StartingPoint) -> dict:
    """Evaluate, export and/or analyse a QAT checkpoint as it is (no training)."""
    summary: dict = {}
    if ctx.eval:
        summary["metrics"] = evaluate_stage(ctx, start.qat_model, start.fp32_model, start.label)
    if ctx.export or ctx.validate_exports:
        summary["exports"] = export_stage(ctx, start.qat_model, start.checkpoint)
    if ctx.analyze:
        analyze_stage(ctx, start.qat_model, start.fp32_model, start.label, exports=summary.get("exports"))
    return summary


def resume(request: RunRequest, overrides: dict) -> dict:
    """Continue the unfinished run in --save-dir from weights/last.pt."""
    ctx, start = resolve_resume(request, overrides)
    final = train_stage(ctx, start.qat_model, start.extra, fp32_model=start.fp32_model,
                        resume_state=start.train_state)
    if leave_distributed(ctx.rank):
        return {}
    out = save_model(ctx, final, start.extra, "qat")
    summary = {"model": str(out), "run_dir": str(ctx.run_dir)}
    if ctx.eval:  # the FP32 row: loaded only now, so a moved source cannot cost the training
        fp32_model = load_fp32_source(ctx.fp32_source, ctx.cfg.model.variant, required=False,
                                      trusted=ctx.trust_checkpoint)
        select_inference_head(ctx.cfg, fp32_model)
        summary["metrics"] = evaluate_stage(ctx, final, fp32_model, "qat")
    return summary
