"""Per-layer quantization error: SQNR and MSE between float and fake-quant conv outputs.

Two views, both on the same batch:
  * isolated: only that layer's quantizers (its weight and its input) are on; everything upstream is float, so the
    number is the error this layer adds by itself -- what mixed precision ranks layers by.
  * cumulative: the whole model quantized; the error at that layer's output against the float model's output at the
    same layer -- where the error actually builds up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from src.models.yolov8_qat import QuantConv, quantizers


@dataclass
class LayerError:
    name: str
    sqnr_isolated_db: float
    mse_isolated: float
    sqnr_cumulative_db: float
    mse_cumulative: float


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum(ref^2) / sum((ref - test)^2)) in dB (inf when exact)."""
    ref, t = reference.double(), test.double()
    noise = float(((ref - t) ** 2).sum())
    signal = float((ref ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def mse(reference: torch.Tensor, test: torch.Tensor) -> float:
    return float(((reference.double() - test.double()) ** 2).mean())


def _conv_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output of every QuantConv for input ``x`` (model in eval mode, no observers)."""
    outs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: outs.__setitem__(n, out.detach()))
             for n, m in model.named_modules() if isinstance(m, QuantConv)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def _fake_quant_switches(model: nn.Module) -> dict[str, bool]:
    return {n: q.fake_quantizing for n, q in quantizers(model)}


def _restore_switches(model: nn.Module, state: dict[str, bool]) -> None:
    for n, q in quantizers(model):
        q.enable_fake_quant(state[n])


def layer_errors(model: nn.Module, x: torch.Tensor) -> list[LayerError]:
    """Isolated and cumulative SQNR/MSE of every quantized conv of a prepared, calibrated model on batch ``x``.

    The model's switches and training mode are restored afterwards; observers never run (eval mode).
    """
    was_training = model.training
    switches = _fake_quant_switches(model)
    model.eval()
    try:
        for _, q in quantizers(model):
            q.enable_fake_quant(False)
        float_out = _conv_outputs(model, x)
        for _, q in quantizers(model):
            q.enable_fake_quant(True)
        quant_out = _conv_outputs(model, x)
        results = []
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv) and m.weight_quant is not None]
        for name, conv in convs:
            for _, q in quantizers(model):
                q.enable_fake_quant(False)
            conv.weight_quant.enable_fake_quant(True)
            site = conv.input_site
            # the quantizer feeding this conv: its own input site, or the producer group recorded in the placement
            group = next((l.input_group for l in model.qat_placement.layers if l.name == name), None)
            if site is not None:
                site.quantizer.enable_fake_quant(True)
            elif group is not None:
                model.qat_quantizers[group].enable_fake_quant(True)
            iso = _conv_outputs(model, x)[name]
            ref = float_out[name]
            results.append(LayerError(name, sqnr_db(ref, iso), mse(ref, iso), sqnr_db(ref, quant_out[name]),
                                      mse(ref, quant_out[name])))
        return results
    finally:
        _restore_switches(model, switches)
        model.train(was_training)
