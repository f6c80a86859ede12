"""Sensitivity of each quantizable conv to its weight bit width, the measurement behind mixed precision.

Sensitivity of layer L at b bits: only L's weight quantizer is on (b bits, ranges from the weights), everything else
float; measured on ``mixed_precision.sensitivity_images`` training images (no augmentation) as
  * ``loss``: the change in Ultralytics' detection loss (box + cls + dfl, per image) against the float model -- a
    cheap stand-in for the mAP change, which would need a full validation per layer and bit width;
  * ``sqnr_db``: SQNR of L's output against its float output on the same input.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from src.integrations.ultralytics import set_model_args
from src.models.yolov8_qat import QuantConv, quantizers, set_fake_quant
from src.quantization.bit_allocation import LayerSensitivity, SensitivityTable
from src.stages.calibrate import build_ptq_model
from src.training.data import build_loader, hyperparameters, preprocess_batch


def sensitivity_batches(cfg, data: dict, device: torch.device, stride: int) -> list[dict]:
    """``sensitivity_images`` training images without augmentation, preprocessed, kept in memory."""
    n = cfg.mixed_precision.sensitivity_images
    bs = min(cfg.qat_params.calibration_batch_size, n)
    loader = build_loader(hyperparameters(cfg, mode="val"), data, "train", bs, mode="val", stride=stride,
                          shuffle=True, seed=cfg.train_params.seed, workers=0)
    out, seen = [], 0
    for b in loader:
        b = preprocess_batch(b, device)
        take = min(int(b["img"].shape[0]), n - seen)
        if take < b["img"].shape[0]:
            keep = b["batch_idx"] < take
            b = {**b, "img": b["img"][:take], "batch_idx": b["batch_idx"][keep], "cls": b["cls"][keep],
                 "bboxes": b["bboxes"][keep]}
        out.append(b)
        seen += take
        if seen >= n:
            break
    return out


def quantizable_layers(placement, cfg) -> list[tuple[str, int, int | None]]:
    """(name, weight params, pinned bits) of each conv a placement quantizes; pinned = bits set by layer_configs."""
    out = []
    for l in placement.layers:
        if not l.quantized:
            continue
        pinned = l.weight_bits if any(isinstance(i, int) and "bit_width" in cfg.layer_configs[i].weight
                                      for i in l.layer_configs) else None
        out.append((l.name, l.params, pinned))
    return out


def ptq_on_batches(fp32_model: nn.Module, cfg, bit_overrides: dict, batches: list[dict]) -> nn.Module:
    """The PTQ model of ``bit_overrides``, calibrated on the in-memory sensitivity batches (no progress bar)."""
    device = batches[0]["img"].device
    return build_ptq_model(fp32_model, cfg, bit_overrides, lambda: (b["img"] for b in batches),
                           sum(int(b["img"].shape[0]) for b in batches), device, progress=False).eval()


@torch.no_grad()
def _detection_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean per-image detection loss (box + cls + dfl with Ultralytics' gains) in eval mode."""
    total, n = 0.0, 0
    for b in batches:
        loss, _ = model.loss(b, model(b["img"]))
        total += float(loss.sum())  # v8DetectionLoss returns the per-image loss x batch size
        n += int(b["img"].shape[0])
    return total / max(n, 1)


class _OutputSQNR:
    """Forward hook on one QuantConv: accumulates signal and noise power of its output against the float output."""

    def __init__(self, conv):
        self.conv, self.signal, self.noise, self.busy = conv, 0.0, 0.0, False
        self.handle = conv.register_forward_hook(self)

    def __call__(self, mod, inputs, out):
        if self.busy:
            return
        self.busy = True
        try:
            mod.weight_quant.enable_fake_quant(False)
            ref = mod(inputs[0])
            mod.weight_quant.enable_fake_quant(True)
        finally:
            self.busy = False
        self.signal += float((ref.double() ** 2).sum())
        self.noise += float(((ref.double() - out.double()) ** 2).sum())

    def db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.signal, 1e-300) / self.noise)


def measure_sensitivity(fp32_model: nn.Module, cfg, batches: list[dict], *, progress: bool = True) -> SensitivityTable:
    """Per-layer detection-loss change and output SQNR for each candidate weight width (only that layer quantized).

    Args:
        fp32_model: The float DetectionModel (not modified).
        cfg: Resolved QATConfig (placement, quantizer settings, ``mixed_precision``).
        batches: Preprocessed Ultralytics batches (``img`` in [0, 1], labels) on the model's device.
        progress: tqdm bar over layer x width measurements.
    """
    mp = cfg.mixed_precision
    hyp = hyperparameters(cfg)
    base = ptq_on_batches(fp32_model, cfg, {}, batches)
    layers = quantizable_layers(base.qat_placement, cfg)
    table = [LayerSensitivity(n, p, pinned_bits=pin) for n, p, pin in layers]
    float_loss = None
    bar = tqdm(total=len(layers) * len(mp.weight_bits), desc="Sensitivity", unit="meas", disable=not progress,
               leave=False)
    try:
        for bits in sorted(mp.weight_bits):
            overrides = {n: {"weight_bits": bits} for n, _, pin in layers if pin is None}
            # the default placement already is this width when no layer differs: skip a second preparation
            same = all(l.weight_bits == bits for l in base.qat_placement.layers if l.name in overrides)
            model = base if same else ptq_on_batches(fp32_model, cfg, overrides, batches)
            set_model_args(model, hyp)  # v8DetectionLoss reads its gains from model.args
            set_fake_quant(model, False)
            if float_loss is None:
                float_loss = _detection_loss(model, batches)
            convs = dict(model.named_modules())
            for entry in table:
                conv = convs[entry.name]
                assert isinstance(conv, QuantConv) and conv.weight_quant is not None, entry.name
                conv.weight_quant.enable_fake_quant(True)
                meter = _OutputSQNR(conv)
                try:
                    entry.loss[str(bits)] = _detection_loss(model, batches) - float_loss
                finally:
                    meter.handle.remove()
                    conv.weight_quant.enable_fake_quant(False)
                entry.sqnr_db[str(bits)] = meter.db()
                bar.update(1)
            assert not any(q.fake_quantizing for _, q in quantizers(model))
            del model
    finally:
        bar.close()
    n_img = sum(int(b["img"].shape[0]) for b in batches)
    return SensitivityTable(float(float_loss), n_img, table)
