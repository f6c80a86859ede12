"""OpenVINO IR from the QDQ ONNX, and a check of which convolutions really run INT8 on the CPU plugin.

OpenVINO reads an activation Q/DQ pair as ``FakeQuantize`` and an int8 weight with DequantizeLinear as
``Constant(i8) -> Convert -> Multiply``; its low-precision transformations then run a convolution in INT8 when both
its input (through concat/split/max-pool) and its weight are quantized this way. Whether that happened is only
visible in the compiled model's runtime graph: each executed node carries ``layerType``, ``runtimePrecision`` and
``originalLayersNames`` (the IR nodes fused into it), which :func:`runtime_int8_report` reads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from src.errors import QATError
from src.export import metadata as export_metadata
from src.export.common import Coverage, ExportContext
from src.export.onnx_qdq import qdq_onnx
from src.export.registry import FORMATS

LOGGER = logging.getLogger("yolov8_qat")
# the directory name Ultralytics' backends recognise as one OpenVINO model
MODEL_DIR_SUFFIX = FORMATS["openvino"].model_dir_suffix

INT8_PRECISIONS = ("u8", "i8")
# IR ops of the placement's convs (ConvolutionBackpropData: a segmentation head's mask-prototype upsampling), and the
# CPU plugin's layer types they compile to
CONVOLUTION_OPS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")
RUNTIME_CONVOLUTION_TYPES = ("Convolution", "Deconvolution")
# IR ops a FakeQuantize output passes through without leaving its grid (OpenVINO's LPT propagates through them).
_OV_AGNOSTIC = frozenset({"Split", "VariadicSplit", "StridedSlice", "Slice", "MaxPool", "Interpolate", "Reshape",
                          "Transpose", "Squeeze", "Unsqueeze"})


@dataclass
class Int8Report:
    """Runtime precision of the quantized convolutions of an IR (names are IR Convolution friendly names)."""

    quantized: list[str] = field(default_factory=list)
    int8: list[str] = field(default_factory=list)
    float_fallbacks: dict[str, str] = field(default_factory=dict)  # quantized conv -> precision it ran in
    unquantized: dict[str, str] = field(default_factory=dict)  # float-by-design convs (e.g. DFL) -> precision
    device: str = "CPU"

    @property
    def ok(self) -> bool:
        return not self.float_fallbacks

    def summary(self) -> str:
        s = f"{len(self.int8)}/{len(self.quantized)} quantized convs run INT8 on {self.device}"
        if self.float_fallbacks:
            s += "; float fallbacks: " + ", ".join(f"{k} ({v})" for k, v in self.float_fallbacks.items())
        if self.unquantized:
            s += f"; {len(self.unquantized)} float-by-design: " + ", ".join(
                f"{k} ({v})" for k, v in self.unquantized.items())
        return s


def export_openvino(onnx_path: str | Path, out_dir: str | Path, stem: str, metadata: dict | None = None) -> Path:
    """Convert the QDQ ONNX to ``<out_dir>/<stem>.xml``/``.bin`` (+ ``metadata.yaml``), weights kept int8/fp32."""
    import openvino as ov  # deferred: heavy optional dependency

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ov_model = ov.convert_model(str(onnx_path))
    if metadata:
        # the model_info keys Ultralytics' exporter sets, read by OpenVINO's model API / model server
        names = metadata.get("names", {})
        ov_model.set_rt_info("YOLO", ["model_info", "model_type"])
        ov_model.set_rt_info(True, ["model_info", "reverse_input_channels"])
        ov_model.set_rt_info(114, ["model_info", "pad_value"])
        ov_model.set_rt_info([255.0], ["model_info", "scale_values"])
        ov_model.set_rt_info(0.7, ["model_info", "iou_threshold"])
        ov_model.set_rt_info([str(v).replace(" ", "_") for v in names.values()], ["model_info", "labels"])
        ov_model.set_rt_info("fit_to_window_letterbox", ["model_info", "resize_type"])
    share_fake_quantize_limits(ov_model)
    drop_internal_names(ov_model)
    xml = out_dir / f"{stem}.xml"
    ov.save_model(ov_model, str(xml), compress_to_fp16=False)  # fp16 compression would touch the float parts only
    compact_xml(xml)
    if metadata:
        export_metadata.write_metadata_yaml(metadata, out_dir)
    size = (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 1e6
    LOGGER.debug(f"OpenVINO IR export: {xml} ({size:.2f} MB)")
    return xml


def share_fake_quantize_limits(ov_model) -> int:
    """Feed each FakeQuantize's output limits from its input-limit constants where they hold the same bytes.

    A Q/DQ pair converts to FakeQuantize(x, in_lo, in_hi, out_lo, out_hi) with four constants, and for a Q/DQ pair
    the output limits equal the input ones; one constant per limit drops ~116 IR layers on yolov8n (~35 kB of XML).
    Per-tensor limits become scalars (numpy broadcasting gives the same values) instead of [1, 1, 1, 1] tensors,
    whose four dims the XML repeats on every port (~20 kB).

    Returns:
        The number of limit inputs re-pointed.
    """
    import openvino as ov  # deferred: heavy optional dependency

    shared = 0
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        sources = [op.input(i).get_source_output() for i in range(5)]
        if any(s.get_node().get_type_name() != "Constant" for s in sources[1:]):
            continue
        values = [s.get_node().get_data() for s in sources[1:]]
        for k in (0, 1):  # (in_lo, out_lo), (in_hi, out_hi)
            a, b = values[k], values[k + 2]
            if a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes():
                limit = sources[1 + k]
                if a.size == 1 and a.ndim:  # per-tensor: a scalar broadcasts the same, without four dims per port
                    limit = ov.op.Constant(a.reshape(())).output(0)
                    op.input(1 + k).replace_source_output(limit)
                op.input(3 + k).replace_source_output(limit)
                shared += 1
    return shared


def drop_internal_names(ov_model) -> None:
    """Shorten what only the ONNX file needed: internal tensor names and the names of constants.

    Model inputs/outputs keep their tensor names and every compute layer its friendly name (the runtime INT8 report
    and users' profiling read those); the ONNX-derived names of ~450 constants and ~900 internal tensors were ~10% of
    the XML.
    """
    keep = {n for port in [*ov_model.inputs, *ov_model.outputs] for n in port.get_names()}
    for i, op in enumerate(ov_model.get_ordered_ops()):
        if op.get_type_name() == "Constant":
            op.set_friendly_name(f"c{i}")
        for out in op.outputs():
            if not out.get_names() & keep:
                out.get_tensor().set_names(set())


def compact_xml(xml: Path) -> None:
    """Drop the indentation between the IR's XML tags (a fifth of the file; OpenVINO's parser ignores it)."""
    text = xml.read_text(encoding="utf-8")
    xml.write_text(re.sub(r">\s+<", "><", text), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------------
# Runtime INT8 report
# --------------------------------------------------------------------------------------------------------------------
def _fq_fed(output) -> bool:
    """True when an IR tensor comes from FakeQuantize through grid-preserving ops (Concat: all inputs)."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Concat":
        return all(_fq_fed(i.get_source_output()) for i in node.inputs())
    if kind in _OV_AGNOSTIC:
        return _fq_fed(node.input(0).get_source_output())
    return False


def _int_weight(output) -> bool:
    """True for a weight that is dequantized from integers: Constant(i8/u8) -> Convert [-> Subtract] -> Multiply."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind in ("Multiply", "Subtract", "Convert", "Reshape"):
        return any(_int_weight(i.get_source_output()) for i in node.inputs())
    if kind == "Constant":
        return node.get_element_type().get_type_name() in ("i8", "u8", "i4", "u4")
    return False


def _weight_element_bits(output) -> int | None:
    """Bits of the Constant a conv weight is decompressed from (through Convert / Subtract / Multiply / Reshape)."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "Constant":
        return node.get_element_type().bitwidth
    if kind in ("Multiply", "Subtract", "Convert", "Reshape", "FakeQuantize"):
        return _weight_element_bits(node.input(0).get_source_output())
    return None


def quantized_convolutions(ov_model) -> tuple[list[str], list[str]]:
    """(quantized, float) Convolution names of an IR: quantized = FakeQuantize-fed input and integer weight."""
    quantized, plain = [], []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in CONVOLUTION_OPS:
            continue
        q = _fq_fed(op.input(0).get_source_output()) and _int_weight(op.input(1).get_source_output())
        (quantized if q else plain).append(op.get_friendly_name())
    return quantized, plain


def compile_model(xml_path: str | Path, device: str = "CPU", config: dict | None = None):
    """Compile an IR on ``device`` (one place, so the report and the latency use the same plugin settings)."""
    import openvino as ov  # deferred: heavy optional dependency

    core = ov.Core()
    return core.compile_model(core.read_model(str(xml_path)), device, config or {})


def runtime_int8_report(xml_path: str | Path, device: str = "CPU", config: dict | None = None) -> Int8Report:
    """Which quantized convolutions run u8/i8 after compilation, and which fell back to float (by name).

    Args:
        xml_path: The IR.
        device: OpenVINO device.
        config: Compile properties (e.g. ``{"INFERENCE_PRECISION_HINT": "f32"}``).
    """
    import openvino as ov  # deferred: heavy optional dependency

    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise QATError(f"OpenVINO IR {xml_path} not found; export it with --export and 'openvino' in export.formats")
    core = ov.Core()
    model = core.read_model(str(xml_path))
    quantized, plain = quantized_convolutions(model)
    runtime = core.compile_model(model, device, config or {}).get_runtime_model()
    precision_of: dict[str, str] = {}
    for node in runtime.get_ordered_ops():
        info = node.get_rt_info()
        if "layerType" not in info or not any(t in info["layerType"].astype(str) for t in RUNTIME_CONVOLUTION_TYPES):
            continue
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        for name in info["originalLayersNames"].astype(str).split(","):
            precision_of.setdefault(name.strip(), precision)
    report = Int8Report(quantized=quantized, device=device)
    for name in quantized:
        p = precision_of.get(name, "not found")
        if p in INT8_PRECISIONS:
            report.int8.append(name)
        else:
            report.float_fallbacks[name] = p
    report.unquantized = {n: precision_of.get(n, "not found") for n in plain}
    return report


# --------------------------------------------------------------------------------------------------------------------
# Ultralytics loading
# --------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def ultralytics_view(xml_path: str | Path) -> Iterator[Path]:
    """A ``<stem>_openvino_model`` directory holding the IR (+ metadata.yaml), as ``YOLO()`` requires.

    Ultralytics recognises OpenVINO only by that directory-name suffix; the spec's layout is ``openvino/<stem>.xml``.
    When the IR already sits in such a directory it is used as is; otherwise a temporary directory of symlinks
    (copies where links are not allowed) is made and removed afterwards.
    """
    xml_path = Path(xml_path).resolve()
    if xml_path.parent.name.endswith(MODEL_DIR_SUFFIX):
        yield xml_path.parent
        return
    tmp = Path(tempfile.mkdtemp(prefix="ov_view_"))
    view = tmp / f"{xml_path.stem}{MODEL_DIR_SUFFIX}"
    view.mkdir()
    try:
        for src in (xml_path, xml_path.with_suffix(".bin"), xml_path.parent / "metadata.yaml"):
            if src.is_file():
                try:
                    os.symlink(src, view / src.name)
                except OSError:
                    shutil.copy2(src, view / src.name)
        yield view
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Format hooks (src.export.registry)
# --------------------------------------------------------------------------------------------------------------------
def check(ctx: ExportContext) -> None:
    """Nothing to refuse early: the IR is converted from the QDQ ONNX, which checks itself."""


def export(ctx: ExportContext, out_dir: Path) -> list[Path]:
    """The IR from the run's QDQ ONNX, and the runtime INT8 report in the log."""
    xml = export_openvino(qdq_onnx(ctx, int8_storage=True), out_dir, ctx.stem, ctx.metadata)
    report = runtime_int8_report(xml)
    (LOGGER.info if report.ok else LOGGER.warning)(f"OpenVINO runtime: {report.summary()}")
    return [xml, xml.with_suffix(".bin")] + ([xml.parent / "metadata.yaml"] if ctx.metadata else [])


def read_metadata(path: Path) -> dict:
    """The ``metadata.yaml`` beside the IR."""
    return export_metadata.read_metadata(path)


yolo_path = ultralytics_view


def ov_runner(path: Path, threads: int, f32: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """The IR compiled for the CPU at batch 1 (latency hint), optionally with f32 inference precision."""
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: np.array(request.infer([x])[0])


def runners(path: Path, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The default precision, and f32 (the default may run the float parts in bf16)."""
    return {"default": ov_runner(path, threads), "f32": ov_runner(path, threads, f32=True)}


def coverage(path: Path) -> Coverage:
    """From the compiled runtime graph: a quantized conv not running u8/i8 is a float fallback."""
    r = runtime_int8_report(path)
    return Coverage(len(r.int8), len(r.quantized), [f"{k} ({v})" for k, v in r.float_fallbacks.items()],
                    list(r.unquantized))


def weight_bits(path: Path) -> float:
    """From the IR as stored (before the plugin decompresses anything)."""
    import openvino as ov  # deferred: heavy optional dependency

    bits = count = 0
    for op in ov.Core().read_model(str(path)).get_ordered_ops():
        if op.get_type_name() not in CONVOLUTION_OPS:
            continue
        b = _weight_element_bits(op.input(1).get_source_output())
        n = int(np.prod(list(op.get_input_shape(1))))
        bits += (b or 32) * n
        count += n
    return bits / count if count else 0.0
