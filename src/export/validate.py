"""validate_exports.py: accuracy, parity, latency, INT8 coverage and size of exported models, with a pass/fail gate.

For each export (ONNX, OpenVINO IR, TensorRT-ready ONNX, int8 TFLite):

* mAP50 / mAP50-95 through Ultralytics' own loader and ``DetectionValidator`` (``YOLO(path).val``), i.e. exactly what
  a user of the export gets;
* the reference mAP50-95: the PyTorch fake-quant model of ``--reference`` evaluated the same way (static letterbox at
  the export's size, ``rect=False``), or else the ``qat_reference`` stored in the export's metadata;
* output parity on the same letterboxed validation images: max abs error and cosine of the raw (1, 4+nc, anchors)
  outputs against the fake-quant model (``--reference`` only); TFLite boxes, input-relative in the file, are scaled
  back to pixels first, as Ultralytics' ``LiteRTBackend`` does;
* latency at batch 1 on a stated number of threads: warm-up, then interleaved rounds over every runtime variant
  (OpenVINO also with ``INFERENCE_PRECISION_HINT=f32``), median and inter-quartile range;
* INT8 coverage: OpenVINO's compiled runtime graph, for ONNX the convs fed by DequantizeLinear, for TFLite the convs
  whose input and weight tensors are int8, against the number of quantized convs recorded in the metadata;
* file size, and the stored bits per conv weight (4 where 4-bit weights are packed INT4).

Without a reference mAP (no ``--reference`` and none in the metadata) the accuracy gate does not run: the table shows
``n/a`` and the JSON ``"accuracy_gate": "not run: no reference"``; ``--require-reference`` makes that a failure.

Exit status: 0 all passed, 1 some export failed the gate (mAP off by more than ``--tolerance`` points, a quantized
conv in float, or no reference under ``--require-reference``), 2 bad input (missing, corrupt or incomplete file,
unsupported format, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from src.deploy import preprocess_image
from src.env import prepare_environment
from src.errors import QATError
from src.export.common import prepare_for_export
from src.export.discovery import Target, ValidationInputError, discover
from src.export.hooks import hooks
from src.export.metadata import QUANT_KEY, REFERENCE_KEY
from src.export.timing import measure_latency, median_iqr, runners_for, size_mb
from src.integrations.ultralytics import select_end2end, validator_nms
from src.models.yolov8_qat import QAT_CHECKPOINT_KEY, build_from_checkpoint, deployed_layers
from src.training.checkpoint import load_checkpoint_file

LOGGER = logging.getLogger("yolov8_qat")

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2
GATE_PASSED, GATE_FAILED, GATE_NOT_RUN = "passed", "failed", "not run: no reference"


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """One row of the table / one entry of the JSON (None where not applicable)."""

    path: str
    format: str
    map50: float | None = None
    map50_95: float | None = None
    reference_map50_95: float | None = None
    reference_source: str | None = None
    max_abs_err: float | None = None
    cosine: float | None = None
    latency_ms: float | None = None
    latency_iqr_ms: float | None = None
    latency_f32_ms: float | None = None
    threads: int | None = None
    int8_convs: int | None = None
    float_convs: int | None = None
    float_conv_names: list[str] = field(default_factory=list)
    expected_quantized_convs: int | None = None
    tensorrt_violations: list[str] | None = None
    size_mb: float | None = None
    weight_bits: float | None = None  # mean stored bits per conv weight (4: packed INT4, 8: int8, 32: float)
    accuracy_gate: str | None = None  # GATE_PASSED, GATE_FAILED or GATE_NOT_RUN
    passed: bool | None = None
    reasons: list[str] = field(default_factory=list)


def map_within_tolerance(map50_95: float, reference: float, tolerance_points: float) -> bool:
    """``|map - reference|`` in mAP points (x100) is at most the tolerance (a tiny epsilon absorbs float noise)."""
    return abs(map50_95 - reference) * 100.0 <= tolerance_points + 1e-9


@contextmanager
def reading(t: Target):
    """Turns a runtime's failure to open or run ``t`` into bad input (exit 2) naming the user's path: an export that
    cannot be loaded is not one that drifted."""
    try:
        yield
    except QATError:
        raise
    except Exception as err:  # onnx DecodeError, OpenVINO/ORT RuntimeError, ... differ by runtime
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ValidationInputError(f"--model {t.path}: the {t.format} export cannot be read ({type(err).__name__}: "
                                   f"{first}); export it again") from err


def export_metadata(t: Target) -> dict:
    """The export's metadata (ONNX ``metadata_props``, ``metadata.yaml``, or a .tflite's ``metadata.json``)."""
    with reading(t):
        return hooks(t.spec).read_metadata(t.path)


# --------------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------------
def _val_args(data: str, imgsz: int, batch: int, device: str, save_dir: Path, nms: bool | None = None) -> dict:
    return dict(data=str(data), imgsz=imgsz, batch=batch, device=device, workers=0, plots=False, verbose=False,
                save_json=False, rect=False, project=str(save_dir.parent), name=save_dir.name, exist_ok=True,
                nms=nms)


def export_map(t: Target, data: str, imgsz: int, device: str, work: Path) -> tuple[float, float]:
    """mAP50, mAP50-95 of an export through ``YOLO(path).val`` (Ultralytics' backend and validator)."""
    from ultralytics import YOLO  # deferred: heavy dependency

    with hooks(t.spec).yolo_path(t.path) as p:
        metrics = YOLO(str(p), task="detect").val(**_val_args(data, imgsz, 1, device, work / f"val_{t.format}"))
    return float(metrics.box.map50), float(metrics.box.map)


def torch_map(model, data: str, imgsz: int, device: str, work: Path) -> tuple[float, float]:
    """mAP50, mAP50-95 of the fake-quant PyTorch model with the exports' preprocessing (static letterbox)."""
    from ultralytics.models.yolo.detect import DetectionValidator  # deferred: heavy dependency

    validator = DetectionValidator(args=_val_args(data, imgsz, 8, device, work / "val_reference",
                                                  validator_nms(model)))
    stats = validator(model=copy.deepcopy(model).float().eval())
    return float(stats["metrics/mAP50(B)"]), float(stats["metrics/mAP50-95(B)"])


def split_files(data: str, split: str = "val") -> list[Path]:
    """The image files of a dataset split, in sorted order (a folder's images or a .txt list's lines)."""
    # deferred: Ultralytics reads its environment at import, after prepare_environment()
    from ultralytics.data.utils import IMG_FORMATS, check_det_dataset

    d = check_det_dataset(data)
    roots = d[split] if isinstance(d[split], list) else [d[split]]
    files: list[Path] = []
    for r in roots:
        r = Path(r)
        if r.is_dir():
            files += sorted(f for f in r.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        elif r.suffix == ".txt":
            files += [Path(line.strip()) for line in r.read_text().splitlines() if line.strip()]
    return files


def parity_images(data: str, imgsz: int, n: int, split: str = "val") -> np.ndarray:
    """The first ``n`` images of a split, letterboxed to ``imgsz`` as the validator does: (n, 3, h, w) float32 RGB."""
    import cv2  # deferred: heavy dependency

    files = split_files(data, split)[:n]
    if not files:
        raise ValidationInputError(f"--data {data}: no {split} images found for the parity check")
    batch = [preprocess_image(im, imgsz)[0] for im in (cv2.imread(str(f)) for f in files) if im is not None]
    return np.stack(batch)


def torch_outputs(model, images: np.ndarray) -> list[np.ndarray]:
    """Raw (1, 4+nc, anchors) outputs of the fake-quant model in export form, one image at a time (a segmentation
    model's first output, as the runtimes' runners return)."""
    m = prepare_for_export(model)
    with torch.no_grad():
        outs = [m(torch.from_numpy(x[None])) for x in images]
    return [(o[0] if isinstance(o, tuple) else o).numpy() for o in outs]


def parity(reference: list[np.ndarray], runner: Callable, images: np.ndarray) -> tuple[float, float]:
    """(max abs error, cosine similarity) of a runtime's raw outputs against the reference outputs."""
    outs = [runner(x[None]) for x in images]
    a = np.concatenate([o.ravel() for o in outs]).astype(np.float64)
    b = np.concatenate([r.ravel() for r in reference]).astype(np.float64)
    if a.shape != b.shape:
        raise QATError(f"export output has {a.size} values but the reference model gives {b.size}; "
                       "was the export made at another image size or class count?")
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return float(np.abs(a - b).max()), cos


def int8_coverage(t: Target, expected: int | None) -> tuple[int, list[str], list[str] | None]:
    """(INT8 convs, quantized convs running in float (by name), TensorRT rule violations or None).

    ``expected`` is the number of quantized convs of the placement: a conv whose Q/DQ were both lost looks like a
    float-by-design conv in the file, so it is caught by the count.
    """
    cov = hooks(t.spec).coverage(t.path)
    floats = list(cov.floats)
    if expected is not None and cov.seen < expected:
        floats.append(f"{expected - cov.seen} quantized conv(s) lost their quantization (float convs in the file: "
                      f"{', '.join(cov.unquantized)})")
    return cov.int8, floats, cov.violations


# --------------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Reference:
    model: object | None
    map50: float | None
    map50_95: float | None
    quantized_convs: int | None
    path: str | None


def load_reference(path: str | None, data: str, imgsz: int, device: str, work: Path,
                   end2end: bool = False) -> Reference:
    """The QAT checkpoint the exports came from, evaluated with the inference branch they hold (``end2end``)."""
    if not path:
        return Reference(None, None, None, None, None)
    p = Path(path)
    if not p.is_file():
        raise ValidationInputError(f"--reference {path}: no such file; pass the QAT checkpoint the exports came from "
                                   "(e.g. models/checkpoints/qat/quantized_model.pt)")
    try:
        ckpt = load_checkpoint_file(p)
    except QATError as e:
        raise ValidationInputError(f"--reference {e}") from None
    if not isinstance(ckpt, dict) or QAT_CHECKPOINT_KEY not in ckpt:
        raise ValidationInputError(f"--reference {path}: not a QAT checkpoint written by train_qat.py")
    model, _ = build_from_checkpoint(ckpt)
    model.eval()
    if end2end and not select_end2end(model, True):
        raise ValidationInputError(f"--reference {path}: the exports are NMS-free (end2end) but this checkpoint has "
                                   "no end-to-end head; pass the checkpoint they were exported from")
    LOGGER.info(f"Evaluating reference {path} (PyTorch fake quant, static {imgsz}px letterbox)...")
    m50, m = torch_map(model, data, imgsz, device, work)
    q = sum(l.quantized for l in deployed_layers(model))
    return Reference(model, m50, m, q, str(p))


def _end2end(metas: list[dict]) -> bool:
    """Whether the exports hold an end-to-end head's NMS-free branch (all or none of them)."""
    modes = {bool(m.get("end2end", False)) for m in metas}
    if len(modes) > 1:
        raise ValidationInputError("the exports mix NMS-free (end2end) and NMS outputs; validate each kind separately")
    return modes.pop() if modes else False


def validate(
    models: list[str],
    data: str,
    *,
    reference: str | None = None,
    tolerance: float = 0.5,
    imgsz: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    parity_count: int = 8,
    require_reference: bool = False,
) -> list[ExportResult]:
    """Validate every export; see the module docstring. Returns one result per export.

    Args:
        require_reference: An export without a reference mAP fails instead of passing with the accuracy gate not run.
    """
    if not Path(data).is_file():
        raise ValidationInputError(f"--data {data}: no such file; pass the dataset YAML the model was trained on")
    targets = discover(models)
    metas = [export_metadata(t) for t in targets]
    if imgsz is None:
        sizes = {int((m.get("imgsz") or [640])[0]) for m in metas}
        if len(sizes) > 1:
            raise ValidationInputError(f"exports have different image sizes {sorted(sizes)}; validate them separately "
                                       "or pass --imgsz")
        imgsz = sizes.pop()
    threads = int(threads or os.cpu_count() or 1)
    results: list[ExportResult] = []
    with tempfile.TemporaryDirectory(prefix="validate_exports_") as tmp:
        work = Path(tmp)
        ref = load_reference(reference, data, imgsz, device, work, _end2end(metas))
        images = ref_out = None
        if ref.model is not None:
            images = parity_images(data, imgsz, parity_count)
            ref_out = torch_outputs(ref.model, images)
        variants: dict[tuple[int, str], Callable] = {}
        for i, (t, meta) in enumerate(zip(targets, metas)):
            LOGGER.info(f"Validating {t.format}: {t.path}")
            r = ExportResult(str(t.path), t.format, threads=threads, size_mb=round(size_mb(t), 3))
            with reading(t):
                r.weight_bits = round(hooks(t.spec).weight_bits(t.path), 2)
            qmeta = meta.get(QUANT_KEY) or {}
            r.expected_quantized_convs = ref.quantized_convs if ref.quantized_convs is not None else \
                qmeta.get("quantized_convs")
            with reading(t):
                r.map50, r.map50_95 = export_map(t, data, imgsz, device, work)
            if ref.map50_95 is not None:
                r.reference_map50_95, r.reference_source = ref.map50_95, f"--reference {ref.path}"
            elif meta.get(REFERENCE_KEY):
                stored = meta[REFERENCE_KEY]
                r.reference_map50_95, r.reference_source = float(stored["map50_95"]), "export metadata"
                if stored.get("imgsz") not in (None, imgsz):
                    LOGGER.warning(f"{t.path}: the stored reference mAP was measured at {stored['imgsz']}px, "
                                   f"this validation runs at {imgsz}px")
            r.int8_convs, r.float_conv_names, r.tensorrt_violations = int8_coverage(t, r.expected_quantized_convs)
            r.float_convs = len(r.float_conv_names)
            with reading(t):
                runs_here = runners_for(t, threads)
            for k, run in runs_here.items():
                variants[(i, k)] = run
            if ref_out is not None:
                r.max_abs_err, r.cosine = parity(ref_out, runs_here["default"], images)
            results.append(r)
        x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
        if runs > 0:
            LOGGER.info(f"Timing {len(variants)} runtime variant(s): {warmup} warm-up + {runs} interleaved runs, "
                        f"batch 1, {threads} thread(s)...")
            times = measure_latency({f"{i}:{k}": v for (i, k), v in variants.items()}, x, warmup, runs)
            for (i, k) in variants:
                med, iqr = median_iqr(times[f"{i}:{k}"])
                if k == "default":
                    results[i].latency_ms, results[i].latency_iqr_ms = round(med, 3), round(iqr, 3)
                else:
                    results[i].latency_f32_ms = round(med, 3)
    for r in results:
        _judge(r, tolerance, require_reference)
    return results


def _judge(r: ExportResult, tolerance: float, require_reference: bool = False) -> None:
    if r.reference_map50_95 is None:
        r.accuracy_gate = GATE_NOT_RUN
        if require_reference:
            r.reasons.append(f"no reference mAP (no --reference and none in the metadata) and --require-reference is "
                             "set; pass --reference <the QAT checkpoint the export came from>")
        else:
            LOGGER.warning(f"{r.path}: no reference mAP (no --reference and none in the metadata): the accuracy gate "
                           "does not run")
    elif not map_within_tolerance(r.map50_95, r.reference_map50_95, tolerance):
        r.accuracy_gate = GATE_FAILED
        r.reasons.append(f"mAP50-95 {r.map50_95:.4f} differs from the reference {r.reference_map50_95:.4f} by "
                         f"{abs(r.map50_95 - r.reference_map50_95) * 100:.2f} points (> {tolerance} tolerance)")
    else:
        r.accuracy_gate = GATE_PASSED
    if r.float_convs:
        r.reasons.append(f"{r.float_convs} quantized conv(s) run in float: " + "; ".join(r.float_conv_names))
    if r.tensorrt_violations:
        r.reasons.append(f"{len(r.tensorrt_violations)} TensorRT rule violation(s): {r.tensorrt_violations[0]}")
    r.passed = not r.reasons


def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(results: list[ExportResult]) -> str:
    head = (f"{'format':<9} {'mAP50':>7} {'mAP50-95':>8} {'ref':>7} {'Δpts':>6} {'max|err|':>9} {'cosine':>9} "
            f"{'ms':>7} {'ms f32':>7} {'thr':>3} {'int8':>4} {'float':>5} {'MB':>6} {'bits/w':>6}  result  path")
    lines = [head]
    for r in results:
        delta = None if r.reference_map50_95 is None else (r.map50_95 - r.reference_map50_95) * 100
        lines.append(
            f"{r.format:<9} {_fmt(r.map50, '.4f'):>7} {_fmt(r.map50_95, '.4f'):>8} "
            f"{_fmt(r.reference_map50_95, '.4f', 'n/a'):>7} {_fmt(delta, '+.2f', 'n/a'):>6} {_fmt(r.max_abs_err, '.3g'):>9} "
            f"{_fmt(r.cosine, '.6f'):>9} {_fmt(r.latency_ms, '.2f'):>7} {_fmt(r.latency_f32_ms, '.2f'):>7} "
            f"{_fmt(r.threads, 'd'):>3} {_fmt(r.int8_convs, 'd'):>4} {_fmt(r.float_convs, 'd'):>5} "
            f"{_fmt(r.size_mb, '.2f'):>6} {_fmt(r.weight_bits, '.2f'):>6}  {'PASS' if r.passed else 'FAIL':<6}  {r.path}")
    for r in results:
        for reason in r.reasons:
            lines.append(f"FAIL {r.path}: {reason}")
        if r.accuracy_gate == GATE_NOT_RUN and r.passed:
            lines.append(f"NOTE {r.path}: accuracy gate not run (no reference mAP; pass --reference <QAT checkpoint>, "
                         "or --require-reference to fail instead)")
    return "\n".join(lines)


def write_json(results: list[ExportResult], path: str | Path, **extra) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"exports": [asdict(r) for r in results], **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="validate_exports.py",
        description="Validate exported INT8 models: mAP vs reference, output parity, latency, INT8 coverage, size. "
                    "Exit 0 = all passed, 1 = a gate failed, 2 = bad input.",
    )
    p.add_argument("--model", action="extend", nargs="+", required=True,
                   help="export file(s) (.onnx, .xml, .tflite), *_openvino_model dir(s), the --export-dir folder or "
                        "one of its format folders (<export-dir>/openvino)")
    p.add_argument("--data", required=True, help="dataset YAML")
    p.add_argument("--reference", help="QAT checkpoint the exports came from (default: mAP stored in the metadata)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--require-reference", action="store_true",
                   help="fail an export that has no reference mAP (default: pass it with the accuracy gate not run)")
    p.add_argument("--tolerance", type=float, default=0.5, help="allowed |mAP50-95 drift| in points (0.5 = 0.005)")
    p.add_argument("--imgsz", type=int, help="image size (default: the exports' metadata)")
    p.add_argument("--device", default="cpu", help="device for the validators (default cpu)")
    p.add_argument("--threads", type=int, help="CPU threads for latency and parity runs (default: all cores)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up runs per runtime variant")
    p.add_argument("--runs", type=int, default=50, help="timed runs per runtime variant (0 skips latency)")
    p.add_argument("--parity-images", type=int, default=8, help="validation images for the parity check")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(message)s", stream=sys.stdout,
                        force=True)
    LOGGER.setLevel(getattr(logging, args.log_level.upper()))
    if args.tolerance < 0:
        LOGGER.error(f"ERROR: --tolerance {args.tolerance}: must be >= 0 (mAP points)")
        return EXIT_ERROR
    try:
        prepare_environment()
        results = validate(args.model, args.data, reference=args.reference, tolerance=args.tolerance,
                           imgsz=args.imgsz, device=args.device, threads=args.threads, warmup=args.warmup,
                           runs=args.runs, parity_count=args.parity_images, require_reference=args.require_reference)
    except KeyboardInterrupt:
        LOGGER.error("Interrupted.")
        return 130
    except (QATError, FileNotFoundError) as e:
        if args.log_level == "debug":
            LOGGER.exception(str(e))
        else:
            LOGGER.error(f"ERROR: {e}")
        return EXIT_ERROR
    print(table(results))
    if args.json:
        out = write_json(results, args.json, tolerance_points=args.tolerance, data=str(args.data),
                         require_reference=args.require_reference)
        LOGGER.info(f"Results written to {out}")
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAILED
