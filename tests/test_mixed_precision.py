"""Mixed precision: budgeted assignment (exact knapsack), sensitivity measurement, cache, checkpoint round trip."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from src.config import ConfigError, load_config
from src.quantization.bit_allocation import (
    LayerSensitivity,
    MixedPrecisionError,
    SensitivityTable,
    assign_bits,
    average_bits,
    search_max_map_drop,
)
from src.stages.context import RunContext
from src.stages.mixed_precision import mixed_precision_stage


def _mp(**kw):
    return load_config(None, {f"mixed_precision.{k}": v for k, v in kw.items()}).mixed_precision


def _table(sens4: list[float], params: list[int], sens8: list[float] | None = None) -> SensitivityTable:
    sens8 = sens8 or [0.0] * len(sens4)
    return SensitivityTable(1.0, 8, [LayerSensitivity(f"model.{i}", p, {"4": s4, "8": s8}, {"4": 20.0, "8": 40.0})
                                     for i, (s4, s8, p) in enumerate(zip(sens4, sens8, params))])


def test_assignment_prefers_less_sensitive_layers_within_avg_bits_budget():
    sens = [0.9, 0.1, 0.5, 0.05, 0.7, 0.2]
    table = _table(sens, [100] * 6)
    a = assign_bits(table, _mp(budget_type="avg_bits", budget=6.0))  # room for exactly half the layers at 4 bits
    four = sorted(n for n, b in a.weight_bits.items() if b == 4)
    assert four == ["model.1", "model.3", "model.5"]  # the three least sensitive
    assert a.avg_bits == 6.0
    assert a.bit_overrides()["model.1"] == {"weight_bits": 4} and a.bit_overrides()["model.0"] == {"weight_bits": 8}


def test_assignment_is_the_exact_optimum_and_never_exceeds_budget():
    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 6
        params = [int(x) for x in torch.randint(10, 5000, (n,), generator=gen)]
        s4 = [float(x) for x in torch.rand(n, generator=gen)]
        s8 = [float(x) * 0.1 for x in torch.rand(n, generator=gen)]
        table = _table(s4, params, s8)
        allow_float = trial % 2 == 1
        kind = "avg_bits" if trial % 3 else "weight_memory"
        budget = float(4 + 4 * torch.rand(1, generator=gen)) if kind == "avg_bits" else float(
            0.5 + 0.5 * torch.rand(1, generator=gen))
        mp = _mp(budget_type=kind, budget=budget, allow_float=allow_float)
        a = assign_bits(table, mp)
        cap_bits = budget if kind == "avg_bits" else 8 * budget
        assert a.avg_bits <= cap_bits + 1e-12
        # brute force over every assignment
        options = [4, 8, None] if allow_float else [4, 8]
        best = math.inf
        for combo in itertools.product(options, repeat=n):
            wb = {f"model.{i}": b for i, b in enumerate(combo)}
            if average_bits(wb, {f"model.{i}": p for i, p in enumerate(params)}) <= cap_bits + 1e-12:
                # 4 bits are never counted better than 8 (a lower measured loss change is noise)
                v = sum(0.0 if b is None else (max(s4[i], s8[i]) if b == 4 else s8[i]) for i, b in enumerate(combo))
                best = min(best, v)
        assert a.predicted == pytest.approx(best, abs=1e-12), trial  # integer costs: the DP is exact


def test_ties_spend_the_budget_on_precision():
    # noise-level sensitivities: 4 bits measured "better" than 8 counts as equal, and the budget buys precision
    table = _table([-0.01, -0.02, 0.0, -0.03], [100] * 4, sens8=[0.0] * 4)
    a = assign_bits(table, _mp(budget_type="avg_bits", budget=6.0))
    assert a.avg_bits == 6.0 and a.predicted == 0.0


def test_float_counts_32_bits_and_pinned_layers_keep_their_width():
    table = _table([5.0, 0.1, 0.1], [10, 3000, 1000], sens8=[1.0, 0.0, 0.0])
    table.layers[2].pinned_bits = 8
    a = assign_bits(table, _mp(budget_type="avg_bits", budget=6.0, allow_float=True))
    # the tiny layer, sensitive even at 8 bits, stays float (32 bits x 10 params is cheap); the pinned one stays 8
    assert a.weight_bits == {"model.0": None, "model.1": 4, "model.2": 8}
    assert a.avg_bits == pytest.approx((10 * 32 + 3000 * 4 + 1000 * 8) / 4010)
    assert a.bit_overrides()["model.0"] == {"float": True}
    assert a.to_dict()["float_layers"] == ["model.0"]


def test_infeasible_budget_names_the_smallest_possible():
    table = _table([0.1, 0.1], [100, 100])
    table.layers[0].pinned_bits = 8
    with pytest.raises(MixedPrecisionError, match=r"smallest possible is 6\.000 bits"):
        assign_bits(table, _mp(budget_type="avg_bits", budget=5.0))


def test_config_checks():
    with pytest.raises(ConfigError, match="activation_bits.*single value"):
        _mp(activation_bits=[6, 8])
    with pytest.raises(ConfigError, match="weight_memory|below what the smallest"):
        _mp(budget_type="weight_memory", budget=0.4)
    with pytest.raises(ConfigError, match="did you mean 'sensitivity_metric'"):
        load_config(None, {}).from_dict({"mixed_precision": {"sensitivity_metrc": "loss"}})


def test_max_map_drop_search_keeps_the_drop_within_budget():
    sens = [0.01, 0.02, 0.5, 0.03]
    table = _table(sens, [100] * 4)

    # a deterministic stand-in for PTQ validation: every 4-bit layer costs 10x its sensitivity in mAP points
    def evaluate(a):
        return 0.60 - sum(0.1 * sens[int(n.split(".")[1])] for n, b in a.weight_bits.items() if b == 4)

    a, points = search_max_map_drop(table, _mp(budget_type="max_map_drop", budget=1.0, search_steps=4), evaluate)
    assert (0.60 - evaluate(a)) * 100 <= 1.0 + 1e-9
    assert a.weight_bits["model.2"] == 8  # the sensitive one stays at 8
    assert sum(b == 4 for b in a.weight_bits.values()) == 3  # and the three cheap ones go to 4
    assert points[0]["label"] == "uniform W8" and points[0]["drop_points"] == 0.0
    assert all(p["drop_points"] == pytest.approx((0.60 - p["map50_95"]) * 100) for p in points)


# ---------------------------------------------------------------------------------------------------------- real model
def _cfg(tmp_path, **mp):
    return load_config(None, {"train_params.img_size": 64, "train_params.batch_size": 4, "train_params.device": "cpu",
                              "train_params.workers": 0, "qat_params.calibration_batch_size": 4,
                              "mixed_precision.sensitivity_images": 2, "qat_params.skip_detection_head": True,
                              "mixed_precision.cache_dir": str(tmp_path / "cache"),
                              **{f"mixed_precision.{k}": v for k, v in mp.items()}})


def _fp32():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    m = DetectionModel("yolov8n.yaml", nc=3, verbose=False).eval()
    m.names = {0: "circle", 1: "square", 2: "triangle"}
    return m


def _ctx(cfg, data: dict, data_yaml: str, tmp_path) -> RunContext:
    return RunContext(cfg, data, data_yaml, torch.device("cpu"), -1, tmp_path / "run", tmp_path / "exported",
                      tmp_path / "logs", "quantized_model.pt", None, True, False, False, False, False)


def test_stage_measures_caches_assigns_and_round_trips_through_checkpoint(tiny_dataset, tmp_path):
    from src.data.resolve import resolve_data
    from src.models.yolov8_qat import build_from_checkpoint, prepare_qat_model, qat_checkpoint
    from src.stages.sensitivity import sensitivity_batches

    cfg = _cfg(tmp_path, budget_type="avg_bits", budget=6.0)
    data = resolve_data(str(tiny_dataset))
    fp32 = _fp32()
    dev = torch.device("cpu")
    ctx = _ctx(cfg, data, str(tiny_dataset), tmp_path)
    res = mixed_precision_stage(ctx, fp32, progress=False)
    assert not res.cached and res.assignment.avg_bits <= 6.0
    assert all(l.sqnr_db["4"] < l.sqnr_db["8"] for l in res.table.layers)  # fewer bits, more noise
    # Pareto points: uniform W8, uniform W4 and the mix, each a real PTQ validation
    assert [p["label"] for p in res.points] == ["uniform W8A8", "uniform W4A8", "mixed (chosen)"]
    assert all(p["map50_95"] is not None for p in res.points)

    again = mixed_precision_stage(ctx, fp32, progress=False)
    assert again.cached and again.table.to_dict() == res.table.to_dict() and again.bit_overrides == res.bit_overrides

    # recompute one layer's numbers directly: only its 4-bit weight quantizer on
    name = res.table.layers[5].name
    batches = sensitivity_batches(cfg, data, dev, 32)
    from src.stages.sensitivity import _detection_loss, ptq_on_batches
    from src.models.yolov8_qat import set_fake_quant
    from src.training.data import hyperparameters
    from src.analysis.layer_error import sqnr_db

    m = ptq_on_batches(fp32, cfg, {l.name: {"weight_bits": 4} for l in res.table.layers}, batches)
    m.args = hyperparameters(cfg)
    set_fake_quant(m, False)
    base = _detection_loss(m, batches)
    conv = m.get_submodule(name)
    outs = {}
    h = conv.register_forward_hook(lambda mod, i, o: outs.setdefault("f" if "f" not in outs else "q", o))
    with torch.no_grad():
        m(batches[0]["img"])
        conv.weight_quant.enable_fake_quant(True)
        m(batches[0]["img"])
    h.remove()
    assert res.table.float_loss == pytest.approx(base, rel=1e-6)
    assert res.table.layers[5].loss["4"] == pytest.approx(_detection_loss(m, batches) - base, rel=1e-5, abs=1e-9)
    assert res.table.layers[5].sqnr_db["4"] == pytest.approx(sqnr_db(outs["f"], outs["q"]), abs=1e-6)

    # the choice is prepared, stored in the checkpoint and rebuilt identically
    model = _fp32()
    placement = prepare_qat_model(model, cfg, bit_overrides=res.bit_overrides)
    bits = {l.name: l.weight_bits for l in placement.layers if l.quantized}
    assert bits == {n: b for n, b in res.assignment.weight_bits.items()}
    rebuilt, _ = build_from_checkpoint(qat_checkpoint(model, cfg))
    assert rebuilt.qat_placement.bit_overrides == res.bit_overrides
    assert {l.name: l.weight_bits for l in rebuilt.qat_placement.layers if l.quantized} == bits
    out = res.write(tmp_path / "run")
    assert (out / "pareto.png").stat().st_size > 0 and "packed INT4" in (out / "report.md").read_text()


def test_weight_memory_counts_what_the_onnx_export_stores():
    """6-bit weights are stored as int8: under a memory budget they save nothing, 4-bit ones (packed INT4) do."""
    from src.quantization.bit_allocation import stored_bits

    assert [stored_bits(b) for b in (2, 4, 5, 6, 8, None)] == [4, 4, 8, 8, 8, 32]
    layers = [LayerSensitivity(f"model.{i}", 100, {"4": 0.5, "6": 0.01, "8": 0.0}, {"4": 20.0, "6": 30.0, "8": 40.0})
              for i in range(4)]
    table = SensitivityTable(1.0, 8, layers)
    a = assign_bits(table, _mp(weight_bits=[4, 6, 8], budget_type="weight_memory", budget=0.75))
    assert sorted(a.weight_bits.values()) == [4, 4, 8, 8]  # 6 bits would cost 8 stored bits and save nothing
    assert a.weight_memory == 0.75 and a.weight_bytes() == 2 * 100 * 0.5 + 2 * 100
    # an average-bits budget counts nominal bits: 6-bit layers are the cheap choice there
    b = assign_bits(table, _mp(weight_bits=[4, 6, 8], budget_type="avg_bits", budget=6.0))
    assert sorted(b.weight_bits.values()) == [6, 6, 6, 6] and b.weight_memory == 1.0
