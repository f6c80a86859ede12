"""AdaRound: the relaxation's numerics, the patch sampling it optimises on, and what it writes into a model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.models.adaround import (ReconstructionSamples, adaround, keep_range_elements, learn_rounding, patch_conv,
                                 roundable_convs, sample_patches)
from src.quantization import adaround as ar
from tests.helpers import calibrated_qat_model


def _weights_off_midpoints(shape, scale: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Weights whose codes w/s lie at least 0.05 away from every half-integer (rounding is unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-120, 120, shape, generator=g).float()
    frac = 0.05 + 0.4 * torch.rand(shape, generator=g)
    frac = torch.where(torch.rand(shape, generator=g) < 0.5, frac, 1.0 - frac)  # below or above .5
    return (codes + frac) * scale.reshape(-1, *([1] * (len(shape) - 1)))


def test_initial_offsets_are_the_fractional_codes_and_hard_offsets_round_to_nearest():
    scale = torch.tensor([0.01, 0.02, 0.005])
    w = _weights_off_midpoints((3, 4, 3, 3), scale)
    v = ar.initial_logits(w, scale, 0)
    codes = w * (1.0 / scale.reshape(-1, 1, 1, 1))
    assert torch.allclose(ar.rectified_sigmoid(v), codes - torch.floor(codes), atol=1e-5, rtol=0)
    hard = ar.rounded_weight(ar.floor_codes(w, scale, 0), ar.hard_offset(v), scale, -127, 127, 0)
    ref = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(3, dtype=torch.int32), 0, -127, 127)
    assert torch.equal(hard, ref)


def test_rounded_weight_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    floor = torch.randint(-5, 5, (2, 6), generator=g).double()
    v = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([0.5, 0.25], dtype=torch.float64)
    x = torch.randn(6, generator=g, dtype=torch.float64)
    f = lambda v: (ar.rounded_weight(floor, ar.rectified_sigmoid(v), scale, -127, 127, 0) @ x).pow(2).sum()  # noqa
    assert torch.autograd.gradcheck(f, (v,))


def test_regularizer_is_zero_at_binary_offsets_and_beta_anneals_after_warmup():
    assert float(ar.rounding_regularizer(torch.tensor([0.0, 1.0, 1.0]), 2.0)) == 0.0
    assert float(ar.rounding_regularizer(torch.tensor([0.5]), 2.0)) == 1.0
    assert ar.beta_at(0, 100) is None and ar.beta_at(19, 100) is None
    assert ar.beta_at(20, 100) == ar.BETA_START and ar.beta_at(100, 100) == ar.BETA_END
    assert ar.beta_at(60, 100) == pytest.approx((ar.BETA_START + ar.BETA_END) / 2)


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 2, 2), (2, 0, 1, 4)])
def test_sampled_patches_through_patch_conv_equal_the_conv_outputs(stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride, padding, dilation, groups, bias=True).double()
    x = torch.randn(2, 8, 11, 9, dtype=torch.float64)
    y = conv(x)  # (2, 12, oh, ow)
    index = torch.randperm(y.shape[0] * y.shape[2] * y.shape[3])[:20]
    patches = sample_patches(x, conv, index)
    expected = y.permute(0, 2, 3, 1).reshape(-1, 12)[index]
    got = patch_conv(patches, conv.weight, conv.bias, groups)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)


def test_keep_range_elements_restores_the_nearest_code_of_each_channels_extreme():
    scale = torch.tensor([0.1, 0.2])
    w = torch.tensor([[12.69, -3.0, 0.04], [-25.38, 1.0, 2.0]])  # extremes at codes 126.9 and -126.9
    rounded = torch.tensor([[12.6, -3.0, 0.0], [-25.2, 1.0, 2.0]])  # extremes rounded towards zero
    keep_range_elements(rounded, w, scale, -127, 127, 0)
    assert torch.equal(rounded, torch.tensor([[127 * 0.1, -3.0, 0.0], [-127 * 0.2, 1.0, 2.0]]))


def _layer_problem(seed: int = 0):
    """A calibrated model's first conv and a reconstruction problem of its own (image patches, float targets)."""
    model, _ = calibrated_qat_model(64)
    block = dict(roundable_convs(model))["model.0"]
    g = torch.Generator().manual_seed(seed)
    samples = ReconstructionSamples(block, per_image=300, generator=g)
    with torch.no_grad():
        for _ in range(2):
            x = torch.rand(4, 3, 64, 64, generator=g)
            samples.collect_float(x)
            samples.collect_quantized(x)
    return model, block, samples.compute()


@torch.no_grad()
def _reconstruction_error(block, weight, inputs, targets) -> float:
    c = block.conv
    return float((block.act(patch_conv(inputs, weight, c.bias, c.groups)) - targets).pow(2).sum(1).mean())


def test_learned_rounding_reconstructs_better_than_nearest_and_stays_on_the_grid():
    _, block, (inputs, targets) = _layer_problem()
    q = block.weight_quant
    nearest = q(block.conv.weight.detach())
    rounded = learn_rounding(block, inputs, targets, iterations=300, generator=torch.Generator().manual_seed(0))
    assert torch.equal(q(rounded), rounded)  # every weight is a code times the scale
    assert not torch.equal(rounded, nearest)  # some weights were rounded the other way: the test can fail
    assert _reconstruction_error(block, rounded, inputs, targets) < _reconstruction_error(block, nearest, inputs,
                                                                                         targets)
    # codes move by at most one step from the nearest ones
    scale = q.calculate_qparams()[0].reshape(-1, 1, 1, 1)
    assert float(((rounded - nearest) / scale).abs().max()) <= 1.0 + 1e-4


def test_adaround_writes_grid_weights_that_keep_the_calibrated_ranges():
    model, _ = calibrated_qat_model(64)
    scales = {n: m.weight_quant.calculate_qparams()[0] for n, m in roundable_convs(model)}
    before = {n: m.conv.weight.detach().clone() for n, m in roundable_convs(model)}
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(2, 3, 64, 64, generator=g) for _ in range(2)]
    n = adaround(model, lambda: iter(images), 4, iterations=20, positions=64, progress=False)
    assert n == 63 == len(scales)
    flipped = 0
    for name, m in roundable_convs(model):
        q, w = m.weight_quant, m.conv.weight.detach()
        assert torch.equal(q(w), w), name
        flipped += int((q(before[name]) != w).sum())
        # the min/max range re-derived from the rounded weights gives the calibrated scale back
        q.observer.reset()
        q.observer.collect(w, 0)
        assert torch.allclose(q.observer.compute()[0], scales[name], rtol=1e-6, atol=0), name
    assert flipped > 0


def test_adaround_leaves_quantizer_switches_as_they_were():
    model, _ = calibrated_qat_model(64)
    off = dict(roundable_convs(model))["model.2.cv1"].weight_quant
    off.enable_fake_quant(False)  # e.g. a layer kept float
    images = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))]
    adaround(model, lambda: iter(images), 2, iterations=2, positions=16, progress=False)
    assert not off.fake_quantizing
    assert all(q.fake_quantizing for n, q in model.named_modules() if hasattr(q, "fake_quantizing") and q is not off)


def test_model_output_moves_towards_the_float_model_on_the_rounding_images():
    """End to end on the images AdaRound learned from: the quantized model's head output error against the same
    model with fake quant off does not grow."""
    model, _ = calibrated_qat_model(64)
    g = torch.Generator().manual_seed(3)
    images = [0.2 + 0.6 * torch.rand(4, 3, 64, 64, generator=g) for _ in range(2)]

    def error() -> float:
        from src.models.switches import set_fake_quant
        with torch.no_grad():
            set_fake_quant(model, False)
            ref = [model(x)[0] for x in images]
            set_fake_quant(model, True)
            out = [model(x)[0] for x in images]
        return sum(float(F.mse_loss(o, r)) for o, r in zip(out, ref))

    before = error()
    adaround(model, lambda: iter(images), 8, iterations=200, positions=1024, progress=False)
    assert error() < before


def test_adaround_flag_rounds_the_ptq_checkpoint_weights_onto_their_grid(tiny_dataset, tmp_path):
    """``--adaround`` reaches the calibration stage: the saved PTQ model's weights are the learned codes times the
    scale, and differ from nearest rounding of the FP32 weights somewhere."""
    from src.cli import main
    from src.models.checkpoint import build_from_checkpoint

    cfg_text = open("configs/qat_config.yaml").read().replace("adaround_iterations: 1000", "adaround_iterations: 30")
    assert "adaround_iterations: 30" in cfg_text
    (tmp_path / "cfg.yaml").write_text(cfg_text)
    runs = {}
    for name, extra in (("nearest", []), ("adaround", ["--adaround"])):
        run = tmp_path / name
        assert main(["--model", "yolov8n.yaml", "--data", str(tiny_dataset), "--img-size", "64", "--batch-size", "4",
                     "--device", "cpu", "--workers", "0", "--seed", "1", "--epochs", "0", "--config",
                     str(tmp_path / "cfg.yaml"), "--save-dir", str(run), "--log-dir", str(run / "logs"),
                     *extra]) == 0
        runs[name], _ = build_from_checkpoint(torch.load(run / "quantized_model.pt", weights_only=True))
    flipped = 0
    nearest = dict(roundable_convs(runs["nearest"]))
    for name, m in roundable_convs(runs["adaround"]):
        w = m.conv.weight.detach()
        assert torch.equal(m.weight_quant(w), w), name
        flipped += int((nearest[name].weight_quant(nearest[name].conv.weight.detach()) != w).sum())
    assert flipped > 0
