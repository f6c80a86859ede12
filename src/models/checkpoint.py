"""QAT checkpoints: tensors and plain data only (they load with torch.load(weights_only=True)), rebuilt exactly."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from src.config import QATConfig
from src.errors import QATError
from src.integrations.ultralytics import match_cls_branch_widths, model_task, task_model_class
from src.models.placement import Placement, plain_data
from src.models.prepare import prepare_qat_model
from src.models.switches import is_qat_model

QAT_CHECKPOINT_KEY = "yolov8_qat"
QAT_FORMAT_VERSION = 1
# The FP32 source's mAP as plain data ({"map50", "map50_95", "imgsz", "data"}), stored once a run has evaluated it:
# the FP32 row of a later --eval when the file ``fp32_source`` names is not at hand. Older checkpoints lack it.
FP32_METRICS_KEY = "fp32_metrics"
# ``model_yaml`` keys that fix the architecture (QAT keeps the FP32 model's YAML; the rest is bookkeeping)
ARCHITECTURE_KEYS = ("nc", "scale", "depth_multiple", "width_multiple", "backbone", "head")


def qat_checkpoint(model: nn.Module, cfg, *, extra: dict | None = None, state_dict: dict | None = None) -> dict:
    """The self-describing QAT checkpoint dict for ``model``.

    Holds float weights and quantizer state as tensors, and the model YAML (the FP32 source's architecture), class
    names, placement and resolved config as plain data, so ``build_from_checkpoint`` rebuilds the exact model without
    unpickling any class. ``extra`` adds the run's entries (``fp32_source``, ``FP32_METRICS_KEY``, stage, data).
    """
    if not is_qat_model(model):
        raise QATError("model is not prepared for QAT; call prepare_qat_model first")
    placement: Placement = model.qat_placement
    sd = state_dict if state_dict is not None else model.state_dict()
    ckpt = {
        QAT_CHECKPOINT_KEY: {"format_version": QAT_FORMAT_VERSION},
        "model_yaml": plain_data(model.yaml),
        "names": plain_data(dict(model.names)),
        "nc": int(model.yaml.get("nc", len(model.names))),
        "stride": [float(s) for s in model.stride],
        "config": cfg.to_dict(),
        "placement": placement.to_dict(),
        "bit_overrides": plain_data(placement.bit_overrides),  # also beside the placement, where older readers look
        "state_dict": {k: v.detach().clone().cpu() for k, v in sd.items()},
    }
    if extra:
        ckpt.update(extra)
    return ckpt


def build_from_checkpoint(ckpt: dict, cfg=None) -> tuple[nn.Module, Any]:
    """Rebuild the fake-quantized model stored by :func:`qat_checkpoint` (bit-identical outputs).

    Args:
        ckpt: The loaded checkpoint dict.
        cfg: Config to use instead of the stored one (the placement always comes from the checkpoint).

    Returns:
        (model, cfg)
    """
    if QAT_CHECKPOINT_KEY not in ckpt:
        raise QATError("not a yolov8_qat checkpoint")
    version = ckpt[QAT_CHECKPOINT_KEY].get("format_version")
    if version != QAT_FORMAT_VERSION:
        raise QATError(f"unsupported QAT checkpoint format {version}; this toolkit reads {QAT_FORMAT_VERSION}")
    stored_cfg = QATConfig.from_dict(ckpt["config"])
    cfg = cfg or stored_cfg
    placement = Placement.from_dict(ckpt["placement"])
    yaml_cfg = copy.deepcopy(ckpt["model_yaml"])
    model = task_model_class(model_task(yaml_cfg))(yaml_cfg, nc=ckpt["nc"], verbose=False)
    # a model fine-tuned from another class count keeps its source's class-branch width (Ultralytics 8.4)
    match_cls_branch_widths(model, ckpt["state_dict"])
    model.names = {int(k): v for k, v in ckpt["names"].items()}
    # checkpoints written before the placement carried its overrides hold them only beside it
    overrides = placement.bit_overrides or ckpt.get("bit_overrides") or {}
    # placement structure (what is quantized and how) always follows the checkpoint
    pcfg = copy.deepcopy(stored_cfg)
    prepare_qat_model(model, pcfg, fuse=placement.fused, skip_detection_head=placement.skip_detection_head,
                      bit_overrides=overrides)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise QATError(
            f"checkpoint does not match the rebuilt model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "was it written by another version of this toolkit?"
        )
    return model, cfg


def fp32_metrics_record(metrics: dict, imgsz: int, data: str) -> dict:
    """The ``FP32_METRICS_KEY`` entry for the FP32 model's evaluation ``metrics`` at ``imgsz`` on ``data``."""
    return {"map50": float(metrics["map50"]), "map50_95": float(metrics["map50_95"]), "imgsz": int(imgsz),
            "data": str(data)}


def stored_fp32_metrics(ckpt: dict) -> dict | None:
    """The FP32 source's mAP a checkpoint carries; None when it predates them or its run never evaluated the source."""
    record = ckpt.get(FP32_METRICS_KEY)
    return dict(record) if isinstance(record, dict) and "map50_95" in record else None


def same_architecture(fp32_model: nn.Module, ckpt: dict) -> bool:
    """Whether ``fp32_model`` has the architecture the checkpoint was quantized from (a file at the recorded path
    may since have been replaced)."""
    ours, stored = plain_data(fp32_model.yaml), ckpt["model_yaml"]
    return all(ours.get(k) == stored.get(k) for k in ARCHITECTURE_KEYS)
