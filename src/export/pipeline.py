"""``export_all``: every format in ``export.formats`` from one in-memory QAT model, in the spec's layout.

Layout: ``<export-dir>/onnx/<stem>.onnx``, ``<export-dir>/openvino/<stem>.xml`` (+ .bin + metadata.yaml),
``<export-dir>/tensorrt/`` (TensorRT-ready ONNX, build_engine.sh, engine where built), ``<export-dir>/tflite/``.
The formats and their hooks are the entries of :data:`src.export.registry.FORMATS`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable

from src.errors import QATError
from src.export import registry
from src.export.common import CalibrationImages, ExportContext
from src.export.hooks import check, hooks
from src.export.metadata import build_metadata
from src.export.validate import table, torch_map, validate as run_validation

LOGGER = logging.getLogger("yolov8_qat")


def export_all(
    model,
    cfg,
    export_dir: str | Path,
    stem: str = "quantized_model",
    imgsz: int | None = None,
    reference_metrics: dict | None = None,
    source: str | None = None,
    calibration: Callable[[], CalibrationImages | None] | None = None,
) -> dict[str, list[Path]]:
    """Export ``model`` to every format in ``cfg.export.formats``.

    Args:
        model: The QAT model (fake-quantized, calibrated or trained); deep-copied by each exporter.
        cfg: The resolved ``QATConfig`` (``export`` section: formats, include_metadata, simplify, opset, dynamic).
        export_dir: ``--export-dir``.
        stem: File stem (``--output`` without its suffix).
        imgsz: Export input size (default ``cfg.train_params.img_size``).
        reference_metrics: ``{"map50", "map50_95"}`` of the fake-quant model, stored in the metadata so
            ``validate_exports.py`` can gate on it without the checkpoint.
        source: Checkpoint path recorded in the metadata description.
        calibration: Opens the model's own images for the ranges a format calibrates itself (TFLite's tensors no
            QAT quantizer covers); called only when such a format is exported. None (or None returned): the run has
            no data, and such a format falls back to synthetic images with a warning.

    Returns:
        Format name -> written paths (main artifact first).
    """
    formats = list(cfg.export.formats)
    unknown = [f for f in formats if f not in registry.FORMATS]
    if unknown:
        raise QATError(f"export.formats: unknown format(s) {unknown}; choose from {', '.join(registry.names())}")
    imgsz = int(imgsz or cfg.train_params.img_size)
    metadata = None
    if cfg.export.include_metadata:
        metadata = build_metadata(model, imgsz, dynamic=cfg.export.dynamic, opset=cfg.export.opset,
                                  simplify=cfg.export.simplify, cfg=cfg, reference_metrics=reference_metrics,
                                  source=source)
    # registry order: the QDQ ONNX feeds openvino (and is checked once), so onnx runs first whatever the list order
    selected = registry.selected(formats)
    ctx = ExportContext(model, cfg, Path(export_dir), stem, imgsz, metadata, [f.name for f in selected], calibration)
    for f in selected:  # refuse impossible requests before spending time on the others
        check(f, ctx)
    out: dict[str, list[Path]] = {}
    try:
        for f in selected:
            out[f.name] = hooks(f).export(ctx, ctx.export_dir / f.folder)
            LOGGER.info(f"Exported {f.name}: {out[f.name][0]}")
    finally:
        ctx.cleanup()
    return out


def primary_artifacts(exports: dict[str, list[Path]]) -> list[Path]:
    """The files ``validate_exports.py`` takes for each format (ONNX, IR .xml, TensorRT-ready ONNX)."""
    return [paths[0] for paths in exports.values() if paths]


def export_and_validate(
    model,
    cfg,
    export_dir: str | Path,
    stem: str = "quantized_model",
    *,
    data: str | None = None,
    checkpoint: str | Path | None = None,
    validate: bool = False,
    device: str = "cpu",
    imgsz: int | None = None,
    calibration: Callable[[], CalibrationImages | None] | None = None,
) -> dict:
    """What ``train_qat.py --export [--validate-exports]`` runs after saving the checkpoint.

    With ``data``, the fake-quant model's mAP is measured the way ``validate_exports.py`` measures exports (static
    letterbox at the export size) and stored in the metadata, so the exports can later be gated without the
    checkpoint. With ``validate``, every export is validated against ``checkpoint`` (or that stored mAP).
    ``calibration``: see :func:`export_all`.

    Returns:
        ``{"exports": {format: [paths]}, "validation": [ExportResult] | None, "passed": bool | None}``.
    """
    imgsz = int(imgsz or cfg.train_params.img_size)
    reference = None
    if data is not None:
        with tempfile.TemporaryDirectory(prefix="export_ref_") as tmp:
            m50, m = torch_map(model, str(data), imgsz, device, Path(tmp) / "val")
        reference = {"map50": m50, "map50_95": m, "imgsz": imgsz, "data": str(data)}
    exports = export_all(model, cfg, export_dir, stem, imgsz, reference, str(checkpoint) if checkpoint else None,
                         calibration)
    out: dict = {"exports": exports, "validation": None, "passed": None}
    if validate:
        if data is None:
            raise QATError("--validate-exports needs --data (the dataset to measure mAP on)")
        results = run_validation([str(p) for p in primary_artifacts(exports)], str(data),
                                 reference=str(checkpoint) if checkpoint else None,
                                 tolerance=cfg.export.tolerance, imgsz=imgsz, device=device)
        LOGGER.info("\n" + table(results))
        out["validation"], out["passed"] = results, all(r.passed for r in results)
    return out
