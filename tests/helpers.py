"""Builders shared by several test files (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import torch

TINY_NAMES = {0: "circle", 1: "square", 2: "triangle"}


def calibrated_qat_model(imgsz: int = 64, qconfig: str | None = None, overrides: dict | None = None):
    """A yolov8n (nc=3, random init, seed 0) prepared with the shipped config (plus ``overrides``, dotted keys as
    the CLI gives them) and calibrated on random images.

    Returns:
        (model in eval mode, resolved config)
    """
    from ultralytics.nn.tasks import DetectionModel

    from src.config import load_config
    from src.models.yolov8_qat import prepare_qat_model
    from src.quantization.calibration import calibrate

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.names = dict(TINY_NAMES)
    cfg = load_config("configs/qat_config.yaml", overrides, qconfig=qconfig)
    prepare_qat_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    calibrate(model, [torch.rand(2, 3, imgsz, imgsz, generator=g) for _ in range(2)], 4, progress=False)
    return model.eval(), cfg


def prepared_model_family(model_yaml: str, imgsz: int = 64):
    """A packaged model YAML (nc=3, random init, seed 0) prepared with the shipped config and calibrated on random
    images.

    Returns:
        (model in eval mode, placement)
    """
    from ultralytics.nn.tasks import DetectionModel

    from src.config import load_config
    from src.models.yolov8_qat import prepare_qat_model
    from src.quantization.calibration import calibrate

    torch.manual_seed(0)
    model = DetectionModel(model_yaml, nc=3, verbose=False)
    placement = prepare_qat_model(model, load_config("configs/qat_config.yaml"))
    g = torch.Generator().manual_seed(1)
    calibrate(model, [torch.rand(2, 3, imgsz, imgsz, generator=g) for _ in range(2)], 4, progress=False)
    return model.eval(), placement


def onnx_runtime_and_torch_outputs(model, onnx_path, imgsz: int, n: int = 2, seed: int = 4):
    """(ONNX Runtime output, output of ``model`` in export form) on ``n`` random images, one pair per image and
    graph output (a segmentation model's second output is its mask prototypes)."""
    import onnxruntime as ort

    from src.export.common import prepare_for_export

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = prepare_for_export(model)
    pairs = []
    for xi in torch.rand(n, 1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(seed)):
        with torch.no_grad():
            expected = ref(xi)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = sess.run(None, {"images": xi.numpy()})
        assert len(got) == len(expected)
        pairs.extend((g, e.numpy()) for g, e in zip(got, expected))
    return pairs


def usable_detector(cfg, model_yaml: str = "yolov8n.yaml", imgsz: int = 64, model_cls=None):
    """A packaged model YAML (nc=3) prepared with ``cfg`` and calibrated at ``imgsz``, and its 8 calibration images.
    ``model_cls``: the Ultralytics task model (default ``DetectionModel``; ``SegmentationModel``, ``PoseModel``).

    Random init shrinks activations layer by layer to ~1e-9 (a degenerate model whose tensors cannot be told apart;
    a yolo26n's head scales sit at the 1e-7 floor and its int8 TFLite comes out garbage); BatchNorm statistics from
    real images keep every layer at unit scale, as in a trained model.
    """
    from torch import nn
    from ultralytics.nn.tasks import DetectionModel

    from src.export.tflite_export import _default_calibration
    from src.models.yolov8_qat import prepare_qat_model
    from src.quantization.calibration import calibrate

    torch.manual_seed(0)
    model = (model_cls or DetectionModel)(model_yaml, nc=3, verbose=False)
    model.names = dict(TINY_NAMES)
    images = _default_calibration((imgsz, imgsz), 8)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    prepare_qat_model(model, cfg, imgsz=imgsz)
    calibrate(model, [images], len(images), progress=False)
    return model.eval(), images
