"""NNCF's accuracy-controlled PTQ (``nncf.quantize_with_accuracy_control``) of an Ultralytics model, as a contender.

Ultralytics' ``export(format="openvino", quantize=8)`` runs plain ``nncf.quantize``; the accuracy-control variant
quantizes the same way (same FP32 IR from Ultralytics' exporter, preset MIXED, the head's decoding and Sigmoid left
float as Ultralytics does, calibration on the train split) and then reverts the quantization of the layers that
cost most until the validation mAP50-95 is within ``max_drop`` of the FP32 IR's (or the iteration budget ends).
The metric is Ultralytics' DetectionValidator run on the compiled model, over whichever validation images NNCF
passes (its ranking uses subsets).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

# Reverting one group costs one validation pass; bound the search so the contender's time stays predictable.
MAX_ITERATIONS = 8
CALIBRATION_IMAGES = 300  # NNCF's default subset size


class CompiledDetector(nn.Module):
    """A compiled OpenVINO detector as the nn.Module Ultralytics' validator expects (raw outputs, batch 1 IR)."""

    def __init__(self, compiled, names: dict, stride: float = 32.0) -> None:
        super().__init__()
        self.compiled = compiled
        self.names = names
        self.register_buffer("stride", torch.tensor([stride]))

    def __deepcopy__(self, memo):  # the validator copies its model; a compiled model cannot be copied, only shared
        return CompiledDetector(self.compiled, self.names, float(self.stride[0]))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        outs = [np.asarray(self.compiled([xi[None].float().numpy()])[0]) for xi in x]
        return torch.from_numpy(np.concatenate(outs))


def subset_map(compiled, data: str, files: list[str], imgsz: int, names: dict) -> float:
    """mAP50-95 of the compiled model on ``files`` (images of ``data``'s val split; labels found beside them)."""
    from src.training.evaluate import evaluate

    d = yaml.safe_load(Path(data).read_text())
    with tempfile.TemporaryDirectory(prefix="nncf_ac_") as tmp:
        listing = Path(tmp) / "val.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        sub = {"path": tmp, "train": str(listing), "val": str(listing), "nc": d["nc"], "names": d["names"]}
        sub_yaml = Path(tmp) / "data.yaml"
        sub_yaml.write_text(yaml.safe_dump(sub))
        return evaluate(CompiledDetector(compiled, names), sub_yaml, imgsz=imgsz, batch=1)["map50_95"]


def head_ignored_scope(ov_model):
    """The ops Ultralytics' exporter leaves float for a Detect head: every Sigmoid and the head's own decoding."""
    import nncf

    ops = ov_model.get_ordered_ops()
    sigmoids = [op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"]
    head = sigmoids[-1].split("/", 1)[0]
    return nncf.IgnoredScope(names=[op.get_friendly_name() for op in ops if op.get_type_name() == "Sigmoid"
                                    or op.get_friendly_name().startswith((f"{head}/", f"{head}.dfl"))])


def quantize_with_accuracy_control(start: Path, data: str, imgsz: int, max_drop_points: float) -> tuple[Path, dict]:
    """The INT8 IR (beside Ultralytics' FP32 export of ``start``) and what the search did."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters
    from ultralytics import YOLO

    from benchmarks.run_contender import ir_in
    from src.export.validate import parity_images, split_files

    yolo = YOLO(str(start))
    names = dict(yolo.names)
    fp32_dir = Path(yolo.export(format="openvino", imgsz=imgsz))
    fp32_xml = ir_in(fp32_dir)
    model = ov.Core().read_model(str(fp32_xml))
    calibration = list(parity_images(data, imgsz, CALIBRATION_IMAGES, split="train")[:, None])
    val_files = [str(f) for f in split_files(data, "val")]
    quantized = nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(calibration),
        nncf.Dataset(val_files),
        lambda compiled, items: subset_map(compiled, data, list(items), imgsz, names),
        max_drop=max_drop_points / 100.0,
        drop_type=nncf.DropType.ABSOLUTE,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calibration),
        ignored_scope=head_ignored_scope(model),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=MAX_ITERATIONS),
    )
    out_dir = fp32_dir.with_name(fp32_dir.name.replace("_openvino_model", "_int8_ac_openvino_model"))
    out_dir.mkdir(parents=True, exist_ok=True)
    out_xml = out_dir / fp32_xml.name
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    if (fp32_dir / "metadata.yaml").is_file():
        shutil.copy2(fp32_dir / "metadata.yaml", out_dir / "metadata.yaml")
    return out_xml, {"max_drop_points": max_drop_points, "max_num_iterations": MAX_ITERATIONS,
                     "calibration_images": len(calibration), "validation_images": len(val_files)}
