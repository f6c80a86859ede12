"""The QAT hot path never reads a tensor back to the host: on a GPU each read would stall the launch queue."""

from __future__ import annotations

import collections
import traceback

import pytest
import torch

from helpers import calibrated_qat_model
from src.models.yolov8_qat import quantizers, set_observers
from src.quantization.observers import MinMaxObserver, nonfinite_observers, take_nonfinite_names

SYNCING = ("item", "__bool__", "__float__", "__int__", "tolist")


def _leaves(o):
    if isinstance(o, torch.Tensor):
        yield o
    elif isinstance(o, dict):
        for v in o.values():
            yield from _leaves(v)
    elif isinstance(o, (list, tuple)):
        for v in o:
            yield from _leaves(v)


def count_host_syncs(monkeypatch, fn) -> collections.Counter:
    """Calls of Tensor.item/__bool__/__float__/__int__/tolist while ``fn`` runs, by (method, file:line)."""
    counts: collections.Counter = collections.Counter()
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            frame = traceback.extract_stack()[-2]
            counts[(_name, f"{frame.filename}:{frame.lineno}")] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    monkeypatch.undo()
    return counts


def _step(model):
    def run():
        out = model(torch.rand(2, 3, 64, 64))
        sum(t.float().sum() for t in _leaves(out)).backward()
    return run


def test_the_counter_sees_a_sync(monkeypatch):
    assert sum(count_host_syncs(monkeypatch, lambda: torch.ones(1).item()).values()) == 1


@pytest.mark.parametrize("qconfig", [None, "sensitive"])  # STE / LSQ
def test_frozen_range_qat_step_makes_no_host_sync(monkeypatch, qconfig):
    model, _ = calibrated_qat_model(64, qconfig=qconfig)
    model.train()
    set_observers(model, False)
    counts = count_host_syncs(monkeypatch, _step(model))
    assert sum(counts.values()) == 0, counts.most_common(5)  # it was 305 (242 item, 63 bool) for yolov8n


def test_qat_step_with_observers_running_makes_no_host_sync(monkeypatch):
    """With the trainer's deferred finite checks the observers too stay on the device (one read per step, later)."""
    model, _ = calibrated_qat_model(64)
    model.train()
    set_observers(model, True, histograms=False)
    observers = [q.observer for _, q in quantizers(model) if q.observing]
    for o in observers:
        o.defer_finite_check = True
    counts = count_host_syncs(monkeypatch, _step(model))
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
