"""``export_all``: every format in ``export.formats`` from one in-memory QAT model, in the spec's layout.

Layout: ``<export-dir>/onnx/<stem>.onnx``, ``<export-dir>/openvino/<stem>.xml`` (+ .bin + metadata.yaml),
``<export-dir>/tensorrt/`` (TensorRT-ready ONNX, build_engine.sh, engine where built), ``<export-dir>/tflite/``.
Each format is one :class:`Exporter` entry in :data:`EXPORTERS`; adding a format is adding an entry.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from src.errors import QATError
from src.export.metadata import build_metadata

LOGGER = logging.getLogger("yolov8_qat")


@dataclass
class ExportContext:
    """What every exporter gets: the model, settings, layout, metadata, and the shared QDQ ONNX."""

    model: object
    cfg: object
    export_dir: Path
    stem: str
    imgsz: int
    metadata: dict | None
    formats: list[str]
    _qdq_onnx: Path | None = None
    _tmp: list[Path] = field(default_factory=list)

    @property
    def opts(self):
        return self.cfg.export

    def qdq_onnx(self) -> Path:
        """The generic QDQ ONNX (exported once: ``onnx/<stem>.onnx`` when requested, else a temporary file)."""
        if self._qdq_onnx is None:
            if "onnx" in self.formats:
                path = self.export_dir / "onnx" / f"{self.stem}.onnx"
            else:
                tmp = Path(tempfile.mkdtemp(prefix="qdq_onnx_"))
                self._tmp.append(tmp)
                path = tmp / f"{self.stem}.onnx"
            from src.export.onnx_qdq import export_onnx

            o = self.opts
            self._qdq_onnx = export_onnx(self.model, path, self.imgsz, opset=o.opset, simplify=o.simplify,
                                         dynamic=o.dynamic, metadata=self.metadata)
        return self._qdq_onnx

    def cleanup(self) -> None:
        for t in self._tmp:
            shutil.rmtree(t, ignore_errors=True)


@dataclass(frozen=True)
class Exporter:
    """One export format: ``run`` writes it and returns its paths (main artifact first); ``check`` refuses early."""

    name: str
    run: Callable[[ExportContext], list[Path]]
    check: Callable[[ExportContext], None] | None = None


def _onnx(ctx: ExportContext) -> list[Path]:
    return [ctx.qdq_onnx()]


def _openvino(ctx: ExportContext) -> list[Path]:
    from src.export.openvino_export import export_openvino, runtime_int8_report

    xml = export_openvino(ctx.qdq_onnx(), ctx.export_dir / "openvino", ctx.stem, ctx.metadata)
    report = runtime_int8_report(xml)
    (LOGGER.info if report.ok else LOGGER.warning)(f"OpenVINO runtime: {report.summary()}")
    return [xml, xml.with_suffix(".bin")] + ([xml.parent / "metadata.yaml"] if ctx.metadata else [])


def _tensorrt_check(ctx: ExportContext) -> None:
    from src.export.tensorrt_export import check_model_symmetric

    if ctx.opts.dynamic:
        raise QATError("export.dynamic: true is not supported for the TensorRT-ready ONNX (it needs an optimisation "
                       "profile); set export.dynamic: false")
    check_model_symmetric(ctx.model)


def _tensorrt(ctx: ExportContext) -> list[Path]:
    from src.export.tensorrt_export import export_tensorrt

    o = ctx.opts
    r = export_tensorrt(ctx.model, ctx.export_dir / "tensorrt", ctx.stem, ctx.imgsz, opset=o.opset,
                        simplify=o.simplify, metadata=ctx.metadata)
    return [r.onnx, r.script] + ([r.engine] if r.engine else [])


def _tflite_check(ctx: ExportContext) -> None:
    from src.export.tflite_export import check_exportable

    if ctx.opts.dynamic:
        raise QATError("export.dynamic: true is not supported for TFLite (litert-torch traces one fixed input "
                       "shape); set export.dynamic: false or remove tflite from export.formats")
    check_exportable(ctx.model)


def _tflite(ctx: ExportContext) -> list[Path]:
    import json

    from src.export.tflite_export import export_tflite

    path, report = export_tflite(ctx.model, ctx.export_dir / "tflite" / f"{ctx.stem}.tflite", ctx.imgsz,
                                 ctx.metadata)
    report_path = path.with_name(f"{ctx.stem}_tflite_ranges.json")
    report_path.write_text(json.dumps(report.to_dict(), indent=1))
    return [path, report_path]


EXPORTERS: dict[str, Exporter] = {
    "onnx": Exporter("onnx", _onnx),
    "openvino": Exporter("openvino", _openvino),
    "tensorrt": Exporter("tensorrt", _tensorrt, _tensorrt_check),
    "tflite": Exporter("tflite", _tflite, _tflite_check),
}


def export_all(
    model,
    cfg,
    export_dir: str | Path,
    stem: str = "quantized_model",
    imgsz: int | None = None,
    reference_metrics: dict | None = None,
    source: str | None = None,
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

    Returns:
        Format name -> written paths (main artifact first).
    """
    formats = list(cfg.export.formats)
    unknown = [f for f in formats if f not in EXPORTERS]
    if unknown:
        raise QATError(f"export.formats: unknown format(s) {unknown}; choose from {', '.join(EXPORTERS)}")
    imgsz = int(imgsz or cfg.train_params.img_size)
    metadata = None
    if cfg.export.include_metadata:
        metadata = build_metadata(model, imgsz, dynamic=cfg.export.dynamic, opset=cfg.export.opset,
                                  simplify=cfg.export.simplify, cfg=cfg, reference_metrics=reference_metrics,
                                  source=source)
    # the QDQ ONNX feeds openvino (and is checked once), so onnx runs first whatever the list order
    order = sorted(formats, key=lambda f: list(EXPORTERS).index(f))
    ctx = ExportContext(model, cfg, Path(export_dir), stem, imgsz, metadata, order)
    for f in order:  # refuse impossible requests before spending time on the others
        if EXPORTERS[f].check:
            EXPORTERS[f].check(ctx)
    out: dict[str, list[Path]] = {}
    try:
        for f in order:
            out[f] = EXPORTERS[f].run(ctx)
            LOGGER.info(f"Exported {f}: {out[f][0]}")
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
) -> dict:
    """What ``train_qat.py --export [--validate-exports]`` runs after saving the checkpoint.

    With ``data``, the fake-quant model's mAP is measured the way ``validate_exports.py`` measures exports (static
    letterbox at the export size) and stored in the metadata, so the exports can later be gated without the
    checkpoint. With ``validate``, every export is validated against ``checkpoint`` (or that stored mAP).

    Returns:
        ``{"exports": {format: [paths]}, "validation": [ExportResult] | None, "passed": bool | None}``.
    """
    imgsz = int(imgsz or cfg.train_params.img_size)
    reference = None
    if data is not None:
        from src.export.validate import torch_map

        with tempfile.TemporaryDirectory(prefix="export_ref_") as tmp:
            m50, m = torch_map(model, str(data), imgsz, device, Path(tmp) / "val")
        reference = {"map50": m50, "map50_95": m, "imgsz": imgsz, "data": str(data)}
    exports = export_all(model, cfg, export_dir, stem, imgsz, reference, str(checkpoint) if checkpoint else None)
    out: dict = {"exports": exports, "validation": None, "passed": None}
    if validate:
        if data is None:
            raise QATError("--validate-exports needs --data (the dataset to measure mAP on)")
        from src.export.validate import table, validate as run_validation

        results = run_validation([str(p) for p in primary_artifacts(exports)], str(data),
                                 reference=str(checkpoint) if checkpoint else None,
                                 tolerance=cfg.export.tolerance, imgsz=imgsz, device=device)
        LOGGER.info("\n" + table(results))
        out["validation"], out["passed"] = results, all(r.passed for r in results)
    return out
