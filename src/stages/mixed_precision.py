"""Mixed precision: sensitivity (cached), bit assignment under the budget and PTQ Pareto points, before preparation."""

from __future__ import annotations

import copy
import logging

from torch import nn

from src.analysis.mixed_precision_report import MixedPrecisionResult
from src.models.yolov8_qat import prepare_qat_model
from src.quantization.bit_allocation import Assignment, assign_bits, search_max_map_drop, uniform_assignment
from src.stages.context import RunContext
from src.stages.sensitivity import measure_sensitivity, ptq_on_batches, sensitivity_batches
from src.stages.sensitivity_cache import SensitivityCache, cache_key
from src.training.data import loader_stride
from src.training.evaluate import evaluate

LOGGER = logging.getLogger("yolov8_qat")


def mixed_precision_stage(ctx: RunContext, fp32_model: nn.Module, *, progress: bool = True) -> MixedPrecisionResult:
    """Measure (or load) the sensitivities, assign bits within ``mixed_precision``'s budget, measure PTQ points.

    Args:
        fp32_model: The float model (not modified).
        progress: Progress bars.

    Returns:
        The result; prepare the model with ``result.bit_overrides``.
    """
    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    mp, tp = cfg.mixed_precision, cfg.train_params
    model = copy.deepcopy(fp32_model).to(device)
    key = cache_key(model, cfg, data)
    cache = SensitivityCache(mp.cache_dir, key)
    table = cache.table()
    cached = table is not None
    batches = sensitivity_batches(cfg, data, device, loader_stride(model))
    if cached:
        LOGGER.info(f"Sensitivity loaded from {cache.path}")
    else:
        table = measure_sensitivity(model, cfg, batches, progress=progress)
        table.key = key
        cache.put_table(table)
        LOGGER.info(f"Measured sensitivity of {len(table.layers)} layers x {len(mp.weight_bits)} widths on "
                    f"{table.images} images" + (f"; cached in {cache.path}" if cache.path else ""))
    act_bits = mp.activation_bits[0] if mp.activation_bits[0] != cfg.quantization.activation.bit_width else None

    def overrides(a: Assignment) -> dict:
        # group keys depend on which convs stay float, so they come from a placement with those weight choices
        weights_only = a.bit_overrides()
        if a.activation_bits is None:
            return weights_only
        scratch = copy.deepcopy(fp32_model)
        return a.bit_overrides([g.key for g in prepare_qat_model(scratch, cfg, bit_overrides=weights_only).groups])

    def ptq_map(a: Assignment) -> float:
        hit = cache.ptq_map(a)
        if hit is None:
            m = ptq_on_batches(model, cfg, overrides(a), batches)
            hit = evaluate(m, ctx.data_yaml, imgsz=tp.img_size, batch=tp.batch_size, device=device)
            hit = {"map50": hit["map50"], "map50_95": hit["map50_95"]}
            cache.put_ptq_map(a, hit)
        return hit["map50_95"]

    hi, lo = max(mp.weight_bits), min(mp.weight_bits)
    points: list[tuple[str, Assignment, float | None]] = []
    if mp.budget_type == "max_map_drop":
        chosen, measured = search_max_map_drop(table, mp, ptq_map, act_bits)
        points = [(p["label"], p["assignment"], p["map50_95"]) for p in measured]
    else:
        chosen = assign_bits(table, mp, act_bits)
        if mp.measure_pareto:
            points = [(f"uniform W{hi}A{mp.activation_bits[0]}", uniform_assignment(table, hi, act_bits), None),
                      (f"uniform W{lo}A{mp.activation_bits[0]}", uniform_assignment(table, lo, act_bits), None)]
            points = [(lbl, a, ptq_map(a)) for lbl, a, _ in points]
    result = MixedPrecisionResult(table, chosen, overrides(chosen), mp.budget_type, mp.budget,
                                  cached=cached)
    for label, a, m in points:
        result.add_point(label, a, m, "ptq")
    if mp.measure_pareto or mp.budget_type == "max_map_drop":
        result.add_point("mixed (chosen)", chosen, ptq_map(chosen), "ptq")
    floats = chosen.to_dict()["float_layers"]
    LOGGER.info(f"Mixed precision ({mp.budget_type} {mp.budget:g}): average weight bits {chosen.avg_bits:.3f} "
                f"({100 * chosen.weight_memory:.1f}% of INT8 weight memory as the ONNX export stores it); "
                + ", ".join(f"{sum(1 for b in chosen.weight_bits.values() if b == w)} layers W{w}"
                            for w in sorted(set(mp.weight_bits)))
                + (f"; kept float: {', '.join(floats)}" if floats else ""))
    return result
