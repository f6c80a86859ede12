"""Resolve: the run's config, data, device and run folder, and the models it starts from, each loaded once."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from src.config import load_config
from src.data.resolve import (ResolvedModel, load_fp32_model, load_fp32_source, require_detection, resolve_data,
                              resolve_model_path)
from src.errors import ConfigError, QATError
from src.integrations.ultralytics import model_task, select_end2end
from src.models.yolov8_qat import FP32_METRICS_KEY, build_from_checkpoint, same_architecture, stored_fp32_metrics
from src.stages.context import RunContext, RunRequest
from src.stages.device import init_distributed, select_device
from src.stages.train import check_teacher
from src.training.checkpoint import load_checkpoint_file
from src.training.data import check_split, hyperparameters, seed_everything

LOGGER = logging.getLogger("yolov8_qat")

DEFAULT_DATA = "coco.yaml"
# settings a resumed run may change (e.g. a smaller batch after running out of memory); the recipe itself stays
RESUME_OVERRIDES = ("train_params.batch_size", "train_params.img_size", "train_params.workers", "train_params.device")


@dataclass(frozen=True)
class StartingPoint:
    """The models a run starts from.

    Attributes:
        fp32_model: The float model (QAT starts from it; FP32 mAP and the PTQ baseline use it), None when unknown.
        qat_model: The model of a QAT checkpoint given as --model or resumed; None when QAT starts from fp32_model.
        checkpoint: That checkpoint's file.
        label: That checkpoint's stage ("ptq" or "qat").
        extra: Entries a resumed run's checkpoints carry on (fp32_source, fp32_metrics, stage, data,
            distill_adapters).
        train_state: The trainer state a resumed run continues from.
    """

    fp32_model: nn.Module | None
    qat_model: nn.Module | None = None
    checkpoint: Path | None = None
    label: str = "qat"
    extra: dict = field(default_factory=dict)
    train_state: dict | None = None


def next_run_dir(save_dir: Path, output: str, exist_ok: bool) -> Path:
    """``save_dir`` itself, or a numbered sibling (qat2, qat3, ...) when it already holds a finished run."""
    def finished(d: Path) -> bool:
        return (d / output).exists() or (d / "weights" / "last.pt").exists()

    if exist_ok or not finished(save_dir):
        return save_dir
    n = 2
    while finished(save_dir.with_name(f"{save_dir.name}{n}")):
        n += 1
    new = save_dir.with_name(f"{save_dir.name}{n}")
    LOGGER.info(f"{save_dir} holds a finished run; writing to {new} (pass --exist-ok to reuse it)")
    return new


def data_report(cfg, data: dict, *, train: bool, val: bool) -> dict:
    """Check the splits this run reads before any model work; count what Ultralytics would drop."""
    hyp = hyperparameters(cfg, mode="val")
    report = {}
    for split, needed in (("train", train), ("val", val)):
        if needed:
            report[split] = check_split(hyp, data, split)
    return report


def check_classes(model: nn.Module, data: dict, model_desc: str) -> None:
    """The model predicts the dataset's number of classes (QAT does not re-train a head)."""
    nc_model = int(model.yaml.get("nc", len(getattr(model, "names", {}) or {})))
    if nc_model != int(data["nc"]):
        raise QATError(
            f"{model_desc} predicts {nc_model} classes but {data.get('yaml_file', 'the data YAML')} has {data['nc']}: "
            "QAT starts from a model trained on the dataset's classes. Fine-tune it in FP32 first, e.g. "
            f"`yolo train model={model_desc} data=<your data.yaml>`, then quantize the result."
        )


def resolve_run(request: RunRequest, overrides: dict) -> tuple[RunContext, StartingPoint]:
    """Config, data, device and models of a new run (from a float model or a QAT checkpoint).

    Args:
        request: The command line's choices.
        overrides: Dotted config keys set on the command line.
    """
    cfg = load_config(request.config, overrides, qconfig=request.qconfig)
    resolved = resolve_model_path(request.model, cfg.model.variant)
    is_qat = resolved.kind == "qat_checkpoint"
    seed_everything(cfg.train_params.seed)  # model init (YAML), calibration sampling and training all follow it
    train = (not is_qat) or request.epochs is not None
    if train:
        check_teacher(cfg)
    needs_data = train or request.eval or request.validate_exports or request.analyze or request.data is not None
    data_yaml = request.data or DEFAULT_DATA
    # training, calibrating an export and the analysis' PTQ baseline read training images; evaluation only val
    reads_train = train or request.export or request.validate_exports or request.analyze
    data = resolve_data(data_yaml, ("train", "val", "test") if reads_train else ("val", "test")) \
        if needs_data else None
    device = select_device(request.device, cfg.train_params.device)
    rank = init_distributed(device)
    if data is not None:
        data_report(cfg, data, train=train, val=request.eval or request.validate_exports)
    fp32_metrics = None
    if is_qat:
        start, fp32_source, fp32_metrics = _from_qat_checkpoint(resolved, cfg, request, data, train)
    else:
        fp32_model = load_fp32_model(resolved, nc=data["nc"] if resolved.kind == "yaml" else None,
                                     trusted=request.trust_checkpoint)
        fp32_source = str(resolved.path) if resolved.kind == "checkpoint" else None
        check_classes(fp32_model, data, str(resolved.path))
        start = StartingPoint(fp32_model)
    # a QAT checkpoint only evaluated or exported keeps its outputs beside it unless --save-dir names a folder
    # (exports under --export-dir)
    run_dir = next_run_dir(Path(request.save_dir), request.output, request.exist_ok) if train else \
        Path(request.save_dir if request.save_dir_given else resolved.path.parent)
    ctx = RunContext(cfg, data, data_yaml, device, rank, run_dir, Path(request.export_dir), Path(request.log_dir),
                     request.output, fp32_source, train, request.eval, request.export, request.validate_exports,
                     request.analyze, trust_checkpoint=request.trust_checkpoint, fp32_metrics=fp32_metrics)
    select_inference_head(cfg, start.fp32_model, start.qat_model)
    return ctx, start


def select_inference_head(cfg, *models: nn.Module | None) -> None:
    """Give every model the inference branch ``export.end2end`` names (evaluation and export read the same one).

    Raises:
        ConfigError: ``export.end2end`` is true but the model has no end-to-end head.
    """
    for m in models:
        if m is not None and not select_end2end(m, cfg.export.end2end) and cfg.export.end2end:
            raise ConfigError("export.end2end: true, but the model has no end-to-end (one-to-one) head; it exists "
                              "on YOLO26-style models. Set export.end2end: false")


def _from_qat_checkpoint(resolved: ResolvedModel, cfg, request: RunRequest, data: dict | None,
                         train: bool) -> tuple[StartingPoint, str | None, dict | None]:
    """The checkpoint's model, its quantization adopted into ``cfg``, its float source when this run uses it and is
    at hand, the source's recorded path and its stored mAP."""
    ckpt = load_checkpoint_file(resolved.path)
    model, stored = build_from_checkpoint(ckpt)
    require_detection(model_task(model), f"QAT checkpoint {resolved.path}")
    # the checkpoint's quantization (placement, ranges) is kept; training settings come from this run
    cfg.quantization, cfg.layer_configs, cfg.mixed_precision = (stored.quantization, stored.layer_configs,
                                                                stored.mixed_precision)
    cfg.qat_params.fuse_modules = stored.qat_params.fuse_modules
    cfg.qat_params.skip_detection_head = stored.qat_params.skip_detection_head
    cfg.qat_params.freeze_observers_epoch = 0  # fine-tuning keeps the learned ranges fixed
    cfg.qat_params.freeze_bn_epoch = 0
    if request.img_size is None:  # evaluate/export/fine-tune at the size the checkpoint was trained at
        cfg.train_params.img_size = stored.train_params.img_size
    if request.qconfig:
        LOGGER.warning("--qconfig is ignored for a QAT checkpoint: its placement and quantizers are kept")
    fp32_source = ckpt.get("fp32_source")
    LOGGER.info(f"Loaded QAT checkpoint {resolved.path}")
    if data is not None:
        check_classes(model, data, str(resolved.path))
    # training, --eval (the FP32 row) and --analyze use the source when it is at hand; the stored mAP stands in
    fp32_model = _checkpoint_fp32(ckpt, resolved.path, cfg.model.variant, request.trust_checkpoint) \
        if train or request.eval or request.analyze else None
    if train and cfg.qat_params.use_mixed_precision:
        LOGGER.warning("--mixed-precision is ignored when fine-tuning a QAT checkpoint: its bit widths are kept")
    start = StartingPoint(fp32_model, model, Path(resolved.path), ckpt.get("stage", "qat"))
    return start, fp32_source, stored_fp32_metrics(ckpt)


def _checkpoint_fp32(ckpt: dict, path: Path, variant: str, trusted: bool) -> nn.Module | None:
    """The FP32 source a QAT checkpoint names, loaded like --model; None when it is gone or no longer that model."""
    source = ckpt.get("fp32_source")
    fp32_model = load_fp32_source(source, variant, required=False, trusted=trusted)
    if source and fp32_model is None:
        LOGGER.info(f"The FP32 source {source} of {path} is not at hand; continuing without it")
    elif fp32_model is not None and not same_architecture(fp32_model, ckpt):
        LOGGER.warning(f"{source} is no longer the FP32 model {path} was quantized from (its architecture differs); "
                       "continuing without it")
        return None
    return fp32_model


def resolve_resume(request: RunRequest, overrides: dict) -> tuple[RunContext, StartingPoint]:
    """Config, data, device and model of the unfinished run in --save-dir (from its weights/last.pt)."""
    run_dir = Path(request.save_dir)
    last = run_dir / "weights" / "last.pt"
    if not last.exists():
        raise QATError(f"--resume: no {last} to resume from; start a new run without --resume")
    ckpt = load_checkpoint_file(last)
    st = ckpt.get("train_state")
    if not st:
        raise QATError(f"--resume: {last} holds no training state")
    model, cfg = build_from_checkpoint(ckpt)
    require_detection(model_task(model), f"--resume checkpoint {last}")
    for key in RESUME_OVERRIDES:
        if key in overrides:
            setattr(cfg.train_params, key.split(".")[1], overrides[key])
    total = cfg.train_params.epochs + (cfg.qat_params.fine_tuning_epochs if cfg.qat_params.post_qat_fine_tuning else 0)
    if int(st["epoch"]) >= total:
        raise QATError(f"--resume: the run in {run_dir} already finished all {total} epochs; nothing to resume")
    data_yaml = request.data or ckpt.get("data") or DEFAULT_DATA
    data = resolve_data(data_yaml)
    device = select_device(request.device, cfg.train_params.device)
    rank = init_distributed(device)
    LOGGER.info(f"Resuming {run_dir} from epoch {int(st['epoch']) + 1}/{total}")
    extra = {k: ckpt[k] for k in ("fp32_source", FP32_METRICS_KEY, "stage", "data", "distill_adapters") if k in ckpt}
    ctx = RunContext(cfg, data, data_yaml, device, rank, run_dir, Path(request.export_dir), Path(request.log_dir),
                     request.output, extra.get("fp32_source"), True, request.eval, request.export,
                     request.validate_exports, request.analyze, trust_checkpoint=request.trust_checkpoint,
                     fp32_metrics=stored_fp32_metrics(ckpt))
    select_inference_head(cfg, model)
    return ctx, StartingPoint(None, model, last, "qat", extra, st)
