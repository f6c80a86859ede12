"""What every export format shares: the export run's context, the model in export form, the INT8 coverage record."""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class CalibrationImages:
    """Images for the ranges a format calibrates itself (tensors no QAT quantizer covers), and where they come from.

    Attributes:
        source: Their dataset (the data YAML), recorded beside the export.
        batches: NCHW float batches in [0, 1] at the export size, on the CPU; a format reads only as many as it needs.
    """

    source: str
    batches: Iterable[torch.Tensor]


@dataclass
class ExportContext:
    """What every format's ``check`` and ``export`` get: the model, settings, layout and metadata of one run.

    ``calibration`` opens the run's own images for a format that calibrates ranges (None, or None returned: the run
    has no data); only such a format calls it, so a run exporting none of them never loads a dataset. ``cache``
    holds what one format computes for others (the QDQ ONNX OpenVINO converts), so it is made once.
    """

    model: object
    cfg: object
    export_dir: Path
    stem: str
    imgsz: int
    metadata: dict | None
    formats: list[str]
    calibration: Callable[[], CalibrationImages | None] | None = None
    cache: dict = field(default_factory=dict)
    _tmp: list[Path] = field(default_factory=list)

    @property
    def opts(self):
        return self.cfg.export

    def temp_dir(self, prefix: str) -> Path:
        """A folder removed by :meth:`cleanup`, for a file a format needs but nobody asked for."""
        tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self._tmp.append(tmp)
        return tmp

    def cleanup(self) -> None:
        for t in self._tmp:
            shutil.rmtree(t, ignore_errors=True)


@dataclass
class Coverage:
    """How the convolutions of an export file run.

    Attributes:
        int8: Convolutions running INT8.
        seen: Convolutions visibly quantized in the file (fully or partly); fewer than the placement's quantized
            convs means some lost both quantizers and look float by design.
        floats: Quantized convolutions running in float, by name.
        unquantized: Float convolutions of the file that carry no quantization at all, by name.
        violations: Deployment rules the file breaks (None: the format has none to check).
    """

    int8: int
    seen: int
    floats: list[str]
    unquantized: list[str]
    violations: list[str] | None = None


def prepare_for_export(model: nn.Module, dynamic: bool = False, fmt: str = "onnx") -> nn.Module:
    """A deep copy in eval mode with the Detect head in Ultralytics' export form: one (1, 4+nc, anchors) tensor, or
    (1, max_det, 6) from an end-to-end head whose ``end2end`` is set; the branch it does not read is deleted, as
    Ultralytics' exporter does by fusing."""
    from ultralytics.nn.modules import C2f, Detect  # deferred: heavy dependency, loaded when a model is exported

    m = copy.deepcopy(model).float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for mod in m.modules():
        if isinstance(mod, Detect):
            mod.export, mod.format, mod.dynamic, mod.shape = True, fmt, dynamic, None
            mod.fuse()  # drops an end-to-end head's unused branch; nothing else on a single-branch head
        elif isinstance(mod, C2f):
            mod.forward = mod.forward_split  # what Ultralytics' exporter does: Split instead of Slice pairs
    return m


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block.

    Export traces tiny tensors one op at a time; intra-op threads only add synchronisation (on a busy 2-core machine
    each per-channel fake-quant call went from 0.3 ms to 20 ms).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
