"""Pure numerics of src/quantization/utils.py against torch reference ops, formulas and finite differences."""

import math

import pytest
import torch

from src.quantization.utils import (
    EPS,
    MAX_SCALE,
    LSQFakeQuant,
    NonFiniteObservationError,
    QuantizationError,
    STEFakeQuant,
    check_finite_stats,
    compute_qparams,
    fake_quantize,
    fake_quantize_with_mask,
    lsq_grad_scale,
    quant_range,
)

RANGES = [  # (bits, signed, narrow)
    (2, True, True), (2, False, False), (4, True, True), (4, True, False), (4, False, False),
    (8, True, True), (8, True, False), (8, False, False), (16, True, True), (16, False, False),
]


def off_midpoints(x: torch.Tensor, scale: torch.Tensor, axis=None, margin=1e-2) -> torch.Tensor:
    """Nudge values whose x/s lies within ``margin`` of a .5 rounding midpoint, so rounding is unambiguous."""
    s = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(x.dim())])
    v = x * (1.0 / s)
    frac = v - torch.floor(v)
    near = (frac - 0.5).abs() < margin
    return torch.where(near, (torch.floor(v) + 0.5 + 2 * margin) * s, x)


def test_quant_range_values():
    assert quant_range(8, True, narrow=True) == (-127, 127)
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(8, False) == (0, 255)
    assert quant_range(4, True, narrow=True) == (-7, 7)
    assert quant_range(2, True, narrow=True) == (-1, 1)
    assert quant_range(16, False) == (0, 65535)
    for bad in (1, 17, 8.0, True):
        with pytest.raises(QuantizationError, match="bit_width"):
            quant_range(bad, True)


def test_compute_qparams_formulas():
    lo, hi = torch.tensor(-1.5), torch.tensor(3.0)
    s, z = compute_qparams(lo, hi, -127, 127, symmetric=True)
    assert s.dtype == torch.float32 and z.dtype == torch.int32 and s.dim() == 0
    assert s.item() == (torch.tensor(3.0) / 127.0).item() and z.item() == 0
    s, z = compute_qparams(lo, hi, 0, 255, symmetric=True)
    assert s.item() == (torch.tensor(3.0) / 127.5).item() and z.item() == 128
    s, z = compute_qparams(lo, hi, 0, 255, symmetric=False)
    expected = torch.tensor(4.5) / 255.0
    assert s.item() == expected.item() and z.item() == int(-torch.round(torch.tensor(-1.5) / expected))
    # the range always contains 0: positive-only data still maps 0 to the zero point qmin
    s, z = compute_qparams(torch.tensor(2.0), torch.tensor(3.0), 0, 255, symmetric=False)
    assert s.item() == (torch.tensor(3.0) / 255.0).item() and z.item() == 0
    # per-channel shapes
    s, z = compute_qparams(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 0.5]), -7, 7, True)
    assert s.shape == (2,) and torch.equal(s, torch.tensor([1.0, 2.0]) / 7.0)
    assert torch.equal(z, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(QuantizationError, match="qmin"):
        compute_qparams(lo, hi, 5, 5, True)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,signed,narrow", RANGES)
def test_compute_qparams_degenerate_inputs_give_finite_positive_scale(symmetric, bits, signed, narrow):
    qmin, qmax = quant_range(bits, signed, narrow)
    cases = [(0.0, 0.0), (2.0, 2.0), (-3.0, -3.0), (1e-30, 1e-30), (-1e-30, 1e-30), (1e30, 1e30), (-1e30, 1e30),
             (-3e38, 3e38), (0.0, 3.4e38)]
    mins = torch.tensor([c[0] for c in cases])
    maxs = torch.tensor([c[1] for c in cases])
    s, z = compute_qparams(mins, maxs, qmin, qmax, symmetric)
    assert torch.isfinite(s).all() and (s >= EPS).all() and (s <= MAX_SCALE).all()
    assert ((z >= qmin) & (z <= qmax)).all()
    # dequantized extremes stay finite for every code
    assert torch.isfinite((qmax - z) * s).all() and torch.isfinite((qmin - z) * s).all()
    for lo, hi in cases:  # 0-d path
        s0, _ = compute_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax, symmetric)
        assert s0.dim() == 0 and math.isfinite(s0.item()) and s0.item() >= EPS


@pytest.mark.parametrize("bits,signed,narrow", RANGES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_equals_torch_per_tensor(bits, signed, narrow, symmetric):
    torch.manual_seed(bits)
    qmin, qmax = quant_range(bits, signed, narrow)
    x = torch.randn(4, 3, 7, 5) * 2.0 + 0.3
    scale, zp = compute_qparams(x.min() * 0.5, x.max() * 0.5, qmin, qmax, symmetric)  # some values clip
    x = off_midpoints(x, scale)
    ref = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), qmin, qmax)
    out = fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.equal(out, ref)
    # some values are clipped and some are not, so both branches are exercised
    q = torch.round(x / scale) + zp
    assert ((q < qmin) | (q > qmax)).any() and ((q >= qmin) & (q <= qmax)).any()


@pytest.mark.parametrize("bits,signed,narrow", RANGES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_fake_quantize_equals_torch_per_channel(bits, signed, narrow, axis):
    torch.manual_seed(100 + bits)
    qmin, qmax = quant_range(bits, signed, narrow)
    x = torch.randn(6, 5, 4) * torch.linspace(0.1, 3.0, 5).reshape(1, 5, 1)
    ax = axis % x.dim()
    dims = [d for d in range(x.dim()) if d != ax]
    scale, zp = compute_qparams(x.amin(dims) * 0.9, x.amax(dims) * 0.9, qmin, qmax, symmetric=signed)
    x = off_midpoints(x, scale, ax)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, ax, qmin, qmax)
    assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax, axis=axis), ref)


@pytest.mark.parametrize("axis", [None, 1])
def test_fake_quantize_and_mask_equal_torch_cachemask_even_at_ties(axis):
    """Same fp32 formula as torch's kernels, so equality holds on exact rounding midpoints too."""
    torch.manual_seed(7)
    qmin, qmax = -8, 7
    if axis is None:
        scale, zp = torch.tensor(0.37), torch.tensor(2, dtype=torch.int32)
        s_b = scale
    else:
        scale, zp = torch.tensor([0.37, 0.011, 3.3]), torch.tensor([2, -8, 7], dtype=torch.int32)
        s_b = scale.reshape(1, 3, 1)
    ties = (torch.arange(-20, 20).float().reshape(1, 1, -1) + 0.5) * s_b
    x = torch.cat([ties.expand(2, 3, 40), torch.randn(2, 3, 40) * 5 * s_b], 2)
    y, mask = fake_quantize_with_mask(x, scale, zp, qmin, qmax, axis)
    if axis is None:
        ry, rmask = torch._fake_quantize_per_tensor_affine_cachemask_tensor_qparams(
            x, scale, zp, torch.ones((), dtype=torch.long), qmin, qmax)
    else:
        ry, rmask = torch.ops.aten.fake_quantize_per_channel_affine_cachemask(x, scale, zp, axis, qmin, qmax)
    assert torch.equal(y, ry) and torch.equal(mask, rmask)
    # |x/s| beyond int64 saturates (torch's per-channel kernel overflows its int64 cast there and returns qmin)
    s3, z3 = (scale.expand(3), zp.expand(3)) if axis is None else (scale, zp)
    huge, huge_mask = fake_quantize_with_mask(torch.tensor([[1e30] * 3, [-1e30] * 3]), s3, z3, qmin, qmax, axis=1)
    assert torch.equal(huge, torch.stack([(qmax - z3) * s3, (qmin - z3) * s3])) and not huge_mask.any()


def test_rounding_is_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    assert torch.equal(fake_quantize(x, 1.0, 0, -128, 127), torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, -2.0]))


def test_fake_quantize_rejects_out_of_range_zero_point():
    with pytest.raises(QuantizationError, match="zero_point"):
        fake_quantize(torch.randn(3), 0.1, 300, 0, 255)


@pytest.mark.parametrize("axis", [None, 1])
def test_ste_gradient_is_the_clipping_mask(axis):
    torch.manual_seed(1)
    x = (torch.randn(3, 4, 5) * 3).requires_grad_()
    if axis is None:
        scale, zp = torch.tensor(0.02), torch.tensor(10, dtype=torch.int32)
        s_b, z_b = scale, zp
    else:
        scale, zp = torch.linspace(0.01, 0.03, 4), torch.tensor([0, 5, -3, 1], dtype=torch.int32)
        s_b, z_b = scale.reshape(1, 4, 1), zp.reshape(1, 4, 1)
    y = STEFakeQuant.apply(x, scale, zp, -128, 127, axis)
    dy = torch.randn_like(y)
    y.backward(dy)
    q = torch.round(x.detach() * (1.0 / s_b)) + z_b
    mask = (q >= -128) & (q <= 127)
    assert (~mask).any() and mask.any()
    assert torch.equal(x.grad, dy * mask)
    assert torch.equal(y, fake_quantize(x.detach(), scale, zp, -128, 127, axis))


def _lsq_formula(x, s, zp, qmin, qmax, dy, axis, g):
    """Esser et al. 2020 (and LSQ+ zero point) gradients in float64, written independently."""
    x, dy = x.double(), dy.double()
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s_b, z_b = s.double().reshape(shape), zp.double().reshape(shape)
    v = x / s_b
    q = torch.round(v) + z_b
    lo, hi = q < qmin, q > qmax
    ds = torch.where(lo, qmin - z_b, torch.where(hi, qmax - z_b, torch.round(v) - v)) * dy
    dz = torch.where(lo | hi, -s_b, torch.zeros_like(v)) * dy
    dims = list(range(x.dim())) if axis is None else [d for d in range(x.dim()) if d != axis]
    return ds.sum(dims) * g, dz.sum(dims) * g


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("qmin,qmax,zp0", [(-127, 127, 0.0), (0, 255, 37.0), (0, 15, 3.0)])
def test_lsq_gradients_match_paper_formula_and_torch(axis, qmin, qmax, zp0):
    torch.manual_seed(2)
    x = torch.randn(4, 6, 3) * 2
    nscale = 1 if axis is None else x.shape[axis]
    s = (torch.full((nscale,), 0.03) * torch.linspace(1.0, 2.0, nscale)).reshape(() if axis is None else (nscale,))
    zp = torch.full_like(s, zp0)
    x = off_midpoints(x, s, axis, margin=1e-3)
    g = lsq_grad_scale(x.numel() // nscale, qmax)
    assert g == 1.0 / math.sqrt(x.numel() // nscale * qmax)
    xg, sg, zg = x.clone().requires_grad_(), s.clone().requires_grad_(), zp.clone().requires_grad_()
    y = LSQFakeQuant.apply(xg, sg, zg, qmin, qmax, axis, g, 1.0)
    dy = torch.randn_like(y)
    y.backward(dy)
    ds, dz = _lsq_formula(x, s, zp, qmin, qmax, dy, axis, g)
    assert sg.grad.shape == s.shape and zg.grad.shape == zp.shape
    torch.testing.assert_close(sg.grad.double(), ds.reshape(s.shape), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zg.grad.double(), dz.reshape(s.shape), rtol=1e-5, atol=1e-6)
    assert torch.equal(y, fake_quantize(x, s, zp, qmin, qmax, axis))
    # torch's own learnable kernels (which take g as grad_factor) agree up to summation order
    xt = x.clone().requires_grad_()
    st, zt = s.reshape(-1).clone().requires_grad_(), zp.reshape(-1).clone().requires_grad_()
    if axis is None:
        yt = torch._fake_quantize_learnable_per_tensor_affine(xt, st, zt, qmin, qmax, g)
    else:
        yt = torch._fake_quantize_learnable_per_channel_affine(xt, st, zt, axis, qmin, qmax, g)
    yt.backward(dy)
    assert torch.equal(yt, y) and torch.equal(xt.grad, xg.grad)
    torch.testing.assert_close(st.grad, sg.grad.reshape(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(zt.grad, zg.grad.reshape(-1), rtol=1e-5, atol=1e-6)


def test_lsq_scale_gradient_matches_finite_differences_of_ste_surrogate():
    """LSQ's d/ds is the derivative of x_hat(s) with round() treated as identity at the current point.

    The surrogate h(s') = s' * where(inside, R + x/s' - x/s, clamp_code - zp) (R = round(x/s) frozen) has exactly
    that derivative, so central differences in float64 must reproduce the autograd gradient.
    """
    torch.manual_seed(3)
    qmin, qmax, zp = 0, 255, 20.0
    x = (torch.randn(200) * 2).double()
    s0 = 0.0123
    x = off_midpoints(x.float(), torch.tensor(s0), margin=1e-3).double()
    dy = torch.randn(200).double()
    r = torch.round(x / s0)
    q = r + zp
    inside, below = (q >= qmin) & (q <= qmax), q < qmin

    def h(s):
        code = torch.where(below, torch.full_like(x, qmin), torch.full_like(x, qmax))
        return s * torch.where(inside, r + x / s - x / s0, code - zp)

    d = 1e-7
    fd = ((h(s0 + d) - h(s0 - d)) / (2 * d) * dy).sum().item()
    sg = torch.tensor(s0, requires_grad=True)
    y = LSQFakeQuant.apply(x.float(), sg, torch.tensor(zp), qmin, qmax, None, 1.0, 1.0)
    y.backward(dy.float())
    assert (~inside).any() and inside.any()
    assert sg.grad.item() == pytest.approx(fd, rel=1e-4, abs=1e-3)


def test_lsq_clamps_nonpositive_learned_scale():
    x = torch.randn(10)
    y = LSQFakeQuant.apply(x, torch.tensor(-0.5, requires_grad=True), torch.tensor(0.0), -127, 127, None, 1.0, 1.0)
    assert torch.isfinite(y).all()


def test_check_finite_stats_names_layer():
    check_finite_stats(torch.tensor(-1.0), torch.tensor(1.0), "ok")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteObservationError, match="model.3.conv"):
            check_finite_stats(torch.tensor(bad), torch.tensor(1.0), "model.3.conv")


@pytest.mark.parametrize("axis", [None, 0])
def test_lsq_grad_factor_scales_only_the_qparam_gradients(axis):
    """torch.ao's convention: a factor on dx would compound through every quantizer of the network."""
    torch.manual_seed(3)
    x = torch.randn(4, 5) * 2
    shape = () if axis is None else (4,)
    grads = {}
    for factor in (1.0, 0.25):
        xg = x.clone().requires_grad_()
        s = torch.full(shape, 0.05, requires_grad=True)
        z = torch.full(shape, 3.0, requires_grad=True)
        LSQFakeQuant.apply(xg, s, z, 0, 255, axis, 0.1, factor).backward(torch.ones(4, 5))
        grads[factor] = (xg.grad, s.grad, z.grad)
    (x1, s1, z1), (x4, s4, z4) = grads[1.0], grads[0.25]
    assert torch.equal(x4, x1)
    assert torch.equal(s4, s1 * 0.25) and torch.equal(z4, z1 * 0.25) and s1.abs().sum() > 0


@pytest.mark.parametrize("axis", [None, 0])
def test_ste_mask_of_a_known_zero_point_is_the_clipping_mask(axis):
    """Symmetric signed quantizers (every weight) pass zero_point=None; their STE mask must still be in-range codes.

    The mask was compared after the codes were scaled in place, so it was False almost everywhere and conv weights
    got no gradient through the STE.
    """
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, 3, 3, generator=g)
    scale = torch.tensor(0.01) if axis is None else torch.tensor([0.01, 0.02, 0.005, 0.03])
    y, mask = fake_quantize_with_mask(w, scale, None, -127, 127, axis)
    y_ref, mask_ref = fake_quantize_with_mask(w, scale, torch.zeros(scale.shape, dtype=torch.int32), -127, 127, axis)
    assert torch.equal(y, y_ref) and torch.equal(mask, mask_ref) and mask.float().mean() > 0.3 and (~mask).any()
    x = w.clone().requires_grad_()
    STEFakeQuant.apply(x, scale, None, -127, 127, axis).backward(torch.ones_like(w))
    assert torch.equal(x.grad, mask_ref.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lsq_keeps_a_half_precision_input_in_its_own_dtype_for_backward(dtype):
    """Under AMP an fp32 copy of every fp16/bf16 input would double LSQ's saved memory; the values stay the same."""
    g = torch.Generator().manual_seed(5)
    x_half = (torch.randn(2, 4, 6, 6, generator=g) * 3).to(dtype)
    saved = []
    results = {}
    for name, x in (("half", x_half), ("fp32", x_half.float())):
        xg = x.clone().requires_grad_()
        s = torch.full((4,), 0.05, requires_grad=True)
        z = torch.full((4,), 3.0, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((name, t.dtype, t.numel())) or t,
                                                      lambda t: t):
            y = LSQFakeQuant.apply(xg, s, z, 0, 255, 1, 0.1, 1.0)
        y.backward(torch.ones_like(y))
        results[name] = (y, xg.grad.float(), s.grad, z.grad)
    x_saved = [(d, n) for name, d, n in saved if name == "half" and n == x_half.numel()]
    assert x_saved == [(dtype, x_half.numel())]
    for a, b in zip(results["half"], results["fp32"]):
        assert torch.equal(a, b)
