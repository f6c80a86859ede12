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
* file size.

Exit status: 0 all passed, 1 some export failed the gate (mAP off by more than ``--tolerance`` points, or a quantized
conv in float), 2 bad input (missing file, unsupported format, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from src.errors import QATError

LOGGER = logging.getLogger("yolov8_qat")

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


class ValidationInputError(QATError):
    """A --model/--data/--reference argument cannot be used (message names it and the fix)."""


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
    passed: bool | None = None
    reasons: list[str] = field(default_factory=list)


def map_within_tolerance(map50_95: float, reference: float, tolerance_points: float) -> bool:
    """``|map - reference|`` in mAP points (x100) is at most the tolerance (a tiny epsilon absorbs float noise)."""
    return abs(map50_95 - reference) * 100.0 <= tolerance_points + 1e-9


# --------------------------------------------------------------------------------------------------------------------
# Export discovery
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Target:
    path: Path
    format: str  # onnx | openvino | tensorrt (the TensorRT-ready ONNX, run with ONNX Runtime here) | tflite


def discover(paths: list[str]) -> list[Target]:
    """Exports named on the command line: files, ``*_openvino_model`` dirs, or an export dir in the spec's layout."""
    targets: list[Target] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ValidationInputError(f"--model {raw}: no such file or directory; pass an exported .onnx, an "
                                       "OpenVINO .xml / *_openvino_model dir, a .tflite, or the --export-dir folder")
        if p.is_dir():
            found = _discover_dir(p)
            if not found:
                raise ValidationInputError(f"--model {raw}: no exports found (looked for onnx/*.onnx, "
                                           "openvino/*.xml, tensorrt/*.onnx, tflite/*.tflite and *.xml in "
                                           "*_openvino_model)")
            targets.extend(found)
        else:
            targets.append(Target(p, _format_of(p)))
    return targets


def _discover_dir(d: Path) -> list[Target]:
    if d.name.endswith("_openvino_model"):
        return [Target(x, "openvino") for x in sorted(d.glob("*.xml"))]
    found = [Target(x, "onnx") for x in sorted((d / "onnx").glob("*.onnx"))]
    found += [Target(x, "openvino") for x in sorted((d / "openvino").glob("*.xml"))]
    found += [Target(x, "tensorrt") for x in sorted((d / "tensorrt").glob("*.onnx"))]
    found += [Target(x, "tflite") for x in sorted((d / "tflite").glob("*.tflite"))]
    for sub in sorted(d.glob("*_openvino_model")):
        found += [Target(x, "openvino") for x in sorted(sub.glob("*.xml"))]
    if not found:
        found = [Target(x, _format_of(x)) for x in sorted([*d.glob("*.onnx"), *d.glob("*.tflite")])]
    return found


def _format_of(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return "tensorrt" if p.parent.name == "tensorrt" else "onnx"
    if suffix == ".xml":
        return "openvino"
    if suffix == ".tflite":
        return "tflite"
    if suffix == ".engine":
        raise ValidationInputError(f"--model {p}: TensorRT engines are validated on a TensorRT machine; here "
                                   f"validate the TensorRT-ready ONNX ({p.with_suffix('.onnx').name}) instead")
    raise ValidationInputError(f"--model {p}: unsupported export format {suffix or '(no suffix)'}; expected .onnx, "
                               "an OpenVINO .xml or .tflite")


def export_metadata(t: Target) -> dict:
    """The export's metadata (ONNX ``metadata_props``, ``metadata.yaml``, or a .tflite's ``metadata.json``).

    A .tflite's is read by Ultralytics' own reader, as its ``LiteRTBackend`` reads it.
    """
    from src.export.metadata import read_metadata

    if t.format != "tflite":
        return read_metadata(t.path)
    from ultralytics.nn.backends.base import BaseBackend

    meta = BaseBackend.read_metadata(t.path) if zipfile.is_zipfile(t.path) else {}
    if not meta:
        raise ValidationInputError(f"--model {t.path}: not a .tflite written by the TFLite export (no embedded "
                                   "metadata.json, which YOLO() needs too); re-export it with tflite in "
                                   "export.formats and export.include_metadata: true")
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except Exception as e:  # a broken native library fails as something other than ImportError
        raise ValidationInputError(f"--model {t.path}: running a .tflite needs ai-edge-litert ({type(e).__name__}: "
                                   f"{e}); pip install -r requirements-tflite.txt") from None
    return meta


# --------------------------------------------------------------------------------------------------------------------
# Runtimes (batch 1, fixed threads)
# --------------------------------------------------------------------------------------------------------------------
def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    # ONNX Runtime's workers spin after each run by default: interleaved with the other runtimes they would steal
    # the cores those are being timed on
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def ov_runner(path: Path, threads: int, f32: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    from src.export.openvino_export import compile_model

    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: np.array(request.infer([x])[0])


def tflite_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The LiteRT interpreter as Ultralytics' ``LiteRTBackend`` runs it (default delegates), boxes back in pixels.

    The export divides box coordinates by the image size inside the graph (as Ultralytics' own LiteRT export does);
    scaling them back gives the units of the other runtimes and of the PyTorch reference.
    """
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if inp["dtype"] != np.float32 or out["dtype"] != np.float32:
        raise ValidationInputError(f"--model {path}: graph input/output are {inp['dtype'].__name__}/"
                                   f"{out['dtype'].__name__}; only float-I/O int8 models (what the TFLite export "
                                   "writes) are validated here; re-export it")
    h, w = (int(v) for v in inp["shape"][2:4])
    size = np.array([w, h, w, h], dtype=np.float32).reshape(1, 4, 1)

    def run(x: np.ndarray) -> np.ndarray:
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"])  # a copy
        y[:, :4] *= size
        return y

    return run


def runners_for(t: Target, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Runtime variants timed for one export: the default, plus OpenVINO with f32 inference precision."""
    if t.format == "openvino":
        return {"default": ov_runner(t.path, threads), "f32": ov_runner(t.path, threads, f32=True)}
    if t.format == "tflite":
        return {"default": tflite_runner(t.path, threads)}
    return {"default": ort_runner(t.path, threads)}


@contextlib.contextmanager
def yolo_path(t: Target) -> Iterator[Path]:
    """The path Ultralytics' ``YOLO()`` loads this export from."""
    if t.format == "openvino":
        from src.export.openvino_export import ultralytics_view

        with ultralytics_view(t.path) as view:
            yield view
    else:
        yield t.path


def size_mb(t: Target) -> float:
    files = [t.path] + ([t.path.with_suffix(".bin")] if t.format == "openvino" else [])
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


# --------------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------------
def _val_args(data: str, imgsz: int, batch: int, device: str, save_dir: Path) -> dict:
    return dict(data=str(data), imgsz=imgsz, batch=batch, device=device, workers=0, plots=False, verbose=False,
                save_json=False, rect=False, project=str(save_dir.parent), name=save_dir.name, exist_ok=True)


def export_map(t: Target, data: str, imgsz: int, device: str, work: Path) -> tuple[float, float]:
    """mAP50, mAP50-95 of an export through ``YOLO(path).val`` (Ultralytics' backend and validator)."""
    from ultralytics import YOLO

    with yolo_path(t) as p:
        metrics = YOLO(str(p), task="detect").val(**_val_args(data, imgsz, 1, device, work / f"val_{t.format}"))
    return float(metrics.box.map50), float(metrics.box.map)


def torch_map(model, data: str, imgsz: int, device: str, work: Path) -> tuple[float, float]:
    """mAP50, mAP50-95 of the fake-quant PyTorch model with the exports' preprocessing (static letterbox)."""
    from ultralytics.models.yolo.detect import DetectionValidator

    validator = DetectionValidator(args=_val_args(data, imgsz, 8, device, work / "val_reference"))
    stats = validator(model=copy.deepcopy(model).float().eval())
    return float(stats["metrics/mAP50(B)"]), float(stats["metrics/mAP50-95(B)"])


def parity_images(data: str, imgsz: int, n: int) -> np.ndarray:
    """The first ``n`` validation images, letterboxed to ``imgsz`` as the validator does: (n, 3, h, w) float32 RGB."""
    import cv2
    from ultralytics.data.utils import IMG_FORMATS, check_det_dataset

    from src.deploy import preprocess_image

    d = check_det_dataset(data)
    roots = d["val"] if isinstance(d["val"], list) else [d["val"]]
    files: list[Path] = []
    for r in roots:
        r = Path(r)
        if r.is_dir():
            files += sorted(f for f in r.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        elif r.suffix == ".txt":
            files += [Path(line.strip()) for line in r.read_text().splitlines() if line.strip()]
    files = files[:n]
    if not files:
        raise ValidationInputError(f"--data {data}: no validation images found for the parity check")
    batch = [preprocess_image(im, imgsz)[0] for im in (cv2.imread(str(f)) for f in files) if im is not None]
    return np.stack(batch)


def torch_outputs(model, images: np.ndarray) -> list[np.ndarray]:
    """Raw (1, 4+nc, anchors) outputs of the fake-quant model in export form, one image at a time."""
    import torch

    from src.export.onnx_qdq import prepare_for_export

    m = prepare_for_export(model)
    with torch.no_grad():
        return [m(torch.from_numpy(x[None])).numpy() for x in images]


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


def measure_latency(variants: dict, x: np.ndarray, warmup: int, rounds: int) -> dict:
    """Per variant, ``rounds`` single-image timings (ms), taken round-robin so drift hits every variant alike."""
    for run in variants.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, run in variants.items():
            t0 = time.perf_counter()
            run(x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def median_iqr(ts: list[float]) -> tuple[float, float]:
    """Median and inter-quartile range of timings (IQR 0 for a single timing)."""
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return statistics.median(ts), q[2] - q[0]


def int8_coverage(t: Target, expected: int | None) -> tuple[int, list[str], list[str] | None]:
    """(INT8 convs, quantized convs running in float (by name), TensorRT rule violations or None).

    ``expected`` is the number of quantized convs of the placement: a conv whose Q/DQ were both lost looks like a
    float-by-design conv in the file, so it is caught by the count.
    """
    violations = None
    if t.format == "openvino":
        from src.export.openvino_export import runtime_int8_report

        r = runtime_int8_report(t.path)
        int8, found = len(r.int8), len(r.quantized)
        floats = [f"{k} ({v})" for k, v in r.float_fallbacks.items()]
        unquantized = list(r.unquantized)
    elif t.format == "tflite":
        # Float by design, as in ONNX/OpenVINO: the DFL conv of the decoding tail; a conv with one int8 side is a
        # quantized conv that lost half its quantization, and a lost one shows in the count.
        int8_names, others = tflite_conv_precisions(t.path)
        int8 = found = len(int8_names)
        floats = [n for n in others if n.endswith("(partial)")]
        unquantized = [n for n in others if not n.endswith("(partial)")]
    else:
        import onnx

        from src.export.onnx_qdq import qdq_summary

        proto = onnx.load(str(t.path))
        s = qdq_summary(proto)
        int8 = found = len(s.quantized_convs)
        floats = list(s.partially_quantized)
        unquantized = [c for c in s.float_convs if c not in floats]
        if t.format == "tensorrt":
            from src.export.tensorrt_export import check_tensorrt_rules

            violations = check_tensorrt_rules(proto)
    partial = len(floats) if t.format != "openvino" else 0  # already named above and missing from ``found``
    if expected is not None and found + partial < expected:
        floats.append(f"{expected - found - partial} quantized conv(s) lost their quantization (float convs in the file: "
                      f"{', '.join(unquantized)})")
    return int8, floats, violations


def tflite_conv_precisions(path: Path) -> tuple[list[str], list[str]]:
    """Convolutions of a .tflite by the dtypes of their input and weight tensors: (int8 names, other names).

    The others are marked ``(partial)`` when one side is int8 (as the ONNX count marks a conv with one Q/DQ), else
    ``(float)``; a name is the op, its index and the last scope of its weight tensor.
    """
    from src.export.tflite_export import WEIGHT_OPS, _graph, _interpreter

    tensors, ops = _graph(_interpreter(path, reference_kernels=True))
    int8, other = [], []
    for op in ops:
        if op["op_name"] not in WEIGHT_OPS:
            continue
        x, w = (tensors[i] for i in op["inputs"][:2])
        name = f"{op['op_name']}#{op['index']} {w['name'].split(';')[0].rsplit('/', 1)[-1]}"
        n_int8 = sum(d["dtype"] == np.int8 for d in (x, w))
        if n_int8 == 2:
            int8.append(name)
        else:
            other.append(f"{name} ({'partial' if n_int8 else 'float'})")
    return int8, other


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


def load_reference(path: str | None, data: str, imgsz: int, device: str, work: Path) -> Reference:
    if not path:
        return Reference(None, None, None, None, None)
    import torch

    from src.models.yolov8_qat import build_from_checkpoint

    p = Path(path)
    if not p.is_file():
        raise ValidationInputError(f"--reference {path}: no such file; pass the QAT checkpoint the exports came from "
                                   "(e.g. models/checkpoints/qat/quantized_model.pt)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValidationInputError(f"--reference {path}: cannot be read as a checkpoint ({type(e).__name__}: {e})")
    if not isinstance(ckpt, dict) or "yolov8_qat" not in ckpt:
        raise ValidationInputError(f"--reference {path}: not a QAT checkpoint written by train_qat.py")
    model, _ = build_from_checkpoint(ckpt)
    model.eval()
    LOGGER.info(f"Evaluating reference {path} (PyTorch fake quant, static {imgsz}px letterbox)...")
    m50, m = torch_map(model, data, imgsz, device, work)
    q = sum(l.quantized for l in model.qat_placement.layers)
    return Reference(model, m50, m, q, str(p))


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
) -> list[ExportResult]:
    """Validate every export; see the module docstring. Returns one result per export."""
    from src.export.metadata import QUANT_KEY, REFERENCE_KEY

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
        ref = load_reference(reference, data, imgsz, device, work)
        images = ref_out = None
        if ref.model is not None:
            images = parity_images(data, imgsz, parity_count)
            ref_out = torch_outputs(ref.model, images)
        variants: dict[tuple[int, str], Callable] = {}
        for i, (t, meta) in enumerate(zip(targets, metas)):
            LOGGER.info(f"Validating {t.format}: {t.path}")
            r = ExportResult(str(t.path), t.format, threads=threads, size_mb=round(size_mb(t), 3))
            qmeta = meta.get(QUANT_KEY) or {}
            r.expected_quantized_convs = ref.quantized_convs if ref.quantized_convs is not None else \
                qmeta.get("quantized_convs")
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
        _judge(r, tolerance)
    return results


def _judge(r: ExportResult, tolerance: float) -> None:
    if r.reference_map50_95 is None:
        LOGGER.warning(f"{r.path}: no reference mAP (no --reference and none in the metadata): mAP is not gated")
    elif not map_within_tolerance(r.map50_95, r.reference_map50_95, tolerance):
        r.reasons.append(f"mAP50-95 {r.map50_95:.4f} differs from the reference {r.reference_map50_95:.4f} by "
                         f"{abs(r.map50_95 - r.reference_map50_95) * 100:.2f} points (> {tolerance} tolerance)")
    if r.float_convs:
        r.reasons.append(f"{r.float_convs} quantized conv(s) run in float: " + "; ".join(r.float_conv_names))
    if r.tensorrt_violations:
        r.reasons.append(f"{len(r.tensorrt_violations)} TensorRT rule violation(s): {r.tensorrt_violations[0]}")
    r.passed = not r.reasons


def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(results: list[ExportResult]) -> str:
    head = (f"{'format':<9} {'mAP50':>7} {'mAP50-95':>8} {'ref':>7} {'Δpts':>6} {'max|err|':>9} {'cosine':>9} "
            f"{'ms':>7} {'ms f32':>7} {'thr':>3} {'int8':>4} {'float':>5} {'MB':>6}  result  path")
    lines = [head]
    for r in results:
        delta = None if r.reference_map50_95 is None else (r.map50_95 - r.reference_map50_95) * 100
        lines.append(
            f"{r.format:<9} {_fmt(r.map50, '.4f'):>7} {_fmt(r.map50_95, '.4f'):>8} "
            f"{_fmt(r.reference_map50_95, '.4f'):>7} {_fmt(delta, '+.2f'):>6} {_fmt(r.max_abs_err, '.3g'):>9} "
            f"{_fmt(r.cosine, '.6f'):>9} {_fmt(r.latency_ms, '.2f'):>7} {_fmt(r.latency_f32_ms, '.2f'):>7} "
            f"{_fmt(r.threads, 'd'):>3} {_fmt(r.int8_convs, 'd'):>4} {_fmt(r.float_convs, 'd'):>5} "
            f"{_fmt(r.size_mb, '.2f'):>6}  {'PASS' if r.passed else 'FAIL':<6}  {r.path}")
    for r in results:
        for reason in r.reasons:
            lines.append(f"FAIL {r.path}: {reason}")
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
                   help="export file(s) (.onnx, .xml, .tflite), *_openvino_model dir(s) or the --export-dir folder")
    p.add_argument("--data", required=True, help="dataset YAML")
    p.add_argument("--reference", help="QAT checkpoint the exports came from (default: mAP stored in the metadata)")
    p.add_argument("--json", help="write the results as JSON here")
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
    from src.env import prepare_environment

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
                           runs=args.runs, parity_count=args.parity_images)
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
        out = write_json(results, args.json, tolerance_points=args.tolerance, data=str(args.data))
        LOGGER.info(f"Results written to {out}")
    return EXIT_OK if all(r.passed for r in results) else EXIT_FAILED
