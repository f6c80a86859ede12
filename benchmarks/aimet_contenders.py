"""Qualcomm AIMET (``aimet-torch``) as harness contenders: AdaRound PTQ and QuantSim QAT of an Ultralytics model.

AIMET's own flow, as its documentation gives it, on an unmodified Ultralytics checkpoint:

1. ``fold_all_batch_norms`` (AIMET's graph tracer needs the Detect head in export mode: one output tensor).
   AIMET's ``model_preparer`` (torch.fx) cannot trace Ultralytics' models ("Proxy object cannot be iterated"), so
   functional ops (C2f's split, the residual adds) keep no quantizer of their own, as AIMET runs any model it could
   not prepare; Ultralytics' ``Concat`` module gets the output quantizer AIMET's error message asks one to register.
2. Optionally ``Adaround.apply_adaround`` (post_training_tf_enhanced, as AIMET's AdaRound examples use) on the same
   64 training images our AdaRound uses, with our iteration count (1000; AIMET's default below 8 bits is 15000);
   its parameter encodings are then frozen.
3. ``QuantizationSimModel`` (param / output bit widths, AIMET's default config: per-channel symmetric weights like
   ours) and ``compute_encodings`` on the same 256 calibration images as ours. The DFL conv is left float, as in
   our placement: its fixed weights are the bin indices 0..15, which 4-bit weights cannot hold (AIMET quantizing
   them: W4A8 QAT 0.15 mAP50-95 on the photo set against 0.68 FP32; PTQ 0.09 -> 0.48 on a 16-image subset once
   the DFL is float).
4. QAT: ``training_range_learning_with_tf_init`` (AIMET's QAT recipe, scales learned), trained by Ultralytics'
   DetectionTrainer with the shared recipe, exactly as the ModelOpt contender trains.
5. Export: ``aimet_torch.onnx.export`` (ONNX Q/DQ), converted to OpenVINO by our converter, measured like every
   other contender.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from torch import nn

ADAROUND_IMAGES = 64  # as src/models/adaround.IMAGES
ONNX_OPSET = 21  # AIMET exports 4-bit weights as INT4, which needs opset 21


class Unfusable(nn.Module):
    """The model as Ultralytics' validator sees it, without ``fuse()``: AIMET already folded every BN."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = model.names
        self.register_buffer("stride", model.stride.clone())

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.model(x)


def register_ultralytics_modules() -> None:
    """AIMET's quantized definition of Ultralytics' ``Concat`` (the one leaf module AIMET does not know)."""
    from aimet_torch.nn import QuantizationMixin
    from ultralytics.nn.modules.conv import Concat

    if Concat in getattr(QuantizationMixin, "cls_to_qcls", {}):
        return

    @QuantizationMixin.implements(Concat)
    class QuantizedConcat(QuantizationMixin, Concat):  # noqa: F841 (registered by the decorator)
        """Ultralytics' Concat with its output quantized."""

        def __quant_init__(self):
            super().__quant_init__()
            self.input_quantizers = nn.ModuleList([None])
            self.output_quantizers = nn.ModuleList([None])

        def forward(self, x):
            out = super().forward(x)
            if self.output_quantizers[0]:
                out = self.output_quantizers[0](out)
            return out


def folded_model(start: Path, imgsz: int) -> nn.Module:
    """The start checkpoint as an FP32 model with every BN folded by AIMET, Detect in export mode."""
    from aimet_torch.batch_norm_fold import fold_all_batch_norms
    from ultralytics import YOLO

    model = YOLO(str(start)).model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.model[-1].export = True  # one output tensor, as Ultralytics' exporter traces it
    fold_all_batch_norms(model, input_shapes=(1, 3, imgsz, imgsz))
    return model


def image_batches(data: str, n_images: int, seed: int, imgsz: int) -> list[torch.Tensor]:
    """The first ``n_images`` of the training split as our calibration sees them (same loader, size, order, seed)."""
    from src.config import load_config
    from src.data.resolve import resolve_data
    from src.stages.calibrate import TrainingImages

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "qat_config.yaml"))
    cfg.train_params.seed = seed
    cfg.train_params.img_size = imgsz  # the config's 640 otherwise: ranges from images of another size
    images = TrainingImages(cfg, resolve_data(data), torch.device("cpu"), 32)
    n_batches = math.ceil(n_images / cfg.qat_params.calibration_batch_size)
    return list(itertools.islice(iter(images), n_batches))


def dfl_conv(model: nn.Module) -> nn.Module:
    """The Detect head's DFL convolution (fixed weights: the bin indices)."""
    return model.model[-1].dfl.conv


def keep_dfl_float(sim) -> None:
    """No quantizer on the DFL conv's weight or output (our placement keeps DFL and box decoding float too)."""
    conv = dfl_conv(sim.model)
    conv.param_quantizers["weight"] = None
    conv.output_quantizers[0] = None


def quantsim(start: Path, data: str, imgsz: int, *, param_bw: int, adaround: bool, iterations: int, qat: bool,
             seed: int, work: Path):
    """The calibrated AIMET QuantizationSimModel of ``start`` (AdaRound first when asked)."""
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    register_ultralytics_modules()
    torch.manual_seed(seed)
    model = folded_model(start, imgsz)
    dummy = torch.rand(1, 3, imgsz, imgsz)
    calibration = image_batches(data, 256, seed, imgsz)
    scheme = QuantScheme.training_range_learning_with_tf_init if qat else QuantScheme.post_training_tf_enhanced
    encodings = None
    bins = dfl_conv(model).weight.detach().clone()
    if adaround:
        ada_batches = calibration[:math.ceil(ADAROUND_IMAGES / calibration[0].shape[0])]
        params = AdaroundParameters(data_loader=ada_batches, num_batches=len(ada_batches),
                                    default_num_iterations=iterations)
        work.mkdir(parents=True, exist_ok=True)
        model = Adaround.apply_adaround(model, dummy, params, path=str(work), filename_prefix="adaround",
                                        default_param_bw=param_bw,
                                        default_quant_scheme=QuantScheme.post_training_tf_enhanced)
        encodings = work / "adaround.encodings"
        with torch.no_grad():
            dfl_conv(model).weight.copy_(bins)  # AdaRound wrote its 4-bit rounding of the bin indices
    sim = QuantizationSimModel(model, dummy, quant_scheme=scheme, default_output_bw=8, default_param_bw=param_bw)
    if encodings is not None:
        sim.set_and_freeze_param_encodings(str(encodings))
    keep_dfl_float(sim)

    def forward_all(m, _):
        with torch.no_grad():
            for b in calibration:
                m(b)

    sim.compute_encodings(forward_all, None)
    return sim


def tensor_pairs(ema: nn.Module, model: nn.Module) -> tuple[list, list]:
    """The floating state tensors of ``ema`` and ``model``, paired (AIMET keeps dicts in its quantizers' state)."""
    live = model.state_dict()
    pairs = [(v, live[k]) for k, v in ema.state_dict().items() if torch.is_tensor(v) and v.dtype.is_floating_point]
    return [a for a, _ in pairs], [b for _, b in pairs]


def train_qat(sim, spec: dict, args: dict, out: Path) -> nn.Module:
    """Train ``sim.model`` with Ultralytics' DetectionTrainer (``args``: the shared recipe); returns its EMA."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    class AimetTrainer(DetectionTrainer):
        def _setup_train(self):
            super()._setup_train()
            # Ultralytics' EMA pairs every state entry it finds, and AIMET's non-tensor entries break it
            self.ema._pairs = tensor_pairs(self.ema.ema, self.model)

        def save_model(self):  # the trained EMA is used in memory; AIMET's quantized modules are not for pickling
            return False

        def final_eval(self):  # evaluated and exported by the harness, like every contender
            pass

    model = sim.model
    model.model[-1].export = False  # the loss needs the raw head outputs
    for p in model.parameters():
        p.requires_grad_(True)
    trainer = AimetTrainer(overrides={**args, "model": spec["model"], "project": str(out), "name": "train",
                                          "exist_ok": True, "save": False, "val": True})
    trainer.model = model  # a loaded nn.Module: the trainer skips building its own
    trainer.train()
    trained = trainer.ema.ema if trainer.ema is not None else trainer.model
    trained = trained.float().eval()
    trained.model[-1].export = True
    sim.model = trained
    return trained


def ultralytics_metadata(model: nn.Module, imgsz: int) -> dict:
    """The metadata Ultralytics' loaders need beside an export (names, stride, size, task)."""
    from ultralytics import __version__

    return {"description": "AIMET QuantSim export (benchmark contender)", "author": "aimet_torch",
            "version": __version__, "stride": int(max(model.stride)), "task": "detect", "batch": 1,
            "imgsz": [imgsz, imgsz], "names": {int(k): str(v) for k, v in dict(model.names).items()},
            "args": {"batch": 1, "nms": False}, "channels": 3, "end2end": False}


def int8_storage(proto) -> int:
    """Re-store every INT4 initializer as INT8 holding the same codes; returns how many were converted.

    OpenVINO's CPU plugin runs convs fed by INT4 constants in bf16 (tests/test_export_openvino.py pins it), so our own
    OpenVINO export stores 4-bit codes as int8 too; the dequantized values do not change.
    """
    from onnx import TensorProto, numpy_helper

    converted = 0
    for i, init in enumerate(proto.graph.initializer):
        if init.data_type == TensorProto.INT4:
            codes = numpy_helper.to_array(init).astype("int8")
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(codes, init.name))
            converted += 1
    return converted


def export_openvino_ir(sim, imgsz: int, out: Path) -> Path:
    """AIMET's Q/DQ ONNX of ``sim``, converted to an OpenVINO IR by our converter (as the ModelOpt contender is).

    Weights are exported as integer codes feeding DequantizeLinear (``prequantize_constants``): AIMET's default,
    float weights through QuantizeLinear, makes OpenVINO 2026.4's ConvolutionTransformation throw at compile time
    ("Cannot create ov::Output<ov::Node> from nullptr").
    """
    import aimet_torch.onnx
    import onnx

    from src.export.openvino_export import export_openvino

    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "aimet.onnx"
    model = sim.model.eval()
    model.model[-1].export = True
    with torch.no_grad():
        aimet_torch.onnx.export(model, torch.rand(1, 3, imgsz, imgsz), str(onnx_path), input_names=["images"],
                                output_names=["output0"], opset_version=ONNX_OPSET, dynamo=False,
                                prequantize_constants=True)
    proto = onnx.load(str(onnx_path))
    if int8_storage(proto):
        onnx_path = out / "aimet_int8_storage.onnx"
        onnx.save(proto, str(onnx_path))
    return export_openvino(onnx_path, out / "aimet_openvino_model", "aimet", ultralytics_metadata(model, imgsz))
