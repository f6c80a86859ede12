"""Quantization ratio and model sizes, computed from a prepared model's modules and parameter counts.

Size conventions (bytes):
  * FP32: 4 bytes per parameter of the deployable model (conv/linear weights and biases, unfused BN affine), no
    quantizer state.
  * INT8 storage: quantized conv weights 1 byte each -- also sub-8-bit ones, which export as int8 holding their
    levels -- every other parameter 4 bytes, plus the quantizer parameters (float32 scales, 1-byte zero points).
  * ONNX storage: as INT8 storage but weights of <= 4 bits take half a byte (the QDQ ONNX export packs them as
    INT4); reported when some layer has fewer than 8 bits. 5- to 7-bit weights stay 1 byte, as stored.
"""

from __future__ import annotations

from torch import nn

from src.quantization.bit_allocation import stored_bits

from src.models.yolov8_qat import QuantConv, quantizers


def _conv_like(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Conv2d / nn.ConvTranspose2d / nn.Linear, named by its owning QuantConv block when it has one."""
    owners = {id(m.conv): n for n, m in model.named_modules() if isinstance(m, QuantConv)}
    kinds = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    return [(owners.get(id(m), n), m) for n, m in model.named_modules() if isinstance(m, kinds)]


def quantization_ratio(model: nn.Module) -> dict:
    """Quantized conv/linear layers over all of them, by count and by weight parameters, and who stays float.

    Args:
        model: A model prepared by ``prepare_qat_model``.
    """
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantConv) and m.weight_quant is not None}
    reasons = {l.name: l.reason for l in getattr(model, "qat_placement").layers if not l.quantized}
    rows, float_layers = [], []
    for name, m in _conv_like(model):
        q = name in quantized
        rows.append((name, m.weight.numel(), q))
        if not q:
            block = name[: -len(".conv")] if name.endswith(".conv") and name[: -len(".conv")] in reasons else name
            name = block
            why = reasons.get(block) or ("DFL: fixed integral, not a learned layer" if ".dfl" in name else "not quantized")
            float_layers.append({"name": name, "params": m.weight.numel(), "reason": why})
    n_q = sum(q for _, _, q in rows)
    p_all = sum(p for _, p, _ in rows)
    p_q = sum(p for _, p, q in rows if q)
    return {"layers_total": len(rows), "layers_quantized": n_q, "ratio_layers": n_q / max(len(rows), 1),
            "weight_params_total": p_all, "weight_params_quantized": p_q, "ratio_params": p_q / max(p_all, 1),
            "float_layers": float_layers}


def model_sizes(model: nn.Module) -> dict:
    """FP32, INT8-storage and (when some weights have < 8 bits) QDQ ONNX storage sizes in bytes."""
    quant_param_ids = {id(p) for _, q in quantizers(model) for p in q.parameters()}
    wq = {id(m.conv.weight): m.weight_quant.bit_width for m in model.modules()
          if isinstance(m, QuantConv) and m.weight_quant is not None}
    n_params = 0
    storage = packed = 0.0
    for p in model.parameters():
        if id(p) in quant_param_ids:
            continue
        n_params += p.numel()
        if id(p) in wq:
            storage += p.numel()
            packed += p.numel() * stored_bits(wq[id(p)]) / 8
        else:
            storage += 4 * p.numel()
            packed += 4 * p.numel()
    qparams = 0
    for _, q in quantizers(model):
        scale, zp = q.calculate_qparams()
        qparams += 4 * scale.numel() + zp.numel()
    bits = sorted(set(wq.values()))
    out = {"params": n_params, "fp32_bytes": 4 * n_params, "int8_storage_bytes": storage + qparams,
           "quantizer_bytes": qparams, "weight_bits": bits, "sub_8_bit": any(b < 8 for b in bits)}
    if out["sub_8_bit"]:
        out["onnx_storage_bytes"] = packed + qparams
    return out
