"""Full-integer (int8) TFLite export that carries the QAT ranges.

Route (the one Ultralytics' own LiteRT export takes, with the calibration step replaced where QAT knows better):

1. A float copy of the QAT model: every weight replaced by its fake-quantized value (``q * s``), every quantizer
   switched off, Detect in export form and coordinates normalized by the image size (``_NormalizeCoords``, which
   Ultralytics' ``LiteRTBackend`` undoes), converted with ``litert_torch``.
2. ``ai_edge_quantizer`` with the static int8 recipe (float graph input/output, as Ultralytics' exports have) is
   calibrated as usual, and then its result is overwritten for every tensor that a QAT quantizer covers:
   activations get ``min = (qmin - zp) * s``, ``max = (qmax - zp) * s`` (float64, which the quantizer maps back to
   exactly ``s`` and ``zp - 128`` for unsigned 8-bit quantizers), weights get ``[-127 s, 127 s]`` per output channel.
3. Which TFLite tensor a quantizer covers is decided by value, never by name: the float TFLite model and the float
   torch copy run on the same image, and a TFLite tensor takes a quantizer when it equals the tensor entering that
   quantizer to within a twentieth of its step; weights are matched by exact equality (after the OIHW -> OHWI
   layout change). A concatenation whose inputs all carry one quantizer carries it on its output too (TFLite
   requires concat inputs and output to share one scale, and the placement shares one quantizer there).

Tensors no QAT quantizer covers keep a range from calibration (the conv output before SiLU, which TFLite splits
into LOGISTIC + MUL, the head's final convs and the box/score decoding), or from an op constraint (LOGISTIC and
SOFTMAX outputs are fixed at 1/256, and max-pool, resize, pad, slice, reshape and transpose take their input's).
:class:`TFLiteReport` lists where every int8 tensor's range came from.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from src.errors import QATError

LOGGER = logging.getLogger("yolov8_qat")

SIGNATURE = "serving_default"
# A TFLite tensor is the tensor entering a quantizer when they differ by less than this fraction of its step.
MATCH_TOLERANCE_STEPS = 0.05
WEIGHT_OPS = {"CONV_2D": (0, 2, 3, 1), "DEPTHWISE_CONV_2D": (1, 2, 3, 0)}  # torch OIHW -> TFLite layout
CONCAT_OPS = {"CONCATENATION"}
SOURCES = ("qat", "constraint", "calibration")


class TFLiteExportError(QATError):
    """The TFLite export failed or does not carry the QAT ranges (the message names the tensor and the fix)."""


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TensorRange:
    """Where one int8 tensor of the exported model got its quantization parameters."""

    name: str
    kind: str  # "activation" or "weight"
    source: str  # one of SOURCES
    detail: str
    scale: list[float]
    zero_point: list[int]


@dataclass
class TFLiteReport:
    """What :func:`export_tflite` wrote and how its ranges were set."""

    path: str
    tensors: list[TensorRange] = field(default_factory=list)
    int32_biases: int = 0
    float_size_bytes: int = 0
    int8_size_bytes: int = 0
    seconds: float = 0.0
    calibration_images: int = 0

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of int8 tensors per kind and source."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            out.setdefault(t.kind, {s: 0 for s in SOURCES})[t.source] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        parts = [f"{k}s: " + ", ".join(f"{n} {s}" for s, n in v.items()) for k, v in c.items()]
        ratio = self.int8_size_bytes / max(self.float_size_bytes, 1)
        return (f"{Path(self.path).name}: {'; '.join(parts)}; {self.int32_biases} int32 biases; "
                f"{self.int8_size_bytes / 1e6:.2f} MB ({ratio:.3f}x the FP32 TFLite); {self.seconds:.1f} s")

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "counts": self.counts(),
            "int32_biases": self.int32_biases,
            "float_size_bytes": self.float_size_bytes,
            "int8_size_bytes": self.int8_size_bytes,
            "seconds": self.seconds,
            "calibration_images": self.calibration_images,
            "tensors": [vars(t) for t in self.tensors],
        }


# --------------------------------------------------------------------------------------------------------------------
# The torch side: float copy, baked weights, quantizer inputs
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class WeightQuant:
    """A conv weight as the QAT model convolves with it, and its per-output-channel quantization."""

    name: str
    weight: torch.Tensor  # fake-quantized values, OIHW
    scale: torch.Tensor  # (out_channels,) float32
    qmax: int


@dataclass
class ActivationQuant:
    """One activation quantizer's integer grid."""

    key: str
    scale: float  # float32 value
    zero_point: int
    qmin: int
    qmax: int
    signed: bool

    def min_max(self) -> tuple[np.ndarray, np.ndarray]:
        """The range whose int8 asymmetric parameters are exactly this grid (computed in float64)."""
        s = np.float64(np.float32(self.scale))
        return (np.array((self.qmin - self.zero_point) * s, dtype=np.float64),
                np.array((self.qmax - self.zero_point) * s, dtype=np.float64))

    def tflite_zero_point(self) -> int:
        """Zero point on TFLite's signed int8 grid (unsigned codes shift by -128, the scale stays)."""
        return self.zero_point if self.signed else self.zero_point - 128


def _require_litert():
    try:
        import litert_torch  # noqa: F401
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401
        from ai_edge_quantizer import quantizer  # noqa: F401
    except Exception as e:  # any import failure (missing package, broken native library) means: no TFLite export
        raise TFLiteExportError(
            f"TFLite export needs litert-torch, ai-edge-litert and ai-edge-quantizer ({type(e).__name__}: {e}); "
            "install them (pip install litert-torch ai-edge-litert ai-edge-quantizer) or remove tflite from "
            "export.formats") from None


def _activation_quantizers(model: nn.Module) -> dict[int, ActivationQuant]:
    """Every enabled activation FakeQuantize (by module id), described by its integer grid."""
    from src.quantization.fake_quantize import FakeQuantize

    keys = {id(q): k for k, q in getattr(model, "qat_quantizers", {}).items()} if hasattr(model, "qat_quantizers") \
        else {}
    out: dict[int, ActivationQuant] = {}
    for name, q in model.named_modules():
        if not isinstance(q, FakeQuantize) or q.is_weight or not bool(q.fake_quant_enabled):
            continue
        if q.bit_width != 8:
            raise TFLiteExportError(
                f"activation quantizer {keys.get(id(q), name)} has {q.bit_width} bits; int8 TFLite carries only "
                "8-bit activation grids exactly; retrain with 8-bit activations or export onnx/openvino instead")
        scale, zp = q.calculate_qparams()
        out[id(q)] = ActivationQuant(keys.get(id(q), name), float(scale), int(zp), q.qmin, q.qmax, q.signed)
    return out


@torch.no_grad()
def _bake_weights(model: nn.Module) -> list[WeightQuant]:
    """Replace every quantized conv weight by its fake-quantized value and switch its quantizer off."""
    from src.models.yolov8_qat import QuantConv

    out = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantConv) or m.weight_quant is None or not bool(m.weight_quant.fake_quant_enabled):
            continue
        q = m.weight_quant
        if q.per_channel and q.ch_axis % m.conv.weight.dim() != 0:
            raise TFLiteExportError(f"{name}: TFLite quantizes conv weights per output channel; this weight is "
                                    f"quantized on axis {q.ch_axis}; set quantization.weight.ch_axis: 0")
        w = q.eval()(m.conv.weight)
        scale, _ = q.calculate_qparams()
        scale = scale.expand(w.shape[0]).clone() if scale.numel() == 1 else scale
        m.conv.weight.copy_(w)
        q.enable_fake_quant(False)
        out.append(WeightQuant(name, w.detach().clone(), scale, q.qmax))
    return out


def _strip_quantizers(model: nn.Module) -> None:
    """Remove every (switched-off) quantizer from the float copy: their uint8 switch buffers do not lower to MLIR."""
    from src.models.yolov8_qat import QuantConv, Site

    for m in model.modules():
        for k, v in list(vars(m).items()):
            if isinstance(v, Site):
                m.__dict__[k] = None
        if isinstance(m, QuantConv):
            m.weight_quant = None
    for m in model.modules():
        if isinstance(getattr(m, "qat_quantizers", None), nn.ModuleDict):
            del m.qat_quantizers


def _export_copy(model: nn.Module, imgsz: tuple[int, int], metadata: dict | None) -> nn.Module:
    """Deep copy in export form; detection outputs get input-relative coordinates, as Ultralytics' LiteRT export."""
    from src.export.onnx_qdq import prepare_for_export

    m = prepare_for_export(model, False, "litert")
    meta = metadata or {}
    if meta.get("task") == "detect" and not meta.get("end2end", False):
        from ultralytics.utils.export.engine import _NormalizeCoords

        m = _NormalizeCoords(m, imgsz[0], imgsz[1], "detect", len(meta.get("names", {})), None).eval()
    return m


class _QuantizerInputs:
    """Records, for each activation quantizer, the tensors entering it during one forward pass."""

    def __init__(self, model: nn.Module, quantizers: dict[int, ActivationQuant]):
        self.seen: list[tuple[ActivationQuant, torch.Tensor]] = []
        self.handles = []
        for q in model.modules():
            if id(q) in quantizers:
                hook = lambda mod, args, kwargs, aq=quantizers[id(q)]: self.seen.append((aq, args[0].detach()))
                self.handles.append(q.register_forward_pre_hook(hook, with_kwargs=True))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------------------
# The TFLite side
# --------------------------------------------------------------------------------------------------------------------
def _interpreter(path_or_bytes, preserve: bool = False):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kw = {"model_path": str(path_or_bytes)} if isinstance(path_or_bytes, (str, Path)) else \
        {"model_content": path_or_bytes}
    # intermediate tensors are only kept outside delegates: preserving them means running the builtin kernels
    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if preserve else OpResolverType.AUTO
    it = Interpreter(**kw, num_threads=1, experimental_preserve_all_tensors=preserve,
                     experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    return it


def run_tflite(path: str | Path, image: np.ndarray, preserve: bool = False):
    """Run a .tflite on one NCHW float image; returns (interpreter, outputs as float arrays)."""
    it = _interpreter(path, preserve)
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], image.astype(np.float32))
    it.invoke()
    outs = []
    for d in it.get_output_details():
        y = it.get_tensor(d["index"])
        if d["dtype"] in (np.int8, np.int16):
            s, z = d["quantization"]
            y = (y.astype(np.float32) - z) * s
        outs.append(y)
    return it, outs


def _graph(it) -> tuple[dict[int, dict], list[dict]]:
    tensors = {d["index"]: d for d in it.get_tensor_details()}
    return tensors, it._get_ops_details()


def _as_tflite_layout(t: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray | None:
    """``t`` in the layout of a TFLite tensor of ``shape`` (same, or NCHW -> NHWC), or None when neither fits."""
    if tuple(t.shape) == shape:
        return t.numpy()
    if t.dim() == 4 and tuple(t.permute(0, 2, 3, 1).shape) == shape:
        return t.permute(0, 2, 3, 1).numpy()
    return None


def _match_activations(it, seen: list[tuple[ActivationQuant, torch.Tensor]]) -> dict[str, ActivationQuant]:
    """TFLite tensor name -> the quantizer whose input it equals (within MATCH_TOLERANCE_STEPS of a step)."""
    tensors, _ = _graph(it)
    values = {}
    for idx, d in tensors.items():
        if d["dtype"] != np.float32:
            continue
        try:
            values[d["name"]] = it.get_tensor(idx)
        except ValueError:  # tensors freed by the runtime
            continue
    out: dict[str, ActivationQuant] = {}
    for aq, t in seen:
        tol = MATCH_TOLERANCE_STEPS * aq.scale
        for name, v in values.items():
            ref = _as_tflite_layout(t, tuple(v.shape))
            if ref is None or float(np.abs(v - ref).max()) >= tol:
                continue
            if name in out and out[name].key != aq.key:
                raise TFLiteExportError(f"TFLite tensor {name} equals the inputs of two quantizers "
                                        f"({out[name].key}, {aq.key}); export from a calibrated/trained model")
            out[name] = aq
    return out


def _propagate_concat(it, acts: dict[str, ActivationQuant]) -> dict[str, tuple[ActivationQuant, str]]:
    """Concat outputs whose inputs all carry one quantizer carry it too (TFLite concat shares one scale)."""
    tensors, ops = _graph(it)
    out = {}
    for op in ops:
        if op["op_name"] not in CONCAT_OPS:
            continue
        keys = {acts[tensors[i]["name"]].key if tensors[i]["name"] in acts else None for i in op["inputs"]}
        if len(keys) == 1 and None not in keys:
            name = tensors[op["outputs"][0]]["name"]
            out[name] = (acts[tensors[op["inputs"][0]]["name"]], "concat of " + keys.pop())
            acts[name] = out[name][0]
    return out


def _match_weights(it, weights: list[WeightQuant]) -> dict[str, tuple[WeightQuant, int]]:
    """TFLite constant tensor name -> (the QAT weight it equals exactly, quantized dimension)."""
    tensors, ops = _graph(it)
    out: dict[str, tuple[WeightQuant, int]] = {}
    for op in ops:
        perm = WEIGHT_OPS.get(op["op_name"])
        if perm is None:
            continue
        d = tensors[op["inputs"][1]]
        v = it.get_tensor(d["index"])
        for wq in weights:
            ref = wq.weight.permute(*perm)
            if tuple(ref.shape) == tuple(v.shape) and np.array_equal(ref.numpy(), v):
                out[d["name"]] = (wq, perm.index(0))
                break
    return out


def _weight_qsv(wq: WeightQuant, dim: int, ndim: int) -> dict[str, np.ndarray]:
    shape = [1] * ndim
    shape[dim] = -1
    bound = wq.qmax * wq.scale.double().numpy().reshape(shape)  # qmax*s/qmax gives back s exactly in float64
    return {"min": -bound, "max": bound}


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------
def _default_calibration(imgsz: tuple[int, int], n: int = 8) -> torch.Tensor:
    """Synthetic-set scenes (the project's own generator) for the ranges no QAT quantizer covers."""
    import cv2

    from src.data.synthetic import render_image

    rng = np.random.default_rng(0)
    ims = []
    for _ in range(n):
        im, _ = render_image(rng, max(imgsz))
        im = cv2.resize(im[..., ::-1], (imgsz[1], imgsz[0]))
        ims.append(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255.0)
    return torch.stack(ims)


def export_tflite(
    model: nn.Module,
    path: str | Path,
    imgsz: int | tuple[int, int],
    metadata: dict | None = None,
    *,
    calibration_images: torch.Tensor | Iterable[torch.Tensor] | None = None,
) -> tuple[Path, TFLiteReport]:
    """Export a QAT model to a full-integer int8 ``.tflite`` carrying its quantization ranges.

    Args:
        model: The in-memory QAT model (calibrated or trained); deep-copied, never modified.
        path: Output ``.tflite`` file (parent folders are created).
        imgsz: Input size (int or (h, w)).
        metadata: Ultralytics-style metadata (``src.export.metadata.build_metadata``), embedded as the
            ``metadata.json`` zip entry ``LiteRTBackend`` reads; with ``task: detect`` box coordinates are exported
            relative to the image size, as Ultralytics' own LiteRT export does.
        calibration_images: NCHW float images in [0, 1] (a tensor or an iterable of batches) for the tensors no QAT
            quantizer covers; default: 8 scenes from the synthetic-set generator.

    Returns:
        (written path, report).
    """
    _require_litert()
    import litert_torch
    from ai_edge_quantizer import qtyping, quantizer, recipe

    t0 = time.perf_counter()
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if calibration_images is None:
        calibration_images = _default_calibration((h, w))
    batches = [calibration_images] if isinstance(calibration_images, torch.Tensor) else list(calibration_images)
    images = [im[None].float() for b in batches for im in b]
    if not images or tuple(images[0].shape[2:]) != (h, w):
        raise TFLiteExportError(f"calibration_images must be NCHW float images of size {h}x{w}, got "
                                f"{tuple(images[0].shape) if images else 'none'}")

    m = _export_copy(model, (h, w), metadata)
    quantizers = _activation_quantizers(m)
    weights = _bake_weights(m)
    for q in m.modules():  # float values everywhere; the pre-hooks still see what enters each quantizer
        if id(q) in quantizers:
            q.enable_fake_quant(False)
    with torch.no_grad(), _QuantizerInputs(m, quantizers) as rec:
        m(images[0])
    _strip_quantizers(m)

    with tempfile.TemporaryDirectory(prefix="tflite_export_") as tmp:
        float_path = Path(tmp) / "float.tflite"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            litert_torch.convert(m.eval(), (images[0],)).export(str(float_path))
        finally:
            torch.set_num_threads(threads)
        it, _ = run_tflite(float_path, images[0].numpy(), preserve=True)
        acts = _match_activations(it, rec.seen)
        via_concat = _propagate_concat(it, acts)
        wmatch = _match_weights(it, weights)
        _check_coverage(quantizers, acts, weights, wmatch)
        float_size = float_path.stat().st_size

        qt = quantizer.Quantizer(str(float_path))
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):  # float graph I/O
            qt.update_quantization_recipe(regex=".*", operation_name=op,
                                          algorithm_key=recipe.AlgorithmName.NO_QUANTIZE)
        result = qt.calibrate({SIGNATURE: [{"args_0": im.numpy()} for im in images]}, num_threads=1)
        for name, aq in acts.items():
            lo, hi = aq.min_max()
            result[name] = {"min": lo, "max": hi}
        tensors, _ = _graph(it)
        ndim = {d["name"]: len(d["shape"]) for d in tensors.values()}
        for name, (wq, dim) in wmatch.items():
            result[name] = _weight_qsv(wq, dim, ndim[name])
        qt.quantize(calibration_result=result, enable_progress_report=False).export_model(str(path), overwrite=True)

    if metadata:
        with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("metadata.json", json.dumps(metadata))
    report = _report(path, acts, via_concat, wmatch)
    report.float_size_bytes, report.int8_size_bytes = float_size, path.stat().st_size
    report.seconds, report.calibration_images = time.perf_counter() - t0, len(images)
    LOGGER.info(f"TFLite: {report.summary()}")
    return path, report


def _check_coverage(quantizers, acts, weights, wmatch) -> None:
    """Every quantizer and every quantized weight must have found its TFLite tensor."""
    found = {aq.key for aq in acts.values()}
    missing = sorted(aq.key for aq in quantizers.values() if aq.key not in found)
    wfound = {id(wq) for wq, _ in wmatch.values()}
    wmissing = [wq.name for wq in weights if id(wq) not in wfound]
    if missing or wmissing:
        raise TFLiteExportError(
            f"no TFLite tensor matched activation quantizer(s) {missing} / weight(s) {wmissing[:5]}; the float "
            "conversion changed these values (an unsupported layer?) -- export onnx/openvino, which keep every "
            "quantizer as a Q/DQ node")


# --------------------------------------------------------------------------------------------------------------------
# Read back
# --------------------------------------------------------------------------------------------------------------------
def _qparams(d: dict) -> tuple[np.ndarray, np.ndarray]:
    p = d["quantization_parameters"]
    return np.asarray(p["scales"], dtype=np.float32), np.asarray(p["zero_points"], dtype=np.int64)


def _report(path: Path, acts, via_concat, wmatch) -> TFLiteReport:
    """Classify every int8 tensor of the written model by where its range came from."""
    it = _interpreter(path)
    tensors, ops = _graph(it)
    producer = {o: op["op_name"] for op in ops for o in op["outputs"]}
    consumers: dict[int, list[str]] = {}
    for op in ops:
        for i in op["inputs"]:
            consumers.setdefault(i, []).append(op["op_name"])
    by_key = {}
    for aq in acts.values():
        by_key.setdefault((np.float32(aq.scale), aq.tflite_zero_point()), aq.key)
    report = TFLiteReport(str(path))
    for idx, d in tensors.items():
        if d["dtype"] == np.int32 and len(_qparams(d)[0]):
            report.int32_biases += 1
        if d["dtype"] != np.int8:
            continue
        s, z = _qparams(d)
        name = d["name"]
        if name in wmatch:
            t = TensorRange(name, "weight", "qat", wmatch[name][0].name, s.tolist(), z.tolist())
        elif any(c in WEIGHT_OPS for c in consumers.get(idx, [])) and idx not in producer:
            t = TensorRange(name, "weight", "calibration", "weight min/max (layer not quantized in QAT)",
                            s.tolist(), z.tolist())
        elif name in acts:
            detail = via_concat[name][1] if name in via_concat else f"input of quantizer {acts[name].key}"
            t = TensorRange(name, "activation", "qat", detail, s.tolist(), z.tolist())
        else:
            op = producer.get(idx, "graph input")
            if op in ("LOGISTIC", "SOFTMAX"):
                source, detail = "constraint", f"{op} output (fixed 1/256)"
            elif op in ("QUANTIZE",) or op == "graph input":
                source, detail = "calibration", f"{op} output"
            else:
                key = by_key.get((np.float32(s[0]), int(z[0]))) if len(s) == 1 else None
                constrained = op in ("MAX_POOL_2D", "RESIZE_NEAREST_NEIGHBOR", "PAD", "PADV2", "RESHAPE",
                                     "TRANSPOSE", "SPLIT", "SPLIT_V", "STRIDED_SLICE", "SLICE", "GATHER",
                                     "CONCATENATION")
                source = "constraint" if constrained else "calibration"
                detail = f"{op} output" + (f" (same grid as QAT quantizer {key})" if key else "")
            t = TensorRange(name, "activation", source, detail, s.tolist(), z.tolist())
        report.tensors.append(t)
    return report
