"""Oscillation dampening: the grid-distance term's values and gradient, its ramp, and its use in the QAT loop."""

from __future__ import annotations

import csv
import math

import torch

from src.cli import main
from src.config import load_config
from src.models.oscillation import dampening_weight, quantized_weight_convs, weight_grid_distance
from src.models.yolov8_qat import prepare_qat_model
from src.quantization.utils import grid_distance


def _weights_off_midpoints(scale: torch.Tensor, shape=(4, 3, 3, 3), seed: int = 0) -> torch.Tensor:
    """Per-channel weights whose w/s are at least 0.05 steps from a rounding midpoint, some beyond [-8, 7]."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-10, 10, shape, generator=g).float()
    frac = torch.rand(shape, generator=g) * 0.8 - 0.4  # |frac| <= 0.4: never on a midpoint
    return (codes + frac) * scale.reshape(-1, 1, 1, 1)


def test_grid_distance_equals_the_formula_with_torch_fake_quant():
    scale = torch.tensor([0.02, 0.05, 0.1, 0.3])
    zero_point = torch.tensor([0, 1, -2, 0], dtype=torch.int32)
    w = _weights_off_midpoints(scale)
    target = torch.fake_quantize_per_channel_affine(w, scale, zero_point, 0, -8, 7)
    s = scale.reshape(-1, 1, 1, 1)
    zp = zero_point.reshape(-1, 1, 1, 1).float()
    clipped = torch.minimum(torch.maximum(w, (-8 - zp) * s), (7 - zp) * s)
    expected = (((target - clipped) / s) ** 2).sum()
    got = grid_distance(w, scale, zero_point, -8, 7, axis=0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got > 0


def test_grid_distance_gradient_pulls_each_weight_to_its_code_and_stops_outside_the_range():
    scale = torch.tensor([0.02, 0.05, 0.1, 0.3])
    w = _weights_off_midpoints(scale, seed=1).requires_grad_(True)
    grid_distance(w, scale, None, -8, 7, axis=0).backward()
    s = scale.reshape(-1, 1, 1, 1)
    codes = w.detach() / s
    inside = (codes >= -8) & (codes <= 7)
    expected = torch.where(inside, 2 * (w.detach() - torch.round(codes) * s) / s**2, torch.zeros_like(w))
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-6)
    assert (w.grad[~inside] == 0).all() and (~inside).any()


def test_grid_distance_is_zero_on_the_grid_per_tensor():
    w = torch.arange(-8, 8, dtype=torch.float32) * 0.125
    assert grid_distance(w, torch.tensor(0.125), None, -8, 7) == 0


def test_dampening_weight_ramps_by_a_half_cosine():
    assert dampening_weight(2.0, 0.0) == 0.0
    assert dampening_weight(2.0, 1.0) == 2.0
    assert math.isclose(dampening_weight(2.0, 0.5), 1.0)
    assert dampening_weight(2.0, 1.7) == 2.0  # fine-tuning epochs past the QAT steps keep the peak


def test_weight_grid_distance_sums_every_quantized_conv_of_a_model():
    from ultralytics.nn.tasks import DetectionModel

    cfg = load_config("configs/qat_config.yaml")
    torch.manual_seed(0)
    m = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    prepare_qat_model(m, cfg)
    m.train()
    m(torch.rand(2, 3, 64, 64))
    convs = quantized_weight_convs(m)
    assert len(convs) == 63  # every conv but the DFL's fixed one
    total = weight_grid_distance(convs)
    by_hand = torch.zeros(())
    for c in convs:
        q = c.weight_quant
        s, zp = q.calculate_qparams()
        by_hand += grid_distance(c.conv.weight, s, zp, q.qmin, q.qmax, q.ch_axis)
    torch.testing.assert_close(total, by_hand, rtol=1e-5, atol=0)
    total.backward()
    assert all(c.conv.weight.grad is not None for c in convs)


def test_negative_dampening_is_refused_naming_the_flag_and_the_key(tiny_dataset, tmp_path, capsys):
    rc = main(["--model", "yolov8n.yaml", "--data", str(tiny_dataset), "--epochs", "1", "--img-size", "64",
               "--device", "cpu", "--save-dir", str(tmp_path / "r"), "--oscillation-dampening", "-1"])
    out = capsys.readouterr()
    assert rc != 0
    assert "--oscillation-dampening -1.0" in out.out + out.err
    assert "qat_params.oscillation_dampening" in out.out + out.err


def test_qat_with_dampening_logs_the_term_and_pulls_weights_to_the_grid(tiny_dataset, tmp_path):
    """Two runs from the same seed; the dampened one ends with its weights nearer their grid points."""
    distances = {}
    for lam in ("0", "1"):
        run = tmp_path / f"damp{lam}"
        assert main(["--model", "yolov8n.yaml", "--data", str(tiny_dataset), "--epochs", "1", "--img-size", "64",
                     "--batch-size", "4", "--qconfig", "w4a8", "--device", "cpu", "--workers", "0",
                     "--save-dir", str(run), "--log-dir", str(run / "logs"), "--seed", "3", "--lr", "0.01",
                     "--oscillation-dampening", lam]) == 0
        from src.models.checkpoint import build_from_checkpoint

        model, _ = build_from_checkpoint(torch.load(run / "weights" / "last.pt", weights_only=True))
        model.train()
        model(torch.rand(1, 3, 64, 64))  # weight qparams from the final weights
        distances[lam] = float(weight_grid_distance(quantized_weight_convs(model)))
        header = next(csv.reader((run / "results.csv").open()))
        assert any("dampening" in h for h in header) == (lam == "1")
    assert distances["1"] < distances["0"]
