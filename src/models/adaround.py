"""AdaRound after calibration: each quantized conv learns, on calibration images, whether each weight rounds up or
down (numerics in ``src/quantization/adaround.py``).

Per conv the objective is the asymmetric reconstruction of the paper: the quantized layer, fed the input the
quantized model gives it, should reproduce ``act(conv(x, W) + b)`` of the float model on the float model's input.
Both are sampled at the same output positions of the same images (``positions`` per conv, spread over up to
``IMAGES`` calibration images kept in memory), so a conv's problem is a small least-squares problem over patches.
One float pass collects every conv's targets; then convs are rounded one at a time in execution order, each on the
inputs of a quantized pass (stopped at that conv) through the convs already rounded. Rounding all convs on inputs
collected with nearest-rounded upstream weights instead lets each conv compensate errors its upstream convs fix
themselves: on Ultralytics' COCO yolov8n at 320 px that took PTQ from 0.878 to 0.784 mAP50-95.

The result is written into the weights: every weight becomes ``s * q`` with its learned code ``q``, so the weight
quantizer (nearest rounding at the same scale) reproduces the learned codes exactly, and calibration state,
checkpoints and every export carry them without anything new. The element that sets a channel's min/max range keeps
its nearest code, so the range (and scale) re-derived from the rounded weights is the calibrated one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from src.errors import QATError
from src.models.quant_modules import QuantConv
from src.models.switches import quantizers
from src.quantization import adaround as ar

LOGGER = logging.getLogger("yolov8_qat")
ITERATIONS = 1000
POSITIONS = 4096  # sampled output positions per conv
BATCH = 512  # positions per optimisation step
LEARNING_RATE = 1e-2
IMAGES = 64  # calibration images kept in memory for the reconstruction


class _Stop(Exception):
    """Raised by the conv being rounded to skip the rest of the forward pass."""


def roundable_convs(model: nn.Module) -> list[tuple[str, QuantConv]]:
    """Quantized convs with a symmetric zero-point-0 weight quantizer and no unfused BN, in module order."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, QuantConv) and m.weight_quant is not None and m.norm is None:
            if m.transposed:  # the patch reconstruction below is written for a forward conv
                raise QATError(f"AdaRound: {n} is a transposed conv, which it does not support yet; set "
                               "qat_params.adaround: false for this model")
            q = m.weight_quant
            if q.symmetric and q.signed and q.fake_quantizing:
                out.append((n, m))
    return out


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def sample_patches(x: torch.Tensor, conv: nn.Conv2d, index: torch.Tensor) -> torch.Tensor:
    """The receptive-field patches of ``conv``'s outputs at flat ``index`` (into batch x out_h x out_w), as
    ``(len(index), C * kh * kw)`` rows in the weight's flattening order; zero padding as the conv pads."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"AdaRound supports zero-padded convs with explicit padding, got padding={conv.padding!r} "
                         f"padding_mode={conv.padding_mode!r}")
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
    oh, ow = output_size(x, conv)
    b, rest = index // (oh * ow), index % (oh * ow)
    oy, ox = rest // ow, rest % ow
    xp = F.pad(x, (pw, pw, ph, ph))
    rows = oy[:, None] * sh + torch.arange(kh, device=x.device) * dh
    cols = ox[:, None] * sw + torch.arange(kw, device=x.device) * dw
    patches = xp[b[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (n, kh, kw, C)
    return patches.permute(0, 3, 1, 2).reshape(index.numel(), -1)


def output_size(x: torch.Tensor, conv: nn.Conv2d) -> tuple[int, int]:
    (kh, kw), (sh, sw) = conv.kernel_size, _pair(conv.stride)
    (ph, pw), (dh, dw) = _pair(conv.padding), _pair(conv.dilation)
    return ((x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def patch_conv(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """The conv's outputs at the patches' positions, ``(n, C_out)``."""
    if groups == 1:
        return F.linear(patches, weight.reshape(weight.shape[0], -1), bias)
    n = patches.shape[0]
    w = weight.reshape(groups, weight.shape[0] // groups, -1)
    y = torch.einsum("ngd,god->ngo", patches.reshape(n, groups, -1), w).reshape(n, -1)
    return y if bias is None else y + bias


class ReconstructionSamples:
    """Calibrator of one conv's reconstruction problem (collect / reset / compute, as observers): float targets at
    positions drawn in the float pass, then the quantized model's input patches at the same positions, batch by
    batch in the same order."""

    def __init__(self, block: QuantConv, per_image: int, generator: torch.Generator) -> None:
        self.block, self.per_image, self.generator = block, per_image, generator
        self.reset()

    def reset(self) -> None:
        self.targets: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []

    def collect_float(self, x: torch.Tensor) -> None:
        """Draw this batch's positions and store ``act(conv(x, W) + b)`` there (``x``: the float model's input)."""
        c = self.block.conv
        oh, ow = output_size(x, c)
        per_image = min(self.per_image, oh * ow)
        offsets = torch.stack([torch.randperm(oh * ow, generator=self.generator)[:per_image]
                               for _ in range(x.shape[0])])
        index = (offsets + torch.arange(x.shape[0])[:, None] * (oh * ow)).flatten().to(x.device)
        patches = sample_patches(x.float(), c, index)
        self.indices.append(index)
        self.targets.append(self.block.act(patch_conv(patches, c.weight.float(), c.bias, c.groups)))

    def collect_quantized(self, x: torch.Tensor) -> None:
        """Store the quantized model's input patches (after the conv's own input quantizer) at the positions drawn
        for the next batch."""
        k = len(self.inputs)
        if k >= len(self.indices):
            raise RuntimeError("ReconstructionSamples: more quantized batches than float ones")
        site = self.block._site("input_site")
        x = site(x) if site is not None else x
        self.inputs.append(sample_patches(x.float(), self.block.conv, self.indices[k]))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input patches, targets)`` of every collected batch."""
        if not self.targets or len(self.inputs) != len(self.targets):
            raise RuntimeError("ReconstructionSamples.compute: the float and quantized batches do not pair up")
        return torch.cat(self.inputs), torch.cat(self.targets)


def learn_rounding(block: QuantConv, inputs: torch.Tensor, targets: torch.Tensor, iterations: int = ITERATIONS,
                   batch: int = BATCH, lr: float = LEARNING_RATE, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """The block's weight rounded by AdaRound against ``targets`` on ``inputs`` (patch rows); the block is unchanged.

    Returns:
        The rounded weight ``s * q`` (on the weight quantizer's grid).
    """
    q = block.weight_quant
    c = block.conv
    scale, _ = q.calculate_qparams()
    axis = q.ch_axis
    w = c.weight.detach().float()
    floor = ar.floor_codes(w, scale, axis)
    v = ar.initial_logits(w, scale, axis).requires_grad_(True)
    bias = None if c.bias is None else c.bias.detach().float()
    opt = torch.optim.Adam([v], lr=lr)
    n = inputs.shape[0]
    with torch.enable_grad():
        for step in range(iterations):
            idx = torch.randint(n, (min(batch, n),), generator=generator).to(inputs.device)
            h = ar.rectified_sigmoid(v)
            y = block.act(patch_conv(inputs[idx], ar.rounded_weight(floor, h, scale, q.qmin, q.qmax, axis), bias,
                                     c.groups))
            loss = (y - targets[idx]).pow(2).sum(1).mean()
            beta = ar.beta_at(step, iterations)
            if beta is not None:
                loss = loss + ar.REGULARIZATION * ar.rounding_regularizer(h, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        rounded = ar.rounded_weight(floor, ar.hard_offset(v.detach()), scale, q.qmin, q.qmax, axis)
        keep_range_elements(rounded, w, scale, q.qmin, q.qmax, axis)
    return rounded.to(c.weight.dtype)


def keep_range_elements(rounded: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                        axis: int | None) -> None:
    """Give the element of largest magnitude (per channel) its nearest code again, in place, so min/max ranges
    re-derived from ``rounded`` equal those of ``w``."""
    if axis is None:
        flat_w, flat_r, s = w.reshape(1, -1), rounded.view(1, -1), scale.reshape(1, 1)
    else:
        flat_w = w.movedim(axis, 0).reshape(w.shape[axis], -1)
        flat_r = rounded.movedim(axis, 0).reshape(w.shape[axis], -1)
        s = scale.reshape(-1, 1)
    i = flat_w.abs().argmax(1, keepdim=True)
    nearest = torch.round(flat_w.gather(1, i) * (1.0 / s)).clamp(qmin, qmax) * s
    flat_r.scatter_(1, i, nearest)
    if axis is not None:
        rounded.copy_(flat_r.reshape(rounded.movedim(axis, 0).shape).movedim(0, axis))



@torch.no_grad()
def execution_order(model: nn.Module, convs: list[tuple[str, QuantConv]], x: torch.Tensor
                    ) -> list[tuple[str, QuantConv]]:
    """``convs`` in the order a forward pass of ``x`` calls them (Detect's branches interleave across levels, unlike
    their module order); convs the pass never calls raise."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n)) for n, m in convs]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    blocks = dict(convs)
    missing = [n for n in blocks if n not in order]
    if missing:
        raise RuntimeError(f"AdaRound: the forward pass never reached {missing[:3]}; they cannot be rounded")
    return [(n, blocks[n]) for n in dict.fromkeys(order)]




def cached_images(images: Iterable[torch.Tensor], num_images: int) -> list[torch.Tensor]:
    """The first ``num_images`` images as batches kept in memory: every conv's pass must see the same ones."""
    out, seen = [], 0
    for x in images:
        x = x[: num_images - seen]
        out.append(x)
        seen += x.shape[0]
        if seen >= num_images:
            break
    if not out:
        raise ValueError("AdaRound: the calibration data yielded no images")
    return out


@torch.no_grad()
def adaround(model: nn.Module, images: Callable[[], Iterable[torch.Tensor]], num_images: int, *,
             iterations: int = ITERATIONS, positions: int = POSITIONS, seed: int = 0, progress: bool = True) -> int:
    """Learn the rounding of every roundable conv of a calibrated model in place (see the module docstring).

    Args:
        images: Opens the [0, 1] image batches; the first ``min(num_images, IMAGES)`` are used.
        num_images: Calibration images available.
        iterations: Optimisation steps per conv.
        positions: Output positions sampled per conv, spread over the images.

    Returns:
        How many convs were rounded.
    """
    convs = roundable_convs(model)
    if not convs or iterations < 1:
        return 0
    batches = cached_images(images(), min(num_images, IMAGES))
    n_images = sum(x.shape[0] for x in batches)
    was_training = model.training
    model.eval()
    try:
        convs = execution_order(model, convs, batches[0][:1])
        generator = torch.Generator().manual_seed(seed)
        per_image = max(1, math.ceil(positions / n_images))
        samples = {n: ReconstructionSamples(m, per_image, generator) for n, m in convs}
        _run_with_hooks(model, batches, {n: samples[n].collect_float for n, _ in convs}, quantized=False)
        for n, m in tqdm(convs, desc="AdaRound", unit="conv", disable=not progress, leave=False):
            # the quantized model as it is now: every conv before this one already holds its learned rounding
            _run_with_hooks(model, batches, {n: samples[n].collect_quantized}, quantized=True, stop_after=n)
            inputs, targets = samples[n].compute()
            samples[n].reset()
            m.conv.weight.copy_(learn_rounding(m, inputs, targets, iterations, generator=generator))
    finally:
        model.train(was_training)
    LOGGER.info(f"AdaRound: {len(convs)} convs, {iterations} steps each, {positions} positions per conv from "
                f"{n_images} images")
    return len(convs)


def _run_with_hooks(model: nn.Module, batches: list[torch.Tensor], collect: dict[str, Callable], *, quantized: bool,
                    stop_after: str | None = None) -> None:
    """Run every batch with ``collect[name](input)`` as a forward pre-hook of each named conv: the float model
    (every quantizer off) unless ``quantized``; each pass ends at ``stop_after``'s conv."""
    blocks = dict(model.named_modules())

    def hook(name):
        def run(mod, args):
            collect[name](args[0])
            if name == stop_after:
                raise _Stop
        return run

    handles = [blocks[n].register_forward_pre_hook(hook(n)) for n in collect]
    try:
        with contextlib.nullcontext() if quantized else _float(model):
            for x in batches:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _float(model: nn.Module):
    """Within the block every quantizer passes its input through; each gets its own switch back after."""
    on = [q for _, q in quantizers(model) if q.fake_quantizing]
    for q in on:
        q.enable_fake_quant(False)
    try:
        yield
    finally:
        for q in on:
            q.enable_fake_quant(True)


