"""ONNX QDQ export of a fake-quantized model: QuantizeLinear/DequantizeLinear carrying the checkpoint's ranges.

Route: ``torch.onnx.export(dynamo=False)`` with every ``FakeQuantize`` in export mode (the TorchScript exporter turns
``torch.fake_quantize_*`` into a Q/DQ pair), then onnxsim (constant folding keeps every Q/DQ pair: it never folds
QuantizeLinear), then :func:`store_int8_weights`, which replaces each ``QuantizeLinear(float weight)`` by the int8
codes it produces. A float weight followed by Q/DQ would leave the file as large as FP32; an int8 initializer feeding
DequantizeLinear is what ONNX Runtime, OpenVINO and TensorRT read as an INT8 weight.

The int8 codes are computed with torch's own fake-quant kernel (``x * (1/s)``, round half to even), not with ONNX's
``x / s``, so ``DequantizeLinear(codes)`` is bit-identical to the weight the PyTorch model convolves with.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from src.errors import QATError
from src.export.common import Coverage, ExportContext, prepare_for_export, single_thread
from src.export import metadata as export_metadata
from src.quantization.fake_quantize import export_mode, fake_quantizers
from src.quantization.utils import fake_quantize

LOGGER = logging.getLogger("yolov8_qat")

INPUT_NAME, OUTPUT_NAME = "images", "output0"
PROTO_NAME = "output1"  # a segmentation model's mask prototypes, named as Ultralytics' exporter does
MAX_IR_VERSION = 10  # ONNX Runtime and OpenVINO read IR <= 10 (Ultralytics caps it the same way)
INT4_OPSET = 21  # DequantizeLinear reads INT4 from opset 21
INT4_RANGE = (-8, 7)
INT_WEIGHT_TYPES = {2: 8, 3: 8, 22: 4}  # TensorProto UINT8, INT8, INT4 -> bits per stored weight


# The weighted ops the placement quantizes (ConvTranspose: a segmentation head's mask-prototype upsampling).
CONV_OPS = frozenset({"Conv", "ConvTranspose"})
# Ops that only move, select or max-pool values: a dequantized tensor stays on its integer grid through them.
AGNOSTIC_OPS = frozenset({"Split", "Slice", "MaxPool", "Resize", "Reshape", "Transpose", "Identity", "Flatten",
                          "Squeeze", "Unsqueeze"})


class ExportError(QATError):
    """An export could not be produced or does not meet its contract (message names the layer/file and the fix)."""


@dataclass
class QDQSummary:
    """How the convolutions of an ONNX graph are fed: by DequantizeLinear (quantized) or by float tensors."""

    quantized_convs: list[str] = field(default_factory=list)
    float_convs: list[str] = field(default_factory=list)
    int8_weight_convs: list[str] = field(default_factory=list)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0

    @property
    def partially_quantized(self) -> list[str]:
        """Convs with a quantized weight but a float input: a quantized conv that lost its input Q/DQ (runs float)."""
        return [c for c in self.float_convs if c.endswith("(partial)")]


# --------------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module,
    path: str | Path,
    imgsz: int | tuple[int, int],
    *,
    opset: int = 17,
    simplify: bool = True,
    dynamic: bool = False,
    metadata: dict | None = None,
    fmt: str = "onnx",
    int4_weights: bool = False,
) -> Path:
    """Export a fake-quantized model (prepared by ``prepare_qat_model``) to a QDQ ONNX file with int8 weights.

    Args:
        model: The in-memory QAT model; it is deep-copied, never modified.
        path: Output ``.onnx`` file (parent folders are created).
        imgsz: Input size (int or (h, w)); a multiple of the model stride.
        opset: ONNX opset (>= 13, per-channel DequantizeLinear).
        simplify: Fold constants with onnxsim (every Q/DQ pair is kept; checked).
        dynamic: Dynamic batch/height/width axes.
        metadata: Key/values written to ``metadata_props`` (see ``src.export.metadata``); None writes none.
        fmt: ``Detect.format`` while tracing (Ultralytics sets the target format's name).
        int4_weights: Store every weight whose codes fit 4 bits as packed INT4 (opset 21, see
            :func:`store_int4_weights`); the default for models with weights of 4 bits or fewer.

    Returns:
        The written path.
    """
    import onnx  # deferred: heavy optional dependency

    if opset < 13:
        raise ExportError(f"export.opset={opset}: per-channel QDQ needs opset >= 13; set export.opset: 17")
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    stride = int(max(getattr(model, "stride", torch.tensor([32]))))
    if h % stride or w % stride:
        raise ExportError(f"export image size {h}x{w} is not a multiple of the model stride {stride}; "
                          f"use e.g. --img-size {max(stride, (max(h, w) // stride) * stride)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = prepare_for_export(model, dynamic, fmt)
    im = torch.zeros(1, 3, h, w)
    names = output_names(m)
    axes = None
    if dynamic:
        axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "anchors"},
                PROTO_NAME: {0: "batch", 2: "mask_height", 3: "mask_width"}}
        axes = {k: v for k, v in axes.items() if k == INPUT_NAME or k in names}
    with single_thread():
        proto = _export_proto(m, im, path, opset, axes, simplify, names)
    if int4_weights:
        proto = store_int4_weights(proto)
    if metadata:
        set_metadata(proto, export_metadata.for_onnx(metadata))
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    LOGGER.debug(f"ONNX QDQ export: {path} ({path.stat().st_size / 1e6:.2f} MB, {count_qdq(proto)[1]} Q/DQ pairs)")
    return path


def output_names(model: nn.Module) -> list[str]:
    """The graph outputs Ultralytics' backends read: ``output0``, and ``output1`` (mask prototypes) for a
    segmentation head."""
    from ultralytics.nn.modules import Segment  # deferred: heavy dependency, loaded when a model is exported

    return [OUTPUT_NAME, PROTO_NAME] if any(isinstance(h, Segment) for h in model.modules()) else [OUTPUT_NAME]


def _export_proto(m: nn.Module, im: torch.Tensor, path: Path, opset: int, axes: dict | None, simplify: bool,
                  names: list[str]):
    import onnx  # deferred: heavy optional dependency

    with torch.no_grad(), export_mode(m), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings are expected here
        torch.onnx.export(m, im, str(path), opset_version=opset, input_names=[INPUT_NAME],
                          output_names=names, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
    proto = onnx.load(str(path))
    pairs_before = count_qdq(proto)
    if simplify:
        proto = simplify_keep_qdq(proto)
    proto = store_int8_weights(remove_noop_casts(proto))
    pairs_after = count_qdq(proto)
    if pairs_after != pairs_before:
        raise ExportError(f"{path}: Q/DQ pairs changed from {pairs_before} to {pairs_after} while folding; "
                          "export with export.simplify: false and report this model")
    return proto


def simplify_keep_qdq(proto):
    """onnxsim constant folding; Constant nodes it creates become initializers again (what runtimes expect)."""
    try:
        import onnxsim  # deferred: heavy optional dependency

        simplified, ok = onnxsim.simplify(proto)
    except Exception as e:  # onnxsim failing must not lose the export: the unsimplified graph is valid
        LOGGER.warning(f"onnxsim failed ({type(e).__name__}: {e}); keeping the unsimplified graph")
        return proto
    if not ok:
        LOGGER.warning("onnxsim could not verify the simplified graph; keeping the unsimplified graph")
        return proto
    if count_qdq(simplified) != count_qdq(proto):
        LOGGER.warning("onnxsim changed the Q/DQ pairs; keeping the unsimplified graph")
        return proto
    # onnxsim logs every removed node into metadata_props (kilobytes of noise Ultralytics would load as attributes)
    props = [(p.key, p.value) for p in simplified.metadata_props if not p.key.startswith("onnxsim.")]
    del simplified.metadata_props[:]
    for k, v in props:
        prop = simplified.metadata_props.add()
        prop.key, prop.value = k, v
    return constants_to_initializers(simplified)


def count_qdq(proto) -> tuple[int, int]:
    """(QuantizeLinear nodes + int8-initializer DequantizeLinear inputs, DequantizeLinear nodes).

    A weight Q folded into an int8 initializer still counts as one Q, so the pair count is invariant under
    :func:`store_int8_weights`.
    """
    inits = {i.name for i in proto.graph.initializer}
    q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    dq_const = sum(n.op_type == "DequantizeLinear" and n.input[0] in inits for n in proto.graph.node)
    dq = sum(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    return q + dq_const, dq


# --------------------------------------------------------------------------------------------------------------------
# Graph passes
# --------------------------------------------------------------------------------------------------------------------
def remove_noop_casts(proto):
    """Bypass ``Identity`` and same-type ``Cast`` nodes (the traced ``x.float()`` / ``.to(dtype)`` calls).

    Left in place they sit between DequantizeLinear and Conv and hide the ``DQ -> Conv`` pattern runtimes fuse.
    """
    import onnx  # deferred: heavy optional dependency

    g = proto.graph
    typed = onnx.shape_inference.infer_shapes(proto)
    elem = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input]}
    elem.update({i.name: i.data_type for i in g.initializer})
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    keep = []
    for n in g.node:
        src = rename.get(n.input[0], n.input[0]) if n.input else ""
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        noop = n.op_type == "Identity" or (n.op_type == "Cast" and to is not None and elem.get(src) == to)
        if noop and n.output[0] not in outputs:
            rename[n.output[0]] = src
            continue
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return proto


def constants_to_initializers(proto):
    """Move ``Constant`` node values into initializers (same tensor names)."""
    from onnx import numpy_helper  # deferred: heavy optional dependency

    g = proto.graph
    keep = []
    for n in g.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = numpy_helper.from_array(numpy_helper.to_array(n.attribute[0].t), n.output[0])
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return proto


class _ConstantEvaluator:
    """Values of tensors that depend only on initializers/Constant nodes (evaluated with ONNX's reference runtime)."""

    def __init__(self, proto):
        from onnx import numpy_helper  # deferred: heavy optional dependency

        self.proto = proto
        self.values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        self.producer = {o: n for n in proto.graph.node for o in n.output}
        self.graph_inputs = {i.name for i in proto.graph.input} - set(self.values)
        self._constant: dict[str, bool] = {}

    def is_constant(self, name: str) -> bool:
        if name in self.values or name == "":
            return True
        if name not in self._constant:
            node = self.producer.get(name)
            self._constant[name] = (name not in self.graph_inputs and node is not None
                                    and all(self.is_constant(i) for i in node.input))
        return self._constant[name]

    def value(self, name: str) -> np.ndarray:
        if name in self.values:
            return self.values[name]
        node = self.producer[name]
        if node.op_type == "Constant":
            from onnx import numpy_helper  # deferred: heavy optional dependency

            self.values[name] = numpy_helper.to_array(node.attribute[0].t)
            return self.values[name]
        inputs = [self.value(i) if i else None for i in node.input]
        from onnx import helper  # deferred: heavy optional dependency
        from onnx.reference import ReferenceEvaluator

        single = helper.make_node(node.op_type, [f"i{k}" if i else "" for k, i in enumerate(node.input)],
                                  [f"o{k}" for k in range(len(node.output))], domain=node.domain)
        single.attribute.extend(node.attribute)
        outs = ReferenceEvaluator(single).run(None, {f"i{k}": v for k, v in enumerate(inputs) if v is not None})
        for o, v in zip(node.output, outs):
            self.values[o] = np.asarray(v)
        return self.values[name]


def store_int8_weights(proto):
    """Replace every ``QuantizeLinear(constant)`` by the integer codes it produces, stored as an initializer.

    Also turns every Q/DQ scale and zero point into an initializer, then drops nodes and initializers nothing reads.
    """
    from onnx import numpy_helper  # deferred: heavy optional dependency

    g = proto.graph
    ev = _ConstantEvaluator(proto)
    qnodes = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    new_inits: dict[str, np.ndarray] = {}
    for n in qnodes:
        for k in (1, 2):
            if len(n.input) > k and n.input[k] and n.input[k] not in ev.values:
                if not ev.is_constant(n.input[k]):
                    raise ExportError(f"{n.name}: quantization parameter {n.input[k]} is not constant")
                new_inits[n.input[k]] = ev.value(n.input[k])
    removed = set()
    for n in qnodes:
        if n.op_type != "QuantizeLinear" or not ev.is_constant(n.input[0]):
            continue
        x = ev.value(n.input[0])
        scale, zp = ev.value(n.input[1]), ev.value(n.input[2])
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        new_inits[n.output[0]] = _torch_quantize(x, scale, zp, axis)
        removed.add(id(n))
    keep = [n for n in g.node if id(n) not in removed]
    del g.node[:]
    g.node.extend(keep)
    existing = {i.name for i in g.initializer}
    for name, v in new_inits.items():
        if name not in existing:
            g.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    return prune(proto)


def store_int4_weights(proto):
    """Pack every integer weight initializer of a ``DequantizeLinear`` whose codes all lie in [-8, 7] (with zero
    point 0) into INT4, two codes per byte, and raise the graph to opset 21, where DequantizeLinear reads INT4.

    Exact by construction: only codes that fit are packed, so 4-bit (and 2-, 3-bit) weights shrink to half their
    int8 storage while every dequantized value stays the same. ONNX Runtime and OpenVINO (which keeps the INT4
    constants in the IR) run the result.
    """
    import onnx  # deferred: heavy optional dependency
    from onnx import helper, numpy_helper, version_converter

    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < INT4_OPSET:
        proto = version_converter.convert_version(proto, INT4_OPSET)
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    readers = Counter(i for n in g.node for i in n.input)
    packed = 0
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or len(n.input) < 3:
            continue
        w, zp = inits[n.input[0]], inits.get(n.input[2])
        if w.data_type != onnx.TensorProto.INT8 or zp is None or zp.data_type != onnx.TensorProto.INT8:
            continue
        codes, zero = numpy_helper.to_array(w), numpy_helper.to_array(zp)
        if zero.any() or codes.min() < INT4_RANGE[0] or codes.max() > INT4_RANGE[1]:
            continue
        if readers.get(n.input[0], 0) > 1:
            continue  # a weight another node reads as int8
        w.CopyFrom(helper.make_tensor(w.name, onnx.TensorProto.INT4, codes.shape, pack_int4(codes), raw=True))
        # zero points of equal shape are one shared initializer after constant folding: each packed weight gets its
        # own INT4 one (DequantizeLinear needs both of one type)
        zp_name = f"{w.name}_zero_point_int4"
        g.initializer.append(helper.make_tensor(zp_name, onnx.TensorProto.INT4, zero.shape, pack_int4(zero),
                                                raw=True))
        n.input[2] = zp_name
        packed += 1
    LOGGER.debug(f"INT4 weights: {packed} initializers packed")
    return prune(proto)


def pack_int4(codes: np.ndarray) -> bytes:
    """Two's-complement 4-bit codes, two per byte, the first in the low nibble (ONNX's INT4 layout)."""
    flat = (codes.astype(np.int8).reshape(-1) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _torch_quantize(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """Integer codes exactly as the model's fake quantization produces them (torch kernels, ``x * (1/s)``).

    ``fake_quantize`` returns ``(q - zp) * s`` in fp32; dividing by ``s`` and rounding recovers ``q`` exactly
    because ``|q - zp| <= 255`` leaves the product far from any rounding ambiguity.
    """
    info = np.iinfo(zp.dtype)
    xt = torch.tensor(np.asarray(x, dtype=np.float32))
    st = torch.tensor(np.asarray(scale, dtype=np.float32))
    zt = torch.tensor(np.asarray(zp, dtype=np.int32))
    per_channel = st.numel() > 1
    ax = axis % xt.dim() if per_channel else None
    y = fake_quantize(xt, st, zt, info.min, info.max, ax)
    shape = [1] * xt.dim()
    if per_channel:
        shape[ax] = -1
    codes = torch.round(y / st.reshape(shape)) + zt.reshape(shape)
    return codes.numpy().astype(zp.dtype)


def prune(proto):
    """Drop nodes whose outputs nobody reads (or that were folded into initializers) and unread initializers."""
    g = proto.graph
    needed = {o.name for o in g.output}
    folded = {i.name for i in g.initializer}  # a node whose output became an initializer is no longer needed
    keep = []
    for n in reversed(list(g.node)):
        if any(o in needed and o not in folded for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    return proto


def set_metadata(proto, metadata: dict) -> None:
    """Write ``metadata`` into ``metadata_props`` as Ultralytics does (``str(value)``), replacing existing keys."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for k, v in [*keep, *((k, v if isinstance(v, str) else str(v)) for k, v in metadata.items())]:
        prop = proto.metadata_props.add()
        prop.key, prop.value = k, v


# --------------------------------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------------------------------
def export_bits_per_weight(proto) -> float:
    """Mean stored bits per conv weight element: 4 for packed INT4, 8 for int8, 32 for float weights."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    bits = count = 0
    for n in g.node:
        if n.op_type not in CONV_OPS:
            continue
        src = producer.get(n.input[1])
        init = inits.get(src.input[0] if src is not None and src.op_type == "DequantizeLinear" else n.input[1])
        if init is None:
            continue
        size = int(np.prod(init.dims))
        bits += size * INT_WEIGHT_TYPES.get(init.data_type, 32)
        count += size
    return bits / count if count else 0.0


def dequantized_source(name: str, producer: dict) -> list:
    """The DequantizeLinear nodes a tensor comes from through quantization-agnostic ops; [] if any path is float.

    Runtimes move Q/DQ through these ops (the values stay on the same integer grid), so a conv after a Split, Concat
    or MaxPool of dequantized tensors still runs INT8.
    """
    node = producer.get(name)
    if node is None:
        return []
    if node.op_type == "DequantizeLinear":
        return [node]
    if node.op_type == "Concat":
        parts = [dequantized_source(i, producer) for i in node.input]
        return [d for p in parts for d in p] if all(parts) else []
    if node.op_type in AGNOSTIC_OPS:
        return dequantized_source(node.input[0], producer)
    return []


def qdq_summary(proto) -> QDQSummary:
    """Which Conv nodes take both input and weight through DequantizeLinear (they run INT8 in every QDQ runtime)."""
    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    s = QDQSummary(
        quantize_nodes=sum(n.op_type == "QuantizeLinear" for n in g.node),
        dequantize_nodes=sum(n.op_type == "DequantizeLinear" for n in g.node),
    )
    for n in g.node:
        if n.op_type not in CONV_OPS:
            continue
        x_q = bool(dequantized_source(n.input[0], producer))
        w_dq = producer.get(n.input[1])
        w_q = w_dq is not None and w_dq.op_type == "DequantizeLinear"
        if x_q and w_q:
            s.quantized_convs.append(n.name)
            if w_dq.input[0] in inits and inits[w_dq.input[0]].data_type in INT_WEIGHT_TYPES:
                s.int8_weight_convs.append(n.name)
        else:
            # A dequantized input into float weights is float by design: a conv the placement keeps float (the head
            # with skip_detection_head, a mixed-precision float layer) reading a tensor other consumers quantize.
            # Lost quantization of a quantized conv shows as a weight DQ without an input DQ, or in the count.
            s.float_convs.append(n.name + (" (partial)" if w_q else ""))
    return s


# --------------------------------------------------------------------------------------------------------------------
# Format hooks (src.export.registry)
# --------------------------------------------------------------------------------------------------------------------
_QDQ_ONNX = "qdq_onnx"


def qdq_onnx(ctx: ExportContext, out_dir: Path | None = None, *, int8_storage: bool = False) -> Path:
    """The generic QDQ ONNX of an export run, exported once.

    The onnx format exports first and writes it into ``out_dir`` (its folder); a format derived from it with onnx
    not requested gets it in a temporary folder. Weights of 4 bits or fewer are packed INT4 unless ``int8_storage``
    (OpenVINO's CPU plugin runs convs with INT4 weights in bf16, with int8 ones in INT8: it asks for int8).
    """
    int4 = has_int4_weights(ctx.model) and not int8_storage
    key = (_QDQ_ONNX, int4)
    if key not in ctx.cache:
        path = (out_dir or ctx.temp_dir("qdq_onnx_")) / f"{ctx.stem}.onnx"
        o = ctx.opts
        ctx.cache[key] = export_onnx(ctx.model, path, ctx.imgsz, opset=o.opset, simplify=o.simplify,
                                     dynamic=o.dynamic, metadata=ctx.metadata, int4_weights=int4)
    return ctx.cache[key]


def has_int4_weights(model: nn.Module) -> bool:
    """Some weight quantizer of ``model`` has 4 bits or fewer: its export stores packed INT4 weights."""
    return any(q.is_weight and q.bit_width <= 4 for q in fake_quantizers(model))


def check(ctx: ExportContext) -> None:
    """Nothing to refuse early: :func:`export_onnx` checks opset and image size itself."""


def export(ctx: ExportContext, out_dir: Path) -> list[Path]:
    return [qdq_onnx(ctx, out_dir)]


def read_metadata(path: Path) -> dict:
    """The file's ``metadata_props``."""
    return export_metadata.read_metadata(path)


def yolo_path(path: Path) -> nullcontext:
    return nullcontext(path)


def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """ONNX Runtime on the CPU at batch 1, ``threads`` intra-op threads."""
    import onnxruntime as ort  # deferred: heavy optional dependency

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    # ONNX Runtime's workers spin after each run by default: interleaved with the other runtimes they would steal
    # the cores those are being timed on
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def runners(path: Path, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    return {"default": ort_runner(path, threads)}


def proto_coverage(proto) -> Coverage:
    """Convs fed by DequantizeLinear on both sides run INT8; one side only is a quantized conv running in float."""
    s = qdq_summary(proto)
    floats = list(s.partially_quantized)
    unquantized = [c for c in s.float_convs if c not in floats]
    return Coverage(len(s.quantized_convs), len(s.quantized_convs) + len(floats), floats, unquantized)


def coverage(path: Path) -> Coverage:
    import onnx  # deferred: heavy optional dependency

    return proto_coverage(onnx.load(str(path)))


def weight_bits(path: Path) -> float:
    import onnx  # deferred: heavy optional dependency

    return export_bits_per_weight(onnx.load(str(path)))

