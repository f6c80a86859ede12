"""Int8 TFLite export that carries the QAT ranges (every quantized conv int8, float detection tail).

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

The detection tail -- DFL softmax and integral conv, anchor/stride decoding, score sigmoid -- stays float, as in
the ONNX and OpenVINO exports (:func:`_decode_tail`): every quantized conv runs int8, and the head's last convs hand
their int8 outputs to it through DEQUANTIZE. Quantizing the tail too would put the decoded boxes on one int8 grid
over the whole image (about 2 px per step at 256 px: -2.6 mAP50-95 points on the demo model).

Tensors no QAT quantizer covers keep a range from calibration (min/max over the calibration images: the head's
last conv outputs), or from an op constraint (LOGISTIC outputs are fixed at 1/256; max-pool, resize, pad, slice,
reshape and transpose take their input's). The calibration images are the run's own training images (synthetic
scenes only when it has no data, with a warning): ranges from other images clip a trained model's scores and boxes.
TFLite has no fused SiLU: it runs conv -> int8 -> LOGISTIC -> MUL, so each conv output before SiLU is one more int8
tensor; its top is fitted to the QAT grid after SiLU (see :func:`pre_silu_range`) and its bottom calibrated. Those
two extra roundings per conv are the only numerical difference from the fake-quant model in the body (simulated in
torch on the demo model: -0.12 mAP50-95 points).
:class:`TFLiteReport` lists where every int8 tensor's range came from; :func:`lsb_error` measures the agreement.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
import torch
from torch import nn

from src.data.synthetic import render_image
from src.errors import QATError
from src.export.common import CalibrationImages, Coverage, ExportContext, prepare_for_export, single_thread
from src.export.discovery import ValidationInputError
from src.integrations import litert
from src.integrations.ultralytics import normalize_coords_wrapper
from src.models.yolov8_qat import QuantConv, Site
from src.quantization.fake_quantize import FakeQuantize
from src.quantization.vocabulary import STORAGE_BITS

LOGGER = logging.getLogger("yolov8_qat")

SIGNATURE = "serving_default"
# A TFLite tensor is the tensor entering a quantizer when they differ by less than this fraction of its step.
MATCH_TOLERANCE_STEPS = 0.05
WEIGHT_OPS = {"CONV_2D": (0, 2, 3, 1), "DEPTHWISE_CONV_2D": (1, 2, 3, 0)}  # torch OIHW -> TFLite layout
CONCAT_OPS = {"CONCATENATION"}
# ops whose int8 output TFLite gives its input's scale and zero point
SAME_AS_INPUT_OPS = {"MAX_POOL_2D", "RESIZE_NEAREST_NEIGHBOR", "PAD", "PADV2", "RESHAPE", "TRANSPOSE", "SPLIT",
                     "SPLIT_V", "STRIDED_SLICE", "SLICE", "GATHER", "SQUEEZE", "EXPAND_DIMS"}
SOURCES = ("qat", "constraint", "calibration")
# images calibrating the tensors no QAT quantizer covers (min/max ranges: the pre-SiLU bottoms and the head logits)
CALIBRATION_IMAGES = 8
SYNTHETIC_SOURCE = "synthetic"
TFLITE_WEIGHT_QMAX = 127
# detail of a tensor whose QAT grid TFLite replaced by its input's (the report's and the warning's marker)
OVERRIDDEN_BY_CONSTRAINT = "TFLite's op constraint"


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
    quantizer: str | None = None  # the QAT activation quantizer whose grid this tensor carries


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
    calibration_source: str = SYNTHETIC_SOURCE  # the dataset (data YAML) the calibration images came from

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
            "calibration_source": self.calibration_source,
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
    # deferred imports: heavy optional dependencies, only checked for here
    try:
        # deferred: heavy optional dependencies
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
    keys = {id(q): k for m in model.modules() if isinstance(getattr(m, "qat_quantizers", None), nn.ModuleDict)
            for k, q in m.qat_quantizers.items()}
    out: dict[int, ActivationQuant] = {}
    for name, q in model.named_modules():
        if not isinstance(q, FakeQuantize) or q.is_weight or not q.fake_quantizing:
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
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, QuantConv) or m.weight_quant is None or not m.weight_quant.fake_quantizing:
            continue
        q = m.weight_quant
        if q.bit_width > STORAGE_BITS:
            raise TFLiteExportError(f"{name}: {q.bit_width}-bit weights do not fit int8 TFLite; use at most "
                                    f"{STORAGE_BITS} bits "
                                    "(quantization.weight.bit_width) or export onnx/openvino instead")
        if q.per_channel and q.ch_axis % m.conv.weight.dim() != 0:
            raise TFLiteExportError(f"{name}: TFLite quantizes conv weights per output channel; this weight is "
                                    f"quantized on axis {q.ch_axis}; set quantization.weight.ch_axis: 0")
        w = q.eval()(m.conv.weight)
        scale, _ = q.calculate_qparams()
        scale = scale.expand(w.shape[0]).clone() if scale.numel() == 1 else scale
        m.conv.weight.copy_(w)
        q.enable_fake_quant(False)
        out.append(WeightQuant(name, w.detach().clone(), scale))
    return out


def _strip_quantizers(model: nn.Module) -> None:
    """Remove every (switched-off) quantizer from the float copy: their uint8 switch buffers do not lower to MLIR."""
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if isinstance(v, Site):
                m.__dict__[k] = None
        if isinstance(m, QuantConv):
            m.weight_quant = None
    for m in model.modules():
        if isinstance(getattr(m, "qat_quantizers", None), nn.ModuleDict):
            del m.qat_quantizers


def _export_copy(model: nn.Module, imgsz: tuple[int, int]) -> tuple[nn.Module, nn.Module]:
    """Deep copy in export form, and the module to convert.

    For a Detect model that is a wrapper making box coordinates input-relative, as Ultralytics' LiteRT export does:
    its ``LiteRTBackend`` always multiplies them back by the image size.
    """
    from ultralytics.nn.modules import Detect  # deferred: heavy dependency, loaded when a model is exported

    m = prepare_for_export(model, False, "litert")
    head = next((h for h in m.modules() if isinstance(h, Detect)), None)
    if head is None or getattr(m, "end2end", False):
        return m, m
    return m, normalize_coords_wrapper(m, imgsz[0], imgsz[1], int(head.nc))


def check_exportable(model: nn.Module) -> None:
    """Refuse early what the int8 TFLite route cannot carry exactly (missing packages, non-8-bit activations); warn
    about a head without DFL."""
    from ultralytics.nn.modules import Pose, Segment  # deferred: heavy dependency, loaded when a model is exported

    head = getattr(model, "model", [None])[-1]
    if isinstance(head, (Segment, Pose)):
        # the input-relative coordinates Ultralytics' LiteRTBackend expects cover boxes only here (mask prototypes
        # and keypoints would come out unscaled): refused rather than exported wrong
        raise TFLiteExportError(f"TFLite export of a {type(head).__name__} head is not supported; export it with "
                                "export.formats [onnx, openvino] (or tensorrt)")
    _require_litert()
    _activation_quantizers(model)
    if getattr(head, "reg_max", 16) == 1:
        # TFLite requantizes every conv output to int8: without DFL the head's last box convs output the box
        # distances themselves, which then lie on a grid calibrated by min/max over CALIBRATION_IMAGES images.
        # Measured on models/pretrained/yolo26n_shapes.pt (PTQ, 256 px): -0.87 mAP50-95 points vs the fake-quant
        # model (ONNX: -0.11); with 64 calibration images -0.65.
        LOGGER.warning("TFLite: this head has no DFL (reg_max 1, e.g. YOLO26): its box distances run on an int8 "
                       "grid in TFLite, which cost 0.6-0.9 mAP50-95 points against the fake-quant model where we "
                       "measured it (ONNX and OpenVINO keep them float); check the export with --validate-exports")


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
def _interpreter(path_or_bytes, preserve: bool = False, reference_kernels: bool = False):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # deferred: heavy optional dependency

    kw = {"model_path": str(path_or_bytes)} if isinstance(path_or_bytes, (str, Path)) else \
        {"model_content": path_or_bytes}
    # intermediate tensors are only kept outside delegates: preserving them means running the builtin kernels
    plain = preserve or reference_kernels
    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if plain else OpResolverType.AUTO
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
    return tensors, litert.ops_details(it)


def _as_tflite_layouts(t: torch.Tensor, shape: tuple[int, ...]) -> list[np.ndarray]:
    """``t`` in each layout a TFLite tensor of ``shape`` may hold it in (as is, or NCHW -> NHWC; both when C=H=W)."""
    out = [t.numpy()] if tuple(t.shape) == shape else []
    if t.dim() == 4 and tuple(t.permute(0, 2, 3, 1).shape) == shape:
        out.append(t.permute(0, 2, 3, 1).numpy())
    return out


def _match_activations(it, seen: list[tuple[ActivationQuant, torch.Tensor]]) -> dict[str, ActivationQuant]:
    """TFLite tensor name -> the quantizer whose input it equals (within MATCH_TOLERANCE_STEPS of a step).

    A TFLite tensor close to several quantizer inputs takes the closest; when a quantizer with another grid is
    about as close, the values cannot tell them apart and the export stops rather than guess.
    """
    tensors, _ = _graph(it)
    candidates: dict[str, list[tuple[float, ActivationQuant]]] = {}
    for idx, d in tensors.items():
        if d["dtype"] != np.float32:
            continue
        try:
            v = it.get_tensor(idx)
        except ValueError:  # a tensor the runtime did not keep
            continue
        for aq, t in seen:
            refs = _as_tflite_layouts(t, tuple(v.shape))
            if not refs:
                continue
            err = min(float(np.abs(v - ref).max()) for ref in refs) / aq.scale
            if err < MATCH_TOLERANCE_STEPS:
                candidates.setdefault(d["name"], []).append((err, aq))
    out: dict[str, ActivationQuant] = {}
    for name, cands in candidates.items():
        cands.sort(key=lambda c: c[0])
        best_err, best = cands[0]
        rival = next((c for c in cands[1:] if (c[1].scale, c[1].zero_point) != (best.scale, best.zero_point)), None)
        if rival is not None and rival[0] <= 2 * best_err + 1e-6:
            raise TFLiteExportError(
                f"TFLite tensor {name} matches the inputs of quantizers {best.key} and {rival[1].key} equally well "
                f"({best_err:.2g} vs {rival[0]:.2g} steps): the activations are too small to tell apart (scale "
                f"{best.scale:.3g}); export a calibrated or trained model, not a random-init one")
        out[name] = best
    return out


def _propagate(it, acts: dict[str, ActivationQuant]) -> tuple[dict, dict]:
    """Carry quantizers through ops that keep their input's grid, and onto concatenations of one quantizer.

    Returns:
        (concat outputs: name -> (quantizer, detail), whose ranges must be written because TFLite gives a concat's
        inputs its output's grid; pass-through outputs: name -> quantizer, which the op constraint sets itself).
    """
    tensors, ops = _graph(it)
    name = lambda i: tensors[i]["name"]  # noqa: E731
    carried = dict(acts)
    concat, passthrough = {}, {}
    for op in ops:  # execution order, so inputs are settled before their consumers
        ins = [name(i) for i in op["inputs"] if i >= 0]
        if op["op_name"] in SAME_AS_INPUT_OPS and ins and ins[0] in carried:
            for o in op["outputs"]:
                if name(o) not in carried:
                    passthrough[name(o)] = carried[name(o)] = carried[ins[0]]
        elif op["op_name"] in CONCAT_OPS and all(n in carried for n in ins):
            keys = {carried[n].key for n in ins}
            out = name(op["outputs"][0])
            if len(keys) == 1 and out not in carried:
                concat[out] = (carried[ins[0]], f"concat of {keys.pop()} inputs")
                carried[out] = carried[ins[0]]
    return concat, passthrough


def _silu(x: float) -> float:
    return x / (1.0 + np.exp(-x))


def _bisect(f, lo: float, hi: float) -> float:
    """Root of an increasing ``f`` on [lo, hi] (f(lo) <= 0 <= f(hi)), to float64 resolution."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return hi


SILU_ARGMIN, SILU_MIN = -1.2784645427610738, -0.2784645427610738


def pre_silu_range(aq: ActivationQuant, calibrated_min: float) -> tuple[float, float] | None:
    """The range of a conv output that feeds SiLU (LOGISTIC + MUL in TFLite) onto the grid of ``aq``.

    Its top is where SiLU reaches the grid's top: anything above clamps there in both models, and a calibrated top
    can stop short of it (the QAT grid then loses its top codes) or overshoot it (a coarser grid for nothing). Its
    bottom is the calibrated minimum, but no lower than where SiLU's left tail is within half a step of 0: below
    that, clipping moves the result by under half a step and a lower bottom would only coarsen the grid.
    """
    lo, hi = (float(v) for v in aq.min_max())
    if hi <= 0:
        return None
    top = _bisect(lambda x: _silu(x) - hi, 0.0, hi + 40.0)
    half = 0.5 * float(np.float32(aq.scale))
    tail = SILU_ARGMIN if half >= -SILU_MIN else _bisect(lambda x: -_silu(x) - half, -100.0, SILU_ARGMIN)
    return min(max(calibrated_min, tail), 0.0), top


def _silu_inputs(it, acts: dict[str, ActivationQuant]) -> dict[str, ActivationQuant]:
    """Tensor name -> quantizer, for each tensor x in MUL(x, LOGISTIC(x)) whose output carries a QAT grid."""
    tensors, ops = _graph(it)
    logistic_of = {op["outputs"][0]: op["inputs"][0] for op in ops if op["op_name"] == "LOGISTIC"}
    out = {}
    for op in ops:
        if op["op_name"] != "MUL" or len(op["inputs"]) != 2:
            continue
        a, b = op["inputs"]
        x = next((t for t, sig in ((a, b), (b, a)) if logistic_of.get(sig) == t), None)
        y = tensors[op["outputs"][0]]["name"]
        if x is not None and y in acts:
            out[tensors[x]["name"]] = acts[y]
    return out


def _decode_tail(it, quantized_weights: set[str], qat_tensors: set[str]) -> list[list[str]]:
    """Output tensor names of each op of the detection tail: everything between the head's quantized convs and the
    graph output.

    Walks back from the output and stops at convs whose weights carry QAT scales and at ops whose output carries a
    QAT grid (a model that ends on a quantizer keeps it to the end), so the tail is the DFL softmax and
    integral conv, the anchor/stride decoding and the score sigmoid -- the ops the ONNX and OpenVINO exports run in
    float. In int8 the decoded boxes would share one grid over the whole image (about 2 px per step at 256 px),
    which costs more mAP50-95 than all the quantized convs together.
    """
    tensors, ops = _graph(it)
    producer = {o: op for op in ops for o in op["outputs"]}
    stack = [d["index"] for d in it.get_output_details()]
    seen, tail = set(), []
    while stack:
        op = producer.get(stack.pop())
        if op is None or op["index"] in seen:
            continue
        seen.add(op["index"])
        if (op["op_name"] in WEIGHT_OPS and tensors[op["inputs"][1]]["name"] in quantized_weights
                or any(tensors[o]["name"] in qat_tensors for o in op["outputs"])):
            continue
        tail.append([tensors[o]["name"] for o in op["outputs"]])
        stack.extend(i for i in op["inputs"] if i >= 0)
    return tail


def _min_max_update(qsv: dict, new: dict) -> dict:
    """Running min/max (the quantizer's default, a moving average, clips the extremes of its own calibration set)."""
    if not qsv:
        return new
    return {**new, "min": np.minimum(qsv["min"], new["min"]), "max": np.maximum(qsv["max"], new["max"])}


def _calibrate(qt, float_path: Path, images: list[torch.Tensor]) -> dict:
    """Ranges of every tensor over the calibration images (min/max), for the tensors no QAT quantizer covers."""
    from ai_edge_quantizer import calibrator  # deferred: heavy optional dependency

    cal = calibrator.Calibrator(str(float_path), num_threads=1, qsv_update_func=_min_max_update)
    cal.calibrate({SIGNATURE: [{"args_0": im.numpy()} for im in images]}, litert.recipe_manager(qt))
    return cal.get_model_qsvs()


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
    # TFLite's int8 weight grid is [-127, 127] whatever our bit width (sub-8-bit codes just use fewer of its
    # levels): 127 * s / 127 gives back exactly s in float64
    bound = TFLITE_WEIGHT_QMAX * wq.scale.double().numpy().reshape(shape)
    return {"min": -bound, "max": bound}


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------
def _default_calibration(imgsz: tuple[int, int], n: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """Synthetic-set scenes (the project's own generator) for the ranges no QAT quantizer covers."""
    rng = np.random.default_rng(0)
    ims = []
    for _ in range(n):
        im, _ = render_image(rng, max(imgsz))
        im = cv2.resize(im[..., ::-1], (imgsz[1], imgsz[0]))
        ims.append(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 255.0)
    return torch.stack(ims)


def _first_images(batches: Iterable[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` images of ``batches``, each (1, C, H, W) float on the CPU (reading stops there: the batches
    may come from a loader over a whole training set)."""
    out: list[torch.Tensor] = []
    for b in batches:
        out += [im[None].float().cpu() for im in b[: n - len(out)]]
        if len(out) >= n:
            break
    return out


def export_tflite(
    model: nn.Module,
    path: str | Path,
    imgsz: int | tuple[int, int],
    metadata: dict | None = None,
    *,
    calibration: CalibrationImages | None = None,
) -> tuple[Path, TFLiteReport]:
    """Export a QAT model to an int8 ``.tflite`` (every quantized conv int8, float decoding) carrying its ranges.

    Args:
        model: The in-memory QAT model (calibrated or trained); deep-copied, never modified.
        path: Output ``.tflite`` file (parent folders are created).
        imgsz: Input size (int or (h, w)).
        metadata: Ultralytics-style metadata (``src.export.metadata.build_metadata``), embedded as the
            ``metadata.json`` zip entry ``LiteRTBackend`` reads. Detect models output input-relative box
            coordinates either way, as Ultralytics' own LiteRT export does.
        calibration: Images for the tensors no QAT quantizer covers, of which the first :data:`CALIBRATION_IMAGES`
            are used: the model's own data (training images letterboxed to ``imgsz``). None: as many scenes from
            the synthetic-set generator, with a warning. The report records which.

    Returns:
        (written path, report).
    """
    _require_litert()
    # deferred: heavy optional dependencies
    import litert_torch
    from ai_edge_quantizer import qtyping, quantizer, recipe

    t0 = time.perf_counter()
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if calibration is None:
        LOGGER.warning("TFLite: the ranges of the tensors no QAT quantizer covers (pre-SiLU conv outputs, "
                       f"head logits) come from {CALIBRATION_IMAGES} synthetic images, not from the model's data; "
                       "scores and boxes of a model trained on other images may be clipped. Pass --data <data.yaml> "
                       "(train_qat.py) to calibrate them on its training images.")
        calibration = CalibrationImages(SYNTHETIC_SOURCE, [_default_calibration((h, w))])
    images = _first_images(calibration.batches, CALIBRATION_IMAGES)
    if not images or tuple(images[0].shape[2:]) != (h, w):
        raise TFLiteExportError(f"calibration images ({calibration.source}) must be NCHW float images of size "
                                f"{h}x{w}, got {tuple(images[0].shape) if images else 'none'}")

    inner, m = _export_copy(model, (h, w))
    quantizers = _activation_quantizers(m)
    weights = _bake_weights(inner)  # named as in the QAT model
    for q in m.modules():  # float values everywhere; the pre-hooks still see what enters each quantizer
        if id(q) in quantizers:
            q.enable_fake_quant(False)
    with torch.no_grad(), _QuantizerInputs(m, quantizers) as rec:
        m(images[0])
    _strip_quantizers(m)
    # quantizers the forward never reaches belong to no exported tensor (an end-to-end head's unused branch)
    used = {aq.key for aq, _ in rec.seen}
    quantizers = {k: aq for k, aq in quantizers.items() if aq.key in used}

    with tempfile.TemporaryDirectory(prefix="tflite_export_") as tmp:
        float_path = Path(tmp) / "float.tflite"
        with single_thread():
            litert_torch.convert(m.eval(), (images[0],)).export(str(float_path))
        it, _ = run_tflite(float_path, images[0].numpy(), preserve=True)
        acts = _match_activations(it, rec.seen)
        via_concat, passthrough = _propagate(it, acts)
        wmatch = _match_weights(it, weights)
        _check_coverage(quantizers, acts, weights, wmatch)
        float_size = float_path.stat().st_size

        qt = quantizer.Quantizer(str(float_path))
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):  # float graph I/O
            qt.update_quantization_recipe(regex=".*", operation_name=op,
                                          algorithm_key=recipe.AlgorithmName.NO_QUANTIZE)
        tail = _decode_tail(it, set(wmatch), {*acts, *via_concat, *passthrough})
        for outputs in tail:  # after the head's last quantized convs, as in the ONNX/OpenVINO exports
            scope = "".join(f"{n};" for n in outputs)  # ai-edge-quantizer's op scope: output names, each + ";"
            qt.update_quantization_recipe(regex=f"^{re.escape(scope)}$",
                                          operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                          algorithm_key=recipe.AlgorithmName.NO_QUANTIZE)
        result = _calibrate(qt, float_path, images)
        pre_silu = {}
        for name, aq in _silu_inputs(it, acts).items():
            rng = pre_silu_range(aq, float(np.min(result[name]["min"])))
            if rng is not None:
                pre_silu[name] = aq
                result[name] = {"min": np.array(rng[0]), "max": np.array(rng[1])}
        for name, aq in {**acts, **{n: aq for n, (aq, _) in via_concat.items()}}.items():
            lo, hi = aq.min_max()
            result[name] = {"min": lo, "max": hi}
        tensors, _ = _graph(it)
        ndim = {d["name"]: len(d["shape"]) for d in tensors.values()}
        for name, (wq, dim) in wmatch.items():
            result[name] = _weight_qsv(wq, dim, ndim[name])
        qt.quantize(calibration_result=result, enable_progress_report=False).export_model(str(path), overwrite=True)
    written = _graph(_interpreter(path, reference_kernels=True))
    _check_tail_float(written[0], tail)

    if metadata:
        with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("metadata.json", json.dumps(metadata))
    report = _report(path, written, acts, via_concat, passthrough, pre_silu, wmatch)
    overridden = [t for t in report.tensors if t.kind == "activation" and OVERRIDDEN_BY_CONSTRAINT in t.detail]
    if overridden:
        LOGGER.warning(f"TFLite: {len(overridden)} tensor(s) keep their producer's int8 grid instead of the QAT "
                       f"quantizer's (TFLite requires it; one rounding the fake-quant model does not have): "
                       + "; ".join(f"{t.name} ({t.detail})" for t in overridden[:4]))
    report.float_size_bytes, report.int8_size_bytes = float_size, path.stat().st_size
    report.seconds, report.calibration_images = time.perf_counter() - t0, len(images)
    report.calibration_source = calibration.source
    LOGGER.info(f"TFLite: {report.summary()}")
    return path, report


def _check_tail_float(tensors: dict[int, dict], tail: list[list[str]]) -> None:
    """Every tail op must have come out float: a scope the recipe regex missed would be quantized silently."""
    int8 = {d["name"] for d in tensors.values() if d["dtype"] == np.int8}
    quantized = [n for outputs in tail for n in outputs if n in int8]
    if quantized:
        raise TFLiteExportError(
            f"the detection tail was meant to stay float but {len(quantized)} of its tensors came out quantized "
            f"(e.g. {quantized[0]}); ai-edge-quantizer did not match its op scope -- export onnx/openvino instead")


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


def _report(path: Path, graph, acts, via_concat, passthrough, pre_silu, wmatch) -> TFLiteReport:
    """Classify every int8 tensor of the written model by where its range came from.

    The quantized model keeps the float model's tensor names (both come from the same flatbuffer), so the
    value-based matches made on the float model carry over by those names.
    """
    tensors, ops = graph
    producer = {o: op for op in ops for o in op["outputs"]}
    weight_inputs = {op["inputs"][1] for op in ops if op["op_name"] in WEIGHT_OPS}
    report = TFLiteReport(str(path))
    for idx, d in tensors.items():
        s, z = _qparams(d)
        if d["dtype"] == np.int32 and len(s):
            report.int32_biases += 1
        if d["dtype"] != np.int8 or not len(s):  # unquantized int8 tensors are the runtime's scratch buffers
            continue
        name, op = d["name"], producer.get(idx)
        op_name = op["op_name"] if op else "constant"
        src = tensors[op["inputs"][0]]["name"] if op and op_name == "QUANTIZE" else None
        key = None
        if name in wmatch:
            kind, source, detail = "weight", "qat", f"weight of {wmatch[name][0].name}"
        elif idx in weight_inputs:
            kind, source, detail = "weight", "calibration", "weight min/max (layer not quantized in QAT)"
        elif name in via_concat or name in acts:
            aq, detail = via_concat.get(name) or (acts[name], f"input of quantizer {acts[name].key}")
            kind, source, key = "activation", "qat", aq.key
            if (s.tolist(), z.tolist()) != ([aq.scale], [aq.tflite_zero_point()]):
                # an op TFLite makes keep its input's grid (a reshape of a slice of a conv output that has no
                # quantizer of its own, e.g. the attention's value tensor) overrode the QAT grid we gave it
                source, key = "constraint", None
                detail = f"{op_name} output: its input's grid, not quantizer {aq.key}'s ({OVERRIDDEN_BY_CONSTRAINT})"
        elif src in acts:  # the float graph input, quantized on entry
            key = acts[src].key
            kind, source, detail = "activation", "qat", f"input of quantizer {key} (QUANTIZE)"
        elif name in pre_silu:
            kind, source, detail = "activation", "calibration", \
                f"pre-SiLU conv output: calibrated bottom, top where SiLU reaches {pre_silu[name].key}'s top"
        elif name in passthrough:
            key = passthrough[name].key
            kind, source, detail = "activation", "constraint", f"{op_name} output: its input's grid ({key})"
        elif op_name in ("LOGISTIC", "SOFTMAX"):
            kind, source, detail = "activation", "constraint", f"{op_name} output (fixed scale 1/256)"
        elif op_name in SAME_AS_INPUT_OPS:
            kind, source, detail = "activation", "constraint", f"{op_name} output: its input's grid"
        elif op_name == "constant":
            kind, source, detail = "activation", "calibration", "constant: range of its own values"
        else:
            kind, source, detail = "activation", "calibration", f"{op_name} output"
        report.tensors.append(TensorRange(name, kind, source, detail, s.tolist(), z.tolist(), key))
    return report


# --------------------------------------------------------------------------------------------------------------------
# Agreement with the fake-quant model
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LSBError:
    """TFLite vs the PyTorch fake-quant model on the same images.

    The output (float: the decoding tail is float) in its own units -- input-relative box coordinates and scores;
    every tensor carrying a QAT grid in steps of that grid.
    """

    output_max: float
    output_mean: float
    qat_tensor_max: float  # over every tensor carrying a QAT grid
    qat_tensor_equal: float  # fraction of those tensors' codes equal to the fake-quant codes


@torch.no_grad()
def lsb_error(model: nn.Module, path: str | Path, images: torch.Tensor, report: TFLiteReport) -> LSBError:
    """Compare the written model with the fake-quant model, at the output and at every QAT-grid tensor.

    A quantizer with several producer sites has several TFLite tensors; each is compared with the same-shaped site
    output it is closest to.
    """
    h, w = images.shape[2:]
    _, ref_model = _export_copy(model, (h, w))
    quantizers = _activation_quantizers(ref_model)
    by_key = {}
    for t in report.tensors:
        if t.source == "qat" and t.quantizer:
            by_key.setdefault(t.quantizer, []).append(t.name)
    out_err, tensor_err, equal, total = [], [], 0, 0
    for im in images:
        x = im[None].float()
        seen: list[tuple[ActivationQuant, torch.Tensor]] = []
        handles = [q.register_forward_hook(lambda mod, a, y, aq=quantizers[id(q)]: seen.append((aq, y)))
                   for q in ref_model.modules() if id(q) in quantizers]
        try:
            ref = ref_model(x)
        finally:
            for hd in handles:
                hd.remove()
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
        it, outs = run_tflite(path, x.numpy(), preserve=True)
        tensors = {d["name"]: d for d in it.get_tensor_details()}
        out_err.append(np.abs(outs[0] - ref.numpy()))
        for aq, y in seen:
            ref_codes = torch.round(y / aq.scale).long() + aq.tflite_zero_point()
            best = None
            for name in by_key.get(aq.key, []):
                codes = torch.from_numpy(it.get_tensor(tensors[name]["index"]).astype(np.int64))
                for r in _as_tflite_layouts(ref_codes, tuple(codes.shape)):
                    diff = (codes - torch.from_numpy(r)).abs()
                    if best is None or int(diff.max()) < int(best.max()):
                        best = diff
            if best is not None:
                tensor_err.append(int(best.max()))
                equal, total = equal + int((best == 0).sum()), total + best.numel()
    out = np.concatenate([e.ravel() for e in out_err])
    return LSBError(float(out.max()), float(out.mean()), float(max(tensor_err, default=0)),
                    equal / max(total, 1))


# --------------------------------------------------------------------------------------------------------------------
# Format hooks (src.export.registry)
# --------------------------------------------------------------------------------------------------------------------
def check(ctx: ExportContext) -> None:
    check_exportable(ctx.model)


def export(ctx: ExportContext, out_dir: Path) -> list[Path]:
    """The .tflite and, beside it, the JSON report of where each int8 tensor's range came from.

    The tensors no QAT quantizer covers are calibrated on the run's own images (``ctx.calibration``), else on
    synthetic ones.
    """
    path, report = export_tflite(ctx.model, out_dir / f"{ctx.stem}.tflite", ctx.imgsz, ctx.metadata,
                                 calibration=ctx.calibration() if ctx.calibration else None)
    report_path = path.with_name(f"{ctx.stem}_tflite_ranges.json")
    report_path.write_text(json.dumps(report.to_dict(), indent=1))
    return [path, report_path]


def read_metadata(path: Path) -> dict:
    """The embedded ``metadata.json``, read by Ultralytics' own reader, as its ``LiteRTBackend`` reads it."""
    from ultralytics.nn.backends.base import BaseBackend  # deferred: heavy dependency

    meta = BaseBackend.read_metadata(path) if zipfile.is_zipfile(path) else {}
    if not meta:
        raise ValidationInputError(f"--model {path}: not a .tflite written by the TFLite export (no embedded "
                                   "metadata.json, which YOLO() needs too); re-export it with tflite in "
                                   "export.formats and export.include_metadata: true")
    try:
        import ai_edge_litert.interpreter  # noqa: F401  # deferred: heavy optional dependency
    except Exception as e:  # a broken native library fails as something other than ImportError
        raise ValidationInputError(f"--model {path}: running a .tflite needs ai-edge-litert ({type(e).__name__}: "
                                   f"{e}); pip install -r requirements-tflite.txt") from None
    return meta


def yolo_path(path: Path) -> nullcontext:
    return nullcontext(path)


def tflite_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The LiteRT interpreter as Ultralytics' ``LiteRTBackend`` runs it (default delegates), boxes back in pixels.

    The export divides box coordinates by the image size inside the graph (as Ultralytics' own LiteRT export does);
    scaling them back gives the units of the other runtimes and of the PyTorch reference.
    """
    from ai_edge_litert.interpreter import Interpreter  # deferred: heavy optional dependency

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


def runners(path: Path, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {"default": tflite_runner(path, threads)}


def tflite_conv_precisions(path: Path) -> tuple[list[str], list[str]]:
    """Convolutions of a .tflite by the dtypes of their input and weight tensors: (int8 names, other names).

    The others are marked ``(partial)`` when one side is int8 (as the ONNX count marks a conv with one Q/DQ), else
    ``(float)``; a name is the op, its index and the last scope of its weight tensor.
    """
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


def coverage(path: Path) -> Coverage:
    """Convs with int8 input and weight run int8; a conv with one int8 side lost half its quantization.

    Float by design, as in ONNX/OpenVINO: the DFL conv of the decoding tail; a quantized conv that lost both sides
    shows in the count.
    """
    int8, others = tflite_conv_precisions(path)
    floats = [n for n in others if n.endswith("(partial)")]
    unquantized = [n for n in others if not n.endswith("(partial)")]
    return Coverage(len(int8), len(int8) + len(floats), floats, unquantized)


def weight_bits(path: Path) -> float:
    tensors, ops = _graph(_interpreter(path, reference_kernels=True))
    bits = count = 0
    for op in ops:
        if op["op_name"] not in WEIGHT_OPS:
            continue
        w = tensors[op["inputs"][1]]
        n = int(np.prod(w["shape"]))
        bits += np.dtype(w["dtype"]).itemsize * 8 * n
        count += n
    return bits / count if count else 0.0
