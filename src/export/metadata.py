"""Export metadata: what Ultralytics' exporter writes (so its backends load our files) plus the QAT facts.

Ultralytics' ``AutoBackend`` reads ``metadata_props`` of an ONNX file, or ``metadata.yaml`` beside an OpenVINO IR, and
parses ``stride``, ``batch``, ``channels``, ``imgsz``, ``names``, ``args``, ``end2end``. Our own keys are prefixed
``qat_`` and hold JSON, so they never collide with an Ultralytics field:

* ``qat_quantization``: the placement summary (quantized convs, bit widths, activation groups, schemes).
* ``qat_reference``: the mAP of the exported fake-quant model when it is known (validate_exports.py gates on it).
"""

from __future__ import annotations

import ast
import contextlib
import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from src.errors import QATError
from src.integrations.ultralytics import model_task
from src.models.yolov8_qat import deployed_layers

QUANT_KEY = "qat_quantization"
REFERENCE_KEY = "qat_reference"


def quantization_summary(model, cfg=None) -> dict:
    """Plain-data summary of how ``model`` is quantized (from ``model.qat_placement``)."""
    placement = getattr(model, "qat_placement", None)
    if placement is None:
        raise QATError("model is not prepared for QAT (no qat_placement); export a QAT checkpoint or prepared model")
    layers = deployed_layers(model)  # an end-to-end head exports one of its two branches
    names = {l.name for l in layers}
    groups = [g for g in placement.groups if not g.consumers or any(c in names for c in g.consumers)]
    quantized = [l for l in layers if l.quantized]
    summary = {
        "quantized_convs": len(quantized),
        "total_convs": len(layers),
        "float_layers": [l.name for l in layers if not l.quantized],
        "weight_bits": {str(b): n for b, n in sorted(Counter(l.weight_bits for l in quantized).items())},
        "weight_scheme": sorted({l.weight_scheme for l in quantized if l.weight_scheme}),
        "activation_quantizers": len(groups),
        "activation_bits": {str(b): n for b, n in sorted(Counter(g.bits for g in groups).items())},
        "activation_symmetric": all(g.symmetric for g in groups),
        "activation_signed": all(g.signed for g in groups),
        "fused_bn": placement.fused,
        "skip_detection_head": placement.skip_detection_head,
        "ranges": "QAT checkpoint (not recalibrated at export)",
        "sub8bit_note": ("sub-8-bit weights are stored as int8 codes holding the lower-bit levels"
                         if any((l.weight_bits or 8) < 8 for l in quantized) else ""),
    }
    if cfg is not None:
        summary["qconfig"] = cfg.quantization.default_qconfig
    return summary


def build_metadata(
    model,
    imgsz: int | tuple[int, int],
    *,
    batch: int = 1,
    dynamic: bool = False,
    opset: int | None = None,
    simplify: bool | None = None,
    cfg=None,
    reference_metrics: dict | None = None,
    source: str | None = None,
) -> dict:
    """The metadata dict for an export of ``model``, in Ultralytics' layout plus ``qat_*`` keys.

    Args:
        model: The QAT model (``names``, ``stride``, ``yaml``, ``qat_placement``).
        imgsz: Export input size.
        reference_metrics: ``{"map50", "map50_95"}`` of the fake-quant model on a dataset (plus optional ``data``).
        source: The checkpoint the export came from (recorded in the description).
    """
    from ultralytics import __version__  # deferred: heavy dependency

    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    args: dict[str, Any] = {"batch": batch, "dynamic": dynamic, "quantize": 8, "nms": False}
    if opset is not None:
        args["opset"] = opset
    if simplify is not None:
        args["simplify"] = simplify
    yaml_file = Path(str(getattr(model, "yaml", {}).get("yaml_file", "yolov8"))).stem
    meta = {
        "description": f"YOLOv8 QAT INT8 model ({yaml_file}) exported by yolov8_qat"
                       + (f" from {source}" if source else ""),
        "author": "yolov8_qat",
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,  # the Ultralytics version whose loader this metadata targets
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "stride": int(max(model.stride)),
        "task": model_task(model),
        "head": type(model.model[-1]).__name__,
        "batch": batch,
        "imgsz": [h, w],
        "names": {int(k): str(v) for k, v in dict(model.names).items()},
        "args": args,
        "channels": int(model.yaml.get("channels", 3)),
        "end2end": bool(getattr(model, "end2end", False)),
        QUANT_KEY: quantization_summary(model, cfg),
    }
    if meta["task"] == "pose":  # Ultralytics' pose backends read it, as its exporter writes it
        meta["kpt_shape"] = list(model.model[-1].kpt_shape)
    if reference_metrics:
        meta[REFERENCE_KEY] = _reference(reference_metrics)
    return meta


def _reference(metrics: dict) -> dict:
    try:
        ref = {"map50": float(metrics["map50"]), "map50_95": float(metrics["map50_95"])}
    except (KeyError, TypeError, ValueError) as e:
        raise QATError(f"reference metrics {metrics!r} need numeric 'map50' and 'map50_95' ({e})") from None
    for k in ("data", "imgsz", "source", "split"):
        if metrics.get(k) is not None:
            ref[k] = metrics[k] if isinstance(metrics[k], (int, float)) else str(metrics[k])
    return ref


def for_onnx(meta: dict) -> dict[str, str]:
    """String values for ``metadata_props``: Ultralytics fields as ``str()`` (it literal-evals them), ours as JSON."""
    return {k: json.dumps(v, sort_keys=True) if k.startswith("qat_") else str(v) for k, v in meta.items()}


def read_metadata(path: str | Path) -> dict:
    """Metadata of an export: ONNX ``metadata_props`` or the ``metadata.yaml`` beside an OpenVINO IR.

    Values come back typed as Ultralytics' ``apply_metadata`` types them (``names`` a dict, ``imgsz`` a list, ...);
    ``qat_*`` values as dicts.
    """
    p = Path(path)
    if p.suffix == ".onnx":
        import onnx  # deferred: heavy optional dependency

        proto = onnx.load(str(p), load_external_data=False)
        meta: dict = {prop.key: prop.value for prop in proto.metadata_props}
    else:
        sidecar = (p if p.is_dir() else p.parent) / "metadata.yaml"
        if not sidecar.is_file():
            return {}
        meta = yaml.safe_load(sidecar.read_text()) or {}
    for k, v in list(meta.items()):
        if k in ("stride", "batch", "channels"):
            meta[k] = int(v)
        elif k in ("imgsz", "names", "args", "end2end") and isinstance(v, str):
            with contextlib.suppress(ValueError, SyntaxError):
                meta[k] = ast.literal_eval(v)
    for k in (QUANT_KEY, REFERENCE_KEY):
        if isinstance(meta.get(k), str):
            try:
                meta[k] = json.loads(meta[k])
            except ValueError:
                raise QATError(f"{p}: metadata key {k} is not valid JSON; re-export the model") from None
    return meta


def write_metadata_yaml(meta: dict, directory: str | Path) -> Path:
    """Write ``metadata.yaml`` the way Ultralytics does for directory formats (OpenVINO)."""
    path = Path(directory) / "metadata.yaml"
    plain = json.loads(json.dumps(meta))  # tuples -> lists, int dict keys -> str
    plain["names"] = {int(k): v for k, v in plain["names"].items()}  # Ultralytics expects int class keys
    path.write_text(yaml.safe_dump(plain, sort_keys=False, allow_unicode=True))
    return path
