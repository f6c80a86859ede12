"""Bias correction: each quantized conv's output mean on the calibration images equals its float output mean."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from src.models.bias_correction import OutputShift, correct_biases, correctable_convs
from tests.helpers import calibrated_qat_model


def _images(n: int = 3, imgsz: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [0.3 + 0.5 * torch.rand(2, 3, imgsz, imgsz, generator=g) for _ in range(n)]


def _output_means(block, images, model) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean over the images of (quantized conv + bias, float conv + original bias) at ``block``."""
    seen = []
    h = block.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for x in images:
            model(x)
    h.remove()
    x = torch.cat(seen)
    site = block._site("input_site")
    c = block.conv
    q = F.conv2d(site(x) if site is not None else x, block.quantized_weight(), c.bias, c.stride, c.padding)
    f = F.conv2d(x, c.weight, None, c.stride, c.padding)
    return q.mean((0, 2, 3)), f.mean((0, 2, 3))


def test_first_conv_output_mean_is_restored_exactly():
    """model.0 sees the image, which no correction upstream changes: one pass makes the means equal."""
    model, _ = calibrated_qat_model(64)
    block = dict(correctable_convs(model))["model.0"]
    original_bias = block.conv.bias.detach().clone()
    images = _images()
    q, f = _output_means(block, images, model)
    before = (q - (f + original_bias)).abs().max()
    assert before > 1e-4  # quantization did shift the mean: the test can fail
    n = correct_biases(model, lambda: iter(images), num_images=6, passes=1)
    assert n == 63
    q, f = _output_means(block, images, model)
    assert torch.allclose(q, f + original_bias, atol=1e-5, rtol=0), (q - f - original_bias).abs().max()


def test_passes_restart_from_the_original_bias_and_only_num_images_are_used():
    model, _ = calibrated_qat_model(64)
    block = dict(correctable_convs(model))["model.0"]
    start = block.conv.bias.detach().clone()
    images = _images()
    correct_biases(model, lambda: iter(images), num_images=2, passes=2)  # only the first batch (2 images)
    shift = OutputShift()
    with torch.no_grad():
        shift.collect(block, images[0])
    # model.0's input does not depend on corrections: pass 2 measures the same shift and does not add it twice
    assert torch.allclose(block.conv.bias, start - shift.compute(), atol=1e-6, rtol=0)


def test_unfused_convs_are_left_to_their_batchnorm():
    model, _ = calibrated_qat_model(64, overrides={"qat_params.fuse_modules": False})
    names = [n for n, _ in correctable_convs(model)]
    assert names and all(n.startswith("model.22.") for n in names)  # only the head's plain output convs
    assert len(names) == 6
