"""YOLOv8 model surgery for QAT: reversible module swaps, quantizer placement and sharing, QAT checkpoints.

Placement (why it looks like this): OpenVINO and TensorRT run a convolution in INT8 when both its input and its
weight arrive through Quantize/Dequantize, and they fuse a quantizer that directly follows a conv (+activation) into
that conv so it writes INT8. So activation quantizers sit on the *outputs* of producers (each conv block, each
residual add, and the image input), and every tensor that reaches a quantized conv only through
quantization-agnostic ops (concat, chunk/split, max-pool, nearest upsample) is covered by them. Tensors that meet in
a concat must share one scale (otherwise the concat needs requantization); this is derived by tracing one forward
pass, not from a list of layer indices, so it holds for every model built from the supported blocks.

A shared quantizer serves several producer "sites"; each site keeps its own observer statistics and the scale covers
their union (see ``ObserverBase``). Shared quantizers live once in ``model.qat_quantizers`` (a ModuleDict) and sites
hold plain references, so ``state_dict`` holds each scale once and ``deepcopy`` (EMA) keeps the sharing.

The work is split by job: ``quant_modules`` (the swapped-in blocks and sites), ``tracing`` (which sites share a
scale), ``prepare`` (swap, trace, attach; and undo), ``placement`` (the plain-data description), ``switches``
(observer / fake-quant switches) and ``checkpoint`` (self-describing checkpoints). This module is their public face.
"""

from __future__ import annotations

from src.models.checkpoint import (FP32_METRICS_KEY, QAT_CHECKPOINT_KEY, QAT_FORMAT_VERSION, build_from_checkpoint,
                                   fp32_metrics_record, qat_checkpoint, same_architecture, stored_fp32_metrics)
from src.models.placement import GroupPlacement, LayerPlacement, Placement
from src.models.prepare import deployed_layers, prepare_qat_model, to_float
from src.models.quant_modules import QuantBottleneck, QuantConv, Site, UnsupportedModuleError
from src.models.switches import is_qat_model, quantizers, refresh_weight_qparams, set_fake_quant, set_observers

__all__ = [
    "FP32_METRICS_KEY",
    "QAT_CHECKPOINT_KEY",
    "QAT_FORMAT_VERSION",
    "GroupPlacement",
    "LayerPlacement",
    "Placement",
    "QuantBottleneck",
    "QuantConv",
    "Site",
    "UnsupportedModuleError",
    "build_from_checkpoint",
    "deployed_layers",
    "fp32_metrics_record",
    "is_qat_model",
    "prepare_qat_model",
    "qat_checkpoint",
    "quantizers",
    "refresh_weight_qparams",
    "same_architecture",
    "set_fake_quant",
    "set_observers",
    "stored_fp32_metrics",
    "to_float",
]
