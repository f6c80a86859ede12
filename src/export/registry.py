"""The export formats: one :class:`ExportFormat` each, in :data:`FORMATS`, read by config, export and validation.

An entry says where the format's files go, how a path is recognised as this format, which model settings it can
deploy, and which module implements its hooks (:class:`FormatHooks`). This module is plain data, light enough for
``src.config`` to import; ``src/export/hooks.py`` imports a format's module on first use. Adding a format is one
module plus one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Protocol

from src.quantization.vocabulary import STORAGE_BITS


if TYPE_CHECKING:  # annotations only: these modules import torch/numpy
    import numpy as np

    from src.export.common import Coverage, ExportContext


class FormatHooks(Protocol):
    """What a format module defines (module-level functions)."""

    def check(self, ctx: ExportContext) -> None:
        """Refuse a model this format cannot carry, before any format writes a file."""

    def export(self, ctx: ExportContext, out_dir: Path) -> list[Path]:
        """Write the format into ``out_dir`` (its folder of the export dir); returns its paths, main artifact first."""

    def read_metadata(self, path: Path) -> dict:
        """The metadata embedded in (or beside) an export."""

    def yolo_path(self, path: Path) -> ContextManager[Path]:
        """The path Ultralytics' ``YOLO()`` loads this export from."""

    def runners(self, path: Path, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """Runtime variants timed for one export (``"default"`` first: it also serves the parity check)."""

    def coverage(self, path: Path) -> Coverage:
        """Which convolutions of the file run INT8."""

    def weight_bits(self, path: Path) -> float:
        """Mean stored bits per convolution weight of the file (4 packed INT4, 8 int8, 32 float)."""


@dataclass(frozen=True)
class ExportFormat:
    """One export target.

    Attributes:
        name: The ``export.formats`` entry.
        title: The format's name in messages.
        module: The module implementing :class:`FormatHooks` (imported on first use).
        suffix: Suffix of the main artifact.
        label: How the main artifact is named in the list of accepted files.
        companions: Suffixes of the files beside the main artifact that belong to it (counted in its size).
        model_dir_suffix: Name ending of a directory that is itself one export (Ultralytics' layout).
        unvalidated: Suffix of a file of this format that is not validated here -> why, and what to pass instead
            (``{stem}`` is the file's stem).
        symmetric_activations: Why the format needs signed symmetric activations (None: any).
        static_shapes: Why the format refuses ``export.dynamic`` (None: dynamic shapes are fine).
        dynamic_is_config_error: Whether ``export.dynamic`` with this format is refused when the config is built
            (otherwise when it is exported).
        max_bits: Widest quantizer the format stores.
    """

    name: str
    title: str
    module: str
    suffix: str
    label: str
    companions: tuple[str, ...] = ()
    model_dir_suffix: str | None = None
    unvalidated: tuple[tuple[str, str], ...] = ()
    symmetric_activations: str | None = None
    static_shapes: str | None = None
    dynamic_is_config_error: bool = False
    max_bits: int = STORAGE_BITS

    @property
    def folder(self) -> str:
        """Sub-folder of the export directory holding this format's files."""
        return self.name


_ENTRIES = (
    ExportFormat("onnx", "ONNX", "src.export.onnx_qdq", ".onnx", ".onnx"),
    ExportFormat("openvino", "OpenVINO", "src.export.openvino_export", ".xml", "an OpenVINO .xml",
                 companions=(".bin",), model_dir_suffix="_openvino_model"),
    ExportFormat("tensorrt", "the TensorRT-ready ONNX", "src.export.tensorrt_export", ".onnx", ".onnx",
                 unvalidated=((".engine", "TensorRT engines are validated on a TensorRT machine; here validate the "
                               "TensorRT-ready ONNX ({stem}.onnx) instead"),),
                 symmetric_activations="TensorRT needs zero-point-0 activations",
                 static_shapes="the engine needs an optimization profile for dynamic shapes",
                 dynamic_is_config_error=True),
    ExportFormat("tflite", "TFLite", "src.export.tflite_export", ".tflite", ".tflite",
                 static_shapes="litert-torch traces one fixed input shape"),
)
# export order: the QDQ ONNX the others derive from first
FORMATS: dict[str, ExportFormat] = {f.name: f for f in _ENTRIES}


def names() -> tuple[str, ...]:
    return tuple(FORMATS)


def get(name: str) -> ExportFormat:
    return FORMATS[name]


def selected(formats: list[str]) -> list[ExportFormat]:
    """The entries of ``formats`` (known names only), in export order."""
    return [f for f in FORMATS.values() if f.name in formats]


def needing_symmetric_activations(formats: list[str]) -> ExportFormat | None:
    """The first of ``formats`` that deploys only signed symmetric activations."""
    return next((f for f in selected(formats) if f.symmetric_activations), None)


def refusing_dynamic_shapes_in_config(formats: list[str]) -> ExportFormat | None:
    """The first of ``formats`` whose static shapes the config already enforces."""
    return next((f for f in selected(formats) if f.static_shapes and f.dynamic_is_config_error), None)


def max_bits(formats: list[str]) -> int | None:
    """The widest quantizer every one of ``formats`` stores (None for no format: nothing limits it)."""
    return min((f.max_bits for f in selected(formats)), default=None)


def of_path(path: Path) -> ExportFormat | None:
    """The format of an export file by its suffix; a suffix shared by formats goes to the one whose folder holds
    the file, else to the first (a ``.onnx`` under ``tensorrt/`` is the TensorRT-ready ONNX, elsewhere ONNX)."""
    suffix = path.suffix.lower()
    candidates = [f for f in FORMATS.values() if f.suffix == suffix]
    return next((f for f in candidates if f.folder == path.parent.name), candidates[0] if candidates else None)


def unvalidated_reason(path: Path) -> str | None:
    """Why a file of a known format cannot be validated here (None when it is not such a file)."""
    suffix = path.suffix.lower()
    return next((why.format(stem=path.stem) for f in FORMATS.values() for s, why in f.unvalidated if s == suffix),
                None)


def dir_format(path: Path) -> ExportFormat | None:
    """The format whose files a directory holds by its name: a format's folder of the export dir (``openvino/``)
    or a directory that is itself one export (``*_openvino_model``)."""
    return next((f for f in FORMATS.values()
                 if path.name == f.folder or f.model_dir_suffix and path.name.endswith(f.model_dir_suffix)), None)
