"""FakeQuantize module: validation, observe/quantize switches, STE/LSQ paths, state, autocast and ONNX export."""

import copy
import io
import warnings
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.quantization.fake_quantize import FakeQuantize, export_mode, fake_quantizers
from src.quantization.utils import QuantizationError, compute_qparams, fake_quantize, lsq_grad_scale


@dataclass
class QCfg:
    dtype: str = "quint8"
    scheme: str = "per_tensor"
    observer: str = "moving_average_minmax"
    symmetric: bool = False
    bit_width: int = 8
    ch_axis: int = 0
    averaging_constant: float = 0.01
    histogram_bins: int = 2048
    histogram_method: str = "percentile"
    percentile: float = 99.99


@dataclass
class FQCfg:
    type: str = "custom"
    grad_factor: float = 1.0
    learn_zero_point: bool = False


WEIGHT = QCfg(dtype="qint8", scheme="per_channel", observer="minmax", symmetric=True)
ACT = QCfg()


def weight_fq(fq=FQCfg(), channels=4, **kw):
    return FakeQuantize(replace(WEIGHT, **kw), fq, is_weight=True, num_channels=channels, name="model.0.conv.weight")


def act_fq(fq=FQCfg(), **kw):
    return FakeQuantize(replace(ACT, **kw), fq, is_weight=False, name="model.0.act")


# ------------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("make,match", [
    (lambda: weight_fq(symmetric=False), "symmetric: true"),
    (lambda: weight_fq(dtype="quint8"), "qint8"),
    (lambda: weight_fq(channels=None), "num_channels"),
    (lambda: act_fq(dtype="int8"), "dtype"),
    (lambda: act_fq(bit_width=1), "bit_width"),
    (lambda: act_fq(bit_width=17), "bit_width"),
    (lambda: act_fq(FQCfg(type="pact")), "ste or lsq"),
    (lambda: act_fq(FQCfg(learn_zero_point=True)), "type: lsq"),
    (lambda: act_fq(FQCfg(type="lsq", learn_zero_point=True), symmetric=True), "asymmetric"),
    (lambda: act_fq(FQCfg(grad_factor=0.0)), "grad_factor"),
    (lambda: act_fq(FQCfg(grad_factor=0.5)), "learns none"),
    (lambda: act_fq(observer="histogram", scheme="per_channel"), "num_channels|per-tensor"),
])
def test_invalid_configs_raise_clear_errors(make, match):
    with pytest.raises(QuantizationError, match=match):
        make()


@pytest.mark.parametrize("bits,qmin,qmax", [(8, -127, 127), (4, -7, 7), (2, -1, 1)])
def test_weight_range_is_signed_narrow_symmetric(bits, qmin, qmax):
    fq = weight_fq(bit_width=bits)
    assert (fq.qmin, fq.qmax) == (qmin, qmax)
    assert fq.per_channel and fq.ch_axis == 0 and fq.symmetric and fq.signed and fq.bit_width == bits
    w = torch.randn(4, 3, 3, 3)
    out = fq.train()(w)
    assert torch.equal(fq.zero_point, torch.zeros(4, dtype=torch.int32))
    assert torch.equal(fq.scale, w.abs().amax((1, 2, 3)) / qmax)
    assert torch.equal(out, torch.fake_quantize_per_channel_affine(w, fq.scale, fq.zero_point, 0, qmin, qmax))


@pytest.mark.parametrize("dtype,bits,qrange", [("quint8", 8, (0, 255)), ("qint8", 8, (-128, 127)),
                                               ("quint8", 4, (0, 15)), ("qint8", 16, (-32768, 32767))])
def test_activation_ranges(dtype, bits, qrange):
    fq = act_fq(dtype=dtype, bit_width=bits)
    assert (fq.qmin, fq.qmax) == qrange and not fq.per_channel and fq.signed == (dtype == "qint8")


# -------------------------------------------------------------------------------------------- observe / quantize
def test_training_forward_observes_then_fake_quantizes_with_fresh_qparams():
    fq = act_fq(observer="minmax").train()
    x = torch.randn(2, 3, 5, 5) * 2
    out = fq(x)
    s, z = compute_qparams(x.min(), x.max(), 0, 255, False)
    assert torch.equal(fq.scale, s) and torch.equal(fq.zero_point, z)
    assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255))


def test_eval_mode_never_updates_statistics():
    fq = act_fq().train()
    fq(torch.randn(10))
    state = copy.deepcopy(fq.state_dict())
    fq.eval()
    out = fq(torch.randn(10) * 100)
    for k, v in fq.state_dict().items():
        assert torch.equal(v, state[k]), k
    lo, hi = (0 - fq.zero_point) * fq.scale, (255 - fq.zero_point) * fq.scale
    assert out.max() <= hi + 1e-6 and out.min() >= lo - 1e-6 and (out.max() >= hi - 1e-6)  # old range clips


def test_freeze_fixes_scale_and_switches_are_buffers():
    fq = act_fq().train()
    fq(torch.randn(10))
    fq.freeze()
    s = fq.scale.clone()
    fq(torch.randn(10) * 50)
    assert torch.equal(fq.scale, s) and fq.observer_enabled.item() == 0
    assert {"observer_enabled", "fake_quant_enabled"} <= set(dict(fq.named_buffers()))
    fq.enable_fake_quant(False)
    x = torch.randn(10) * 50
    assert fq(x) is x
    clone = copy.deepcopy(fq)
    assert clone.fake_quant_enabled.item() == 0 and clone.observer_enabled.item() == 0


def test_calibration_with_fake_quant_off_refreshes_when_observer_stops():
    fq = act_fq(observer="histogram", histogram_bins=256).train()
    fq.enable_fake_quant(False)
    for i in range(3):
        x = torch.randn(100) * (i + 1)
        assert fq(x) is x
    s_obs, z_obs = fq.observer.compute()
    assert not torch.equal(fq.scale, s_obs)  # lazily not refreshed while only observing
    fq.enable_observer(False)
    assert torch.equal(fq.scale, s_obs) and torch.equal(fq.zero_point, z_obs)


def test_state_dict_of_stale_quantizer_holds_current_qparams():
    fq = act_fq(observer="minmax").train().enable_fake_quant(False)
    fq(torch.randn(20) * 3)
    sd = fq.state_dict()
    assert torch.equal(sd["scale"], fq.observer.compute()[0])


def test_ste_backward_is_the_clipping_mask():
    fq = act_fq(FQCfg(), observer="minmax").train()
    fq(torch.randn(100))  # range ~[-3, 3]
    fq.freeze()
    x = (torch.randn(100) * 4).requires_grad_()
    y = fq(x)
    dy = torch.randn(100)
    y.backward(dy)
    q = torch.round(x.detach() * (1.0 / fq.scale)) + fq.zero_point
    mask = (q >= 0) & (q <= 255)
    assert (~mask).any() and torch.equal(x.grad, dy * mask)


def test_shared_sites_cover_union_of_ranges():
    fq = FakeQuantize(replace(ACT, averaging_constant=0.5), FQCfg(), is_weight=False, num_sites=2, name="cat").train()
    for _ in range(10):
        fq(torch.linspace(0, 1, 20), site=0)
        fq(torch.linspace(0, 10, 20), site=1)
    s, z = fq.calculate_qparams()
    assert (255 - z.item()) * s.item() >= 10.0 - 1e-5


# ---------------------------------------------------------------------------------------------------------- LSQ
def test_lsq_scale_follows_observer_then_is_learned():
    fq = weight_fq(FQCfg(type="lsq"))
    assert isinstance(fq.scale, nn.Parameter)
    w = torch.randn(4, 3, 3, 3)
    fq.train()(w)
    assert torch.equal(fq.scale.detach(), w.abs().amax((1, 2, 3)) / 127)
    fq.freeze()
    opt = torch.optim.SGD(fq.parameters(), lr=1e-3)
    before = fq.scale.detach().clone()
    wq = w.clone().requires_grad_()
    y = fq(wq)
    loss = ((y - w * 1.3) ** 2).sum()
    loss.backward()
    g = lsq_grad_scale(27, 127)
    s_b = before.reshape(4, 1, 1, 1)
    v = w / s_b
    dy = 2 * (y.detach() - w * 1.3)
    inside = (torch.round(v) >= -127) & (torch.round(v) <= 127)
    expected = (torch.where(inside, torch.round(v) - v, torch.sign(v) * 127) * dy).sum((1, 2, 3)) * g
    torch.testing.assert_close(fq.scale.grad, expected, rtol=1e-4, atol=1e-6)
    opt.step()
    learned = before.add(fq.scale.grad, alpha=-1e-3)
    assert torch.equal(fq.scale.detach(), learned) and not torch.equal(learned, before)
    fq(w)  # observer off: the learned scale is not overwritten
    assert torch.equal(fq.scale.detach(), learned)


def test_lsq_plus_learns_zero_point():
    fq = act_fq(FQCfg(type="lsq", learn_zero_point=True), observer="minmax").train()
    x = torch.randn(64) + 0.5
    fq(x)
    assert isinstance(fq.zero_point, nn.Parameter) and fq.zero_point.dtype == torch.float32
    _, z_obs = fq.observer.compute()
    assert fq.zero_point.item() == z_obs.item()
    fq.freeze()
    with torch.no_grad():
        fq.zero_point.add_(0.3)  # non-integer: forward rounds it
    y = fq((x * 2).requires_grad_())
    assert torch.equal(y.detach(), fake_quantize(x * 2, fq.scale.detach(), torch.round(fq.zero_point.detach()), 0, 255))
    y.sum().backward()
    assert fq.zero_point.grad is not None and fq.zero_point.grad.item() != 0  # x*2 clips at the ends


# --------------------------------------------------------------------------------------------------- state & copy
MODES = {
    "custom_act": lambda: act_fq(),
    "custom_weight_pc": lambda: weight_fq(),
    "lsq_weight_pc": lambda: weight_fq(FQCfg(type="lsq")),
    "lsq_plus_act": lambda: act_fq(FQCfg(type="lsq", learn_zero_point=True)),
    "hist_act_4bit": lambda: act_fq(observer="histogram", histogram_method="mse", histogram_bins=128, bit_width=4),
    "act_per_channel_axis1": lambda: FakeQuantize(replace(ACT, observer="minmax", scheme="per_channel", ch_axis=1), FQCfg(),
                                                  is_weight=False, num_channels=4, name="pc"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_state_dict_and_deepcopy_reproduce_outputs_bit_identically(mode):
    torch.manual_seed(0)
    a = MODES[mode]().train()
    shape = (4, 4, 3, 3) if mode == "act_per_channel_axis1" else (4, 3, 3, 3)
    for _ in range(3):
        a(torch.randn(shape) * 2)
    with torch.no_grad():
        if isinstance(a.scale, nn.Parameter):
            a.scale.mul_(1.1)  # a learned value the observer did not produce
    a.freeze()
    b = MODES[mode]()
    b.load_state_dict(a.state_dict())
    c = copy.deepcopy(a)
    x = torch.randn(shape) * 3
    for m in (a, b, c):
        m.eval()
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), c(x))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, c.state_dict()[k]), k
    assert b.observer_enabled.item() == 0 and c.observer_enabled.item() == 0


def test_extra_repr_shows_live_state():
    fq = weight_fq(bit_width=4).train()
    fq(torch.randn(4, 2))
    r = repr(fq)
    for part in ("bits=4", "signed", "per-channel(axis=0)", "symmetric=True", "type=ste",
                 "observer=per_channel_minmax",
                 f"{fq.scale.min().item():.6g}", "zero_point=[0, 0]"):
        assert part in r, part
    r = repr(act_fq(FQCfg(type="lsq")))
    assert "unsigned" in r and "per-tensor" in r and "type=lsq" in r and "scale=1" in r


def test_calculate_qparams_is_detached_copy():
    fq = act_fq(FQCfg(type="lsq", learn_zero_point=True))
    s, z = fq.calculate_qparams()
    assert not s.requires_grad and z.dtype == torch.int32
    s += 1
    assert fq.scale.item() == 1.0


# -------------------------------------------------------------------------------------------------------- autocast
def test_bf16_autocast_input_is_quantized_in_fp32():
    fq = act_fq(observer="minmax").train()
    x = torch.randn(2, 8) * 3
    fq(x)
    fq.freeze()
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fq(xb)
    assert y.dtype == torch.bfloat16
    expected = fake_quantize(xb.float(), fq.scale, fq.zero_point, 0, 255).bfloat16()
    assert torch.equal(y, expected)


# ----------------------------------------------------------------------------------------------------------- export
class ConvQ(nn.Module):
    def __init__(self, act_bits=8, w_bits=8, act_dtype="quint8", w_type="custom", out_q=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act_q = act_fq(bit_width=act_bits, dtype=act_dtype, observer="minmax")
        self.w_q = weight_fq(FQCfg(type=w_type), bit_width=w_bits)
        self.out_q = act_fq(observer="minmax", dtype="qint8") if out_q else nn.Identity()

    def forward(self, x):
        return self.out_q(F.conv2d(self.act_q(x), self.w_q(self.conv.weight), self.conv.bias, padding=1))


@pytest.mark.parametrize("out_q", [False, True])
@pytest.mark.parametrize("act_bits,w_bits,act_dtype,w_type", [(8, 8, "quint8", "custom"), (4, 4, "qint8", "lsq")])
def test_onnx_export_gives_qdq_nodes_and_matches_onnxruntime(act_bits, w_bits, act_dtype, w_type, out_q):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ConvQ(act_bits, w_bits, act_dtype, w_type, out_q).train()
    for _ in range(2):
        model(torch.rand(2, 3, 8, 8))
    for q in fake_quantizers(model):
        q.freeze()
    model.eval()
    x = torch.rand(1, 3, 8, 8) * 1.2  # some inputs exceed the calibrated range and clip
    ref = model(x).detach().numpy()
    with export_mode(model):
        assert all(q.export_mode for q in fake_quantizers(model))
        exported_form = model(x).detach().numpy()
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), f, opset_version=13, dynamo=False, input_names=["x"])
    assert not any(q.export_mode for q in fake_quantizers(model))
    assert (exported_form == ref).all()  # the 8-bit container + clamp reproduces narrow/sub-8-bit numerics
    graph = onnx.load_from_string(f.getvalue()).graph
    ops = [n.op_type for n in graph.node]
    n_q = 3 if out_q else 2
    assert ops.count("QuantizeLinear") == n_q and ops.count("DequantizeLinear") == n_q
    constants = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    constants |= {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert set(node.input[1:]) <= constants, f"{node.name}: scale/zero point must be constants"
    # ORT's optimizer would fuse DQ->Conv->Q into QLinearConv (int32 bias, integer requantization), which is a
    # different (runtime) arithmetic; unfused it runs the QDQ float semantics that fake quantization simulates.
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(f.getvalue(), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": x.numpy()})[0]
    assert abs(out - ref).max() <= 1e-5
    fused = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    lsb = model.out_q.scale.item() if out_q else 1e-5
    assert abs(fused - ref).max() <= lsb * 1.001  # the fused integer kernel is within one output LSB


def test_export_mode_rejects_more_than_8_bits():
    fq = act_fq(bit_width=16).eval().set_export_mode(True)
    with pytest.raises(QuantizationError, match="at most 8 bits"):
        fq(torch.randn(3))


# --------------------------------------------------------------------------------- observers during QAT (issue 14)
def test_shared_quantizer_uses_one_scale_within_a_forward_pass():
    """Every site of a shared quantizer is quantized with the scale refreshed at its first site."""
    fq = FakeQuantize(replace(ACT, observer="minmax"), FQCfg(), is_weight=False, num_sites=2, name="shared").train()
    small, big = torch.linspace(0.0, 1.0, 64), torch.linspace(0.0, 4.0, 64)
    fq(small, site=0)
    fq(small, site=1)  # forward pass 1: both sites saw [0, 1]
    y0 = fq(small, site=0)  # pass 2: site 0 first
    scale = fq.scale.clone()
    y1 = fq(big, site=1)  # a wider range at site 1 must not change the scale site 0 of this pass used
    ref = torch.fake_quantize_per_tensor_affine(big, float(scale), int(fq.zero_point), 0, 255)
    assert torch.equal(y1, ref) and torch.equal(fq.scale, scale)
    fq(small, site=0)  # pass 3: site 1's [0, 4] enters at site 0's refresh
    assert fq.scale.item() == pytest.approx(4.0 / 255, rel=1e-6)
    assert torch.equal(y0, torch.fake_quantize_per_tensor_affine(small, float(scale), int(fq.zero_point), 0, 255))


def test_observer_never_overwrites_a_learned_lsq_scale():
    fq = act_fq(FQCfg(type="lsq")).train()
    fq.enable_fake_quant(False)
    fq(torch.linspace(0.0, 1.0, 64))  # calibration: the observer initialises the scale
    fq.enable_fake_quant(True)
    learned = fq.scale.detach().clone()
    with torch.no_grad():
        fq.scale.mul_(1.5)  # as an optimizer step would
        learned = fq.scale.detach().clone()
    fq(torch.linspace(0.0, 8.0, 64))  # observers still on (the first QAT epoch)
    assert torch.equal(fq.scale.detach(), learned)
    fq.enable_observer(False)  # freezing must not restore the observer's range either
    assert torch.equal(fq.scale.detach(), learned)
