"""TensorRT-ready QDQ ONNX, a rules checker for it, the trtexec command, and an engine build where TensorRT runs.

TensorRT (explicit quantization) builds INT8 kernels from Q/DQ nodes it can fuse, under rules the generic QDQ file
does not guarantee:

* INT8 Q/DQ only: signed int8 with zero point 0 (no uint8, no asymmetric activations);
* activations per tensor, weights per channel on the output-channel axis (0) with constant int8 weights;
* a DequantizeLinear directly in front of every quantized conv input: TensorRT fuses ``DQ -> Conv`` (and ``Conv ->
  act -> Q`` behind it). Our QDQ export places activation quantizers on producer outputs, so a conv after a
  Split/Concat/MaxPool would be fed through those ops; :func:`requantize_conv_inputs` re-inserts the same Q/DQ
  (same scale and zero point, so values are bit-identical) right before such convs.

Which activations are symmetric is decided before calibration (``--qconfig tensorrt`` or ``tensorrt`` in
``export.formats``); nothing is re-derived here, so a model trained with asymmetric uint8 activations is refused.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from src.errors import QATError
from src.export.common import Coverage, ExportContext
from src.export.registry import FORMATS
from src.export.onnx_qdq import AGNOSTIC_OPS, CONV_OPS, ExportError, dequantized_source, export_onnx, proto_coverage
# a TensorRT-ready ONNX is read and run here as an ONNX file: these format hooks are the onnx format's
from src.export.onnx_qdq import read_metadata, runners, weight_bits, yolo_path  # noqa: F401

LOGGER = logging.getLogger("yolov8_qat")

SYMMETRIC_HINT = (f"{FORMATS['tensorrt'].symmetric_activations} (signed symmetric): retrain/recalibrate with "
                  "--qconfig tensorrt, or put tensorrt in export.formats before calibration (it switches activations "
                  "to symmetric qint8)")


@dataclass
class TensorRTExport:
    """Paths of a TensorRT export; ``engine`` is None when no engine was built (``engine_note`` says why)."""

    onnx: Path
    script: Path
    command: str
    engine: Path | None
    engine_note: str


def check_model_symmetric(model) -> None:
    """Refuse a model whose activation quantizers are not signed symmetric (what TensorRT requires)."""
    placement = getattr(model, "qat_placement", None)
    if placement is None:
        raise ExportError("TensorRT export needs a QAT model (prepare_qat_model / a QAT checkpoint)")
    bad = [g for g in placement.groups if not (g.symmetric and g.signed)]
    if bad:
        names = ", ".join(f"{g.key} ({g.sites[0]}{', ...' if len(g.sites) > 1 else ''})" for g in bad[:4])
        raise ExportError(f"TensorRT export: {len(bad)} activation quantizer(s) are asymmetric/unsigned, e.g. {names}. "
                          + SYMMETRIC_HINT)


def export_tensorrt(
    model,
    out_dir: str | Path,
    stem: str,
    imgsz: int | tuple[int, int],
    *,
    opset: int = 17,
    simplify: bool = True,
    metadata: dict | None = None,
    build: bool = True,
) -> TensorRTExport:
    """Write ``<out_dir>/<stem>.onnx`` (TensorRT-ready QDQ), ``build_engine.sh`` and, where possible, the engine.

    Args:
        model: The QAT model with symmetric signed activations.
        out_dir: ``<export-dir>/tensorrt``.
        stem: File stem (``quantized_model``).
        imgsz: Input size.
        build: Try building ``<stem>.engine`` through the TensorRT Python API (needs ``tensorrt`` and a CUDA GPU).
    """
    import onnx  # deferred: heavy optional dependency

    check_model_symmetric(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = export_onnx(model, out_dir / f"{stem}.onnx", imgsz, opset=opset, simplify=simplify, metadata=metadata)
    proto = requantize_conv_inputs(onnx.load(str(path)))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    violations = check_tensorrt_rules(path)
    if violations:
        raise ExportError(f"{path} breaks TensorRT's QDQ rules:\n  " + "\n  ".join(violations))
    engine_path = out_dir / f"{stem}.engine"
    command = trtexec_command(path, engine_path)
    script = out_dir / "build_engine.sh"
    script.write_text("#!/usr/bin/env bash\n# Build the TensorRT engine from the QDQ ONNX (explicit quantization: the "
                      "INT8 ranges are the QAT ones in the file, no calibration).\nset -euo pipefail\n"
                      f'cd "$(dirname "$0")"\n{trtexec_command(path.name, engine_path.name)}\n')
    script.chmod(0o755)
    LOGGER.info(f"TensorRT engine command (also in {script}):\n  {command}")
    engine, note = (None, "engine build not requested")
    if build:
        engine, note = build_engine(path, engine_path, metadata)
    if engine is None:
        LOGGER.warning(f"TensorRT engine not built: {note}. The TensorRT-ready ONNX is {path}; build the engine "
                       f"on a machine with TensorRT with: {command}")
    return TensorRTExport(path, script, command, engine, note)


# --------------------------------------------------------------------------------------------------------------------
# Graph pass
# --------------------------------------------------------------------------------------------------------------------
def requantize_conv_inputs(proto):
    """Insert ``Q -> DQ`` (same parameters as the source DQ) directly before each conv fed through agnostic ops.

    ``Q(DQ(q)) == q`` exactly for 8-bit codes, so outputs do not change; TensorRT then sees ``DQ -> Conv``.
    """
    from onnx import helper  # deferred: heavy optional dependency

    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    new_nodes: dict[int, list] = {}
    for idx, n in enumerate(g.node):
        if n.op_type not in CONV_OPS:
            continue
        src = producer.get(n.input[0])
        if src is None or src.op_type == "DequantizeLinear" or src.op_type not in AGNOSTIC_OPS | {"Concat"}:
            continue
        dqs = dequantized_source(n.input[0], producer)
        if not dqs:
            continue
        params = {(d.input[1], d.input[2] if len(d.input) > 2 else "") for d in dqs}
        if len(params) != 1:
            continue  # mixed scales: reported by check_tensorrt_rules, not silently re-scaled
        scale, zp = next(iter(params))
        base = f"{n.name}/input_requant"
        q = helper.make_node("QuantizeLinear", [n.input[0], scale, zp], [f"{base}/q"], name=f"{base}/QuantizeLinear")
        dq = helper.make_node("DequantizeLinear", [f"{base}/q", scale, zp], [f"{base}/dq"],
                              name=f"{base}/DequantizeLinear")
        n.input[0] = f"{base}/dq"
        new_nodes[idx] = [q, dq]
    ordered = []
    for idx, n in enumerate(g.node):
        ordered.extend(new_nodes.get(idx, []))
        ordered.append(n)
    del g.node[:]
    g.node.extend(ordered)
    return proto


# --------------------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------------------
def check_tensorrt_rules(onnx_path) -> list[str]:
    """TensorRT explicit-quantization rules broken by an ONNX file (empty list: the file is TensorRT-ready).

    Args:
        onnx_path: Path or loaded ``ModelProto``.

    Returns:
        One message per violation, naming the node and the fix.
    """
    import onnx  # deferred: heavy optional dependency
    from onnx import numpy_helper

    proto = onnx_path if isinstance(onnx_path, onnx.ModelProto) else onnx.load(str(onnx_path))
    g = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out: list[str] = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        out.append(f"opset {opset}: per-channel Q/DQ needs opset >= 13 (export.opset: 17)")
    bad_zp: list[str] = []
    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) < 3 or n.input[2] not in inits or n.input[1] not in inits:
            out.append(f"{n.name}: scale/zero point must be constant initializers")
            continue
        scale, zp = inits[n.input[1]], inits[n.input[2]]
        if zp.dtype != np.int8 or np.any(zp != 0):
            bad_zp.append(f"{n.name} ({zp.dtype} zero point {zp.ravel()[0]})")
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            out.append(f"{n.name}: scale must be finite and > 0")
    if bad_zp:
        shown = ", ".join(bad_zp[:6]) + (f" and {len(bad_zp) - 6} more" if len(bad_zp) > 6 else "")
        out.append(f"{len(bad_zp)} Q/DQ node(s) are not int8 with zero point 0: {shown}. {SYMMETRIC_HINT}")
    for n in g.node:
        if n.op_type not in CONV_OPS:
            continue
        w_dq = producer.get(n.input[1])
        x_src = producer.get(n.input[0])
        w_quantized = w_dq is not None and w_dq.op_type == "DequantizeLinear"
        x_quantized = bool(dequantized_source(n.input[0], producer))
        if not w_quantized:
            # float by design (DFL, a head kept float by skip_detection_head, a mixed-precision float layer): TensorRT
            # runs the conv in float, on the dequantized input where the producer is quantized for other consumers
            continue
        w = inits.get(w_dq.input[0])
        if w is None or w.dtype != np.int8:
            out.append(f"{n.name}: weight must be a constant int8 initializer feeding DequantizeLinear")
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        w_scale = inits.get(w_dq.input[1])
        if w_scale is not None and w_scale.size > 1 and axis != 0:
            out.append(f"{n.name}: per-channel weight scales must be on axis 0 (output channels), got axis {axis}")
        if x_src is None or x_src.op_type != "DequantizeLinear":
            what = "a float tensor" if not x_quantized else f"{x_src.op_type} (not directly a DequantizeLinear)"
            out.append(f"{n.name}: input comes from {what}; TensorRT fuses only DequantizeLinear -> Conv "
                       "(re-export with the tensorrt format, which re-inserts Q/DQ in front of every conv)")
            continue
        a_scale = inits.get(x_src.input[1])
        if a_scale is not None and a_scale.size != 1:
            out.append(f"{n.name}: activation scale must be per tensor, got {a_scale.size} values")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------------------------
def trtexec_command(onnx_path, engine_path) -> str:
    """The trtexec line for an explicit-QDQ network.

    ``--int8`` enables the INT8 kernels the Q/DQ nodes ask for (no calibrator runs: the scales are in the file);
    ``--fp16`` lets the float-by-design parts (DFL, box decoding) pick FP16 kernels as Ultralytics' INT8 engines do.
    """
    return (f"trtexec --onnx={shlex.quote(str(onnx_path))} --saveEngine={shlex.quote(str(engine_path))} "
            "--int8 --fp16")


def tensorrt_unavailable_reason() -> str | None:
    """Why an engine cannot be built here (None when TensorRT and a CUDA GPU are both present)."""
    try:
        import tensorrt  # noqa: F401  # deferred: heavy optional dependency
    except ImportError:
        hint = " (trtexec is on PATH: run build_engine.sh)" if shutil.which("trtexec") else ""
        return f"the tensorrt Python package is not installed{hint}"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


def build_engine(onnx_path, engine_path, metadata: dict | None = None, workspace_gb: float = 4.0):
    """Build a TensorRT engine from the QDQ ONNX with the TensorRT Python API.

    The engine file starts with Ultralytics' metadata header (4-byte length + JSON) when ``metadata`` is given, so
    ``YOLO(engine)`` knows the class names.

    Returns:
        ``(engine path, note)``, or ``(None, reason)`` when TensorRT or a GPU is missing.
    """
    reason = tensorrt_unavailable_reason()
    if reason:
        return None, reason
    import tensorrt as trt  # deferred: heavy optional dependency

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise QATError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.set_flag(trt.BuilderFlag.INT8)
    config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QATError(f"TensorRT engine build failed for {onnx_path}; run `{trtexec_command(onnx_path, engine_path)}`"
                       " --verbose to see why")
    engine_path = Path(engine_path)
    with open(engine_path, "wb") as f:
        if metadata:
            meta = json.dumps(metadata)
            f.write(len(meta).to_bytes(4, byteorder="little", signed=True))
            f.write(meta.encode())
        f.write(serialized)
    return engine_path, f"built with TensorRT {trt.__version__}"


# --------------------------------------------------------------------------------------------------------------------
# Format hooks (src.export.registry)
# --------------------------------------------------------------------------------------------------------------------
def check(ctx: ExportContext) -> None:
    check_model_symmetric(ctx.model)


def export(ctx: ExportContext, out_dir: Path) -> list[Path]:
    """The TensorRT-ready ONNX, ``build_engine.sh`` and the engine where one was built."""
    o = ctx.opts
    r = export_tensorrt(ctx.model, out_dir, ctx.stem, ctx.imgsz, opset=o.opset, simplify=o.simplify,
                        metadata=ctx.metadata)
    return [r.onnx, r.script] + ([r.engine] if r.engine else [])


def coverage(path: Path) -> Coverage:
    """The ONNX coverage, and TensorRT's rules checked on the same graph."""
    import onnx  # deferred: heavy optional dependency

    proto = onnx.load(str(path))
    cov = proto_coverage(proto)
    cov.violations = check_tensorrt_rules(proto)
    return cov

