"""The QAT hot path never reads a tensor back to the host: on a GPU each read would stall the launch queue."""

from __future__ import annotations

import pytest
import torch

from helpers import calibrated_qat_model
from src.analysis.host_syncs import count_host_syncs, output_tensors
from src.models.yolov8_qat import quantizers, set_observers
from src.quantization.observers import MinMaxObserver, nonfinite_observers, take_nonfinite_names


def _step(model):
    def run():
        out = model(torch.rand(2, 3, 64, 64))
        sum(t.float().sum() for t in output_tensors(out)).backward()
    return run


def test_the_counter_sees_a_sync_and_restores_the_methods():
    original = torch.Tensor.item
    assert sum(count_host_syncs(lambda: torch.ones(1).item()).values()) == 1
    assert torch.Tensor.item is original


@pytest.mark.parametrize("qconfig", [None, "sensitive"])  # STE / LSQ
def test_frozen_range_qat_step_makes_no_host_sync(qconfig):
    model, _ = calibrated_qat_model(64, qconfig=qconfig)
    model.train()
    set_observers(model, False)
    counts = count_host_syncs(_step(model))
    assert sum(counts.values()) == 0, counts.most_common(5)  # it was 305 (242 item, 63 bool) for yolov8n


def test_qat_step_with_observers_running_makes_no_host_sync():
    """With the trainer's deferred finite checks the observers too stay on the device (one read per step, later)."""
    # min/max-style activation observers follow during QAT (histogram ones stay frozen after calibration)
    model, _ = calibrated_qat_model(64, overrides={"quantization.activation.observer": "moving_average_minmax"})
    model.train()
    set_observers(model, True, histograms=False)
    observers = [q.observer for _, q in quantizers(model) if q.observing]
    assert sum(o.kind == "moving_average_minmax" for o in observers) >= 30  # of 44 activation quantizers
    for o in observers:
        o.defer_finite_check = True
    counts = count_host_syncs(_step(model))
    assert sum(counts.values()) == 0, counts.most_common(5)
    assert not bool(nonfinite_observers(observers))


def test_deferred_finite_check_flags_on_the_device_and_names_the_layer():
    ok, bad = MinMaxObserver(0, 255, False, name="model.3.conv"), MinMaxObserver(0, 255, False, name="model.4.conv")
    for o in (ok, bad):
        o.defer_finite_check = True
    ok.collect(torch.rand(8))
    bad.collect(torch.tensor([0.0, float("nan")]))  # no error here: nothing is read back
    assert bool(nonfinite_observers([ok, bad]))
    assert take_nonfinite_names([ok, bad]) == ["model.4.conv"]
    assert not bool(nonfinite_observers([ok, bad]))  # taking the names clears the flags


def test_the_trainer_reads_loss_items_and_the_finite_flag_in_one_host_sync():
    from src.training.trainer import read_step_values

    items = {"box": torch.tensor(1.5), "cls": torch.tensor([0.25]), "kd_cls": torch.tensor(0.125)}
    out = {}
    counts = count_host_syncs(lambda: out.update(zip(("items", "finite"), read_step_values(items, torch.tensor(True)))))
    assert sum(counts.values()) == 1, counts  # it was one float() per item plus bool(finite): 4 here
    assert out["items"] == {"box": 1.5, "cls": 0.25, "kd_cls": 0.125} and out["finite"] is True
    assert read_step_values({"box": torch.tensor(float("nan"))}, torch.tensor(False))[1] is False


def test_the_oscillation_dampening_term_makes_no_host_sync():
    from src.models.oscillation import quantized_weight_convs, weight_grid_distance

    model, _ = calibrated_qat_model(64, qconfig="w4a8")
    model.train()
    set_observers(model, False)
    convs = quantized_weight_convs(model)

    def run():
        out = model(torch.rand(2, 3, 64, 64))
        (sum(t.float().sum() for t in output_tensors(out)) + 1e-4 * weight_grid_distance(convs)).backward()

    counts = count_host_syncs(run)
    assert sum(counts.values()) == 0, counts.most_common(5)
