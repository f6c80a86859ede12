"""Model preparation: BN folding, quantizer placement and sharing, calibration, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from src.config import load_config
from src.models.yolov8_qat import (
    QuantBottleneck,
    QuantConv,
    UnsupportedModuleError,
    build_from_checkpoint,
    prepare_qat_model,
    qat_checkpoint,
    quantizers,
    set_fake_quant,
    set_observers,
    to_float,
)
from src.quantization.calibration import calibrate
from src.quantization.fake_quantize import FakeQuantize
from src.quantization.fusion import fold_bn_into_conv_params, fuse_conv_bn
from src.training.checkpoint import load_checkpoint_file

CONFIG = "configs/qat_config.yaml"


def _model(variant: str = "n", nc: int = 3, seed: int = 0) -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    m = DetectionModel(f"yolov8{variant}.yaml", nc=nc, verbose=False)
    # random BN statistics so folding is actually exercised
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG)


def _calibrated(cfg, variant="n", **kw):
    m = _model(variant)
    prepare_qat_model(m, cfg, **kw)
    torch.manual_seed(1)
    calibrate(m, [torch.rand(2, 3, 64, 64) for _ in range(2)], 4, progress=False)
    return m


# --------------------------------------------------------------------------------------------------------- folding
def test_fold_bn_matches_formula_and_module():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.1, 3)
    bn.weight.data.uniform_(0.2, 2)
    bn.bias.data.uniform_(-1, 1)
    bn.eval()
    w, b = fold_bn_into_conv_params(conv.weight, None, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(w, conv.weight * factor[:, None, None, None], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, bn.bias - bn.running_mean * factor, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 4, 8, 8)
    fused = fuse_conv_bn(conv, bn)
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fused_and_unfused_models_agree_with_fake_quant_off(cfg):
    base = _model()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = base(x)[0]
    for fuse in (True, False):
        m = copy.deepcopy(base)
        prepare_qat_model(m, cfg, fuse=fuse)
        set_fake_quant(m, False)
        m.eval()
        with torch.no_grad():
            out = m(x)[0]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
        assert any(isinstance(mod, nn.BatchNorm2d) for mod in m.modules()) == (not fuse)


def test_to_float_restores_ultralytics_blocks(cfg):
    from ultralytics.nn.modules import Bottleneck, Conv

    base = _model()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = base(x)[0]
    m = copy.deepcopy(base)
    prepare_qat_model(m, cfg)
    to_float(m)
    assert not any(isinstance(mod, (QuantConv, QuantBottleneck, FakeQuantize)) for mod in m.modules())
    assert sum(isinstance(mod, Conv) for mod in m.modules()) == sum(isinstance(mod, Conv) for mod in base.modules())
    assert sum(isinstance(mod, Bottleneck) for mod in m.modules()) > 0
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], ref, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------------------------------- placement
def _producer_group(model, layer_index: int) -> str | None:
    """Group key of the quantizer on a top-level layer's output (its last producer site)."""
    layer = model.model[layer_index]
    if isinstance(layer, nn.Upsample):
        return _producer_group(model, layer_index + layer.f if layer.f < 0 else layer.f)
    if isinstance(layer, QuantConv):
        return layer.output_site.key
    # C2f / SPPF: the output conv cv2
    return layer.cv2.output_site.key


@pytest.mark.parametrize("variant", ["n", "s"])
def test_concat_inputs_share_one_quantizer(cfg, variant):
    from ultralytics.nn.modules import Concat

    m = _model(variant)
    placement = prepare_qat_model(m, cfg)
    concats = [(i, layer) for i, layer in enumerate(m.model) if isinstance(layer, Concat)]
    assert len(concats) == 4
    for i, layer in concats:
        keys = {_producer_group(m, i + f if f < 0 else f) for f in layer.f}
        assert len(keys) == 1 and None not in keys, f"concat model.{i} inputs use quantizers {keys}"
    # inside every C2f: cv1's output (chunked) and each bottleneck output are concatenated -> one quantizer
    from ultralytics.nn.modules import C2f, SPPF

    for layer in m.model:
        if isinstance(layer, C2f):
            keys = {layer.cv1.output_site.key}
            for b in layer.m:
                keys.add(b.output_site.key if b.add else b.cv2.output_site.key)
            assert len(keys) == 1
            # and each bottleneck's first conv reads that same quantized tensor (no input quantizer of its own)
            by_conv = {l.name: l for l in placement.layers}
            for b in layer.m:
                name = next(n for n, mod in m.named_modules() if mod is b.cv1)
                assert b.cv1.input_site is None and by_conv[name].input_group in keys
        if isinstance(layer, SPPF):
            key = layer.cv1.output_site.key  # max-pool chain keeps cv1's quantizer up to cv2
            group = next(g for g in placement.groups if g.key == key)
            assert group.consumers == [n for n in group.consumers if n.endswith(".cv2")]
    # one quantizer object per group, registered once
    assert len(m.qat_quantizers) == len(placement.groups)


def test_every_conv_quantized_and_reported(cfg):
    m = _model()
    placement = prepare_qat_model(m, cfg)
    convs = [n for n, mod in m.named_modules() if isinstance(mod, QuantConv)]
    assert len(convs) == 63 == len(placement.layers)
    assert all(l.quantized for l in placement.layers)
    # every quantized conv has a quantized input (a producer group or its own input quantizer)
    assert all(l.input_group for l in placement.layers)
    first = next(l for l in placement.layers if l.name == "model.0")
    assert first.input_group and "model.0:input" in next(g for g in placement.groups if g.key == first.input_group).sites
    report = placement.report()
    for n in convs:
        assert n in report
    assert placement.quantized_ratio() == (1.0, 1.0)


def test_skip_detection_head_keeps_head_float(cfg):
    m = _model()
    placement = prepare_qat_model(m, cfg, skip_detection_head=True)
    head = [l for l in placement.layers if l.name.startswith("model.22.")]
    assert len(head) == 18 and not any(l.quantized for l in head)
    assert all(l.reason == "skip_detection_head" for l in head)
    assert not any(isinstance(mod, QuantConv) for mod in m.model[22].modules())
    r, _ = placement.quantized_ratio()
    assert r == pytest.approx(45 / 63)


def test_spec_layer_config_patterns_select_first_conv_and_head(cfg):
    m = _model()
    placement = prepare_qat_model(m, cfg)
    by = {l.name: l for l in placement.layers}
    assert 0 in by["model.0"].layer_configs
    assert all(1 in l.layer_configs for n, l in by.items() if n.startswith("model.22."))
    assert not any(1 in l.layer_configs for n, l in by.items() if not n.startswith("model.22."))
    assert not any(0 in l.layer_configs for n, l in by.items() if n != "model.0")


def test_unsupported_block_raises_with_name(cfg):
    from ultralytics.nn.modules import RepC3

    m = _model()
    m.model[2] = RepC3(16, 16, 1)  # RT-DETR's block: RepConv inside
    m.model[2].f, m.model[2].i = -1, 2
    with pytest.raises(UnsupportedModuleError, match="model.2"):
        prepare_qat_model(m, cfg)


def test_ultralytics_fuse_and_autobackend_leave_our_model_alone(cfg):
    """What Ultralytics' standalone validator does (AutoBackend(fuse=True)) must run exactly our fake-quant model."""
    from ultralytics.nn.autobackend import AutoBackend
    from ultralytics.utils.torch_utils import is_qat

    m = _calibrated(cfg).eval()
    assert not is_qat(m)  # Ultralytics' ModelOpt detection must not trigger
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)[0]
    # channels_last (auto-enabled on x86 CPUs) only reorders float sums, so compare in the default layout exactly
    backend = AutoBackend(model=copy.deepcopy(m), device=torch.device("cpu"), fuse=True, verbose=False,
                          channels_last=False)
    inner = backend.backend.model
    assert hasattr(inner, "qat_quantizers")
    assert sum(isinstance(mod, FakeQuantize) for mod in inner.modules()) == sum(
        isinstance(mod, FakeQuantize) for mod in m.modules())
    assert sum(isinstance(mod, QuantConv) for mod in inner.modules()) == 63
    with torch.no_grad():
        out = backend(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------------------------------- calibration
def test_calibration_sets_ranges_then_freezes(cfg):
    m = _model()
    prepare_qat_model(m, cfg)
    before = {n: q.calculate_qparams()[0].clone() for n, q in quantizers(m) if not q.is_weight}
    torch.manual_seed(1)
    n = calibrate(m, [torch.rand(3, 3, 64, 64) for _ in range(3)], 5, progress=False)
    assert n == 5
    changed = sum(not torch.equal(before[k], q.calculate_qparams()[0]) for k, q in quantizers(m) if not q.is_weight)
    assert changed == len(before) == len(m.qat_quantizers)
    # weight ranges are the weights' own per-channel max |w| / 127
    conv = m.model[1]
    w = conv.conv.weight.detach()
    expected = w.abs().amax(dim=(1, 2, 3)) / 127
    torch.testing.assert_close(conv.weight_quant.calculate_qparams()[0], expected, rtol=1e-6, atol=0)
    for _, q in quantizers(m):
        assert not bool(q.observer_enabled) and bool(q.fake_quant_enabled)
    # frozen: more data in training mode does not move the ranges
    frozen = {k: q.calculate_qparams()[0].clone() for k, q in quantizers(m)}
    m.train()
    m(torch.rand(2, 3, 64, 64) * 5)
    assert all(torch.equal(frozen[k], q.calculate_qparams()[0]) for k, q in quantizers(m) if not q.is_weight)


@pytest.mark.parametrize("variant", ["n", "s"])
def test_calibration_on_synthetic_dataset(cfg, tiny_dataset, variant):
    from ultralytics.data.utils import check_det_dataset

    from src.training.data import build_loader, hyperparameters, preprocess_batch

    data = check_det_dataset(str(tiny_dataset), autodownload=False)
    m = _model(variant)
    prepare_qat_model(m, cfg)
    hyp = hyperparameters(cfg, imgsz=64, mode="val")
    loader = build_loader(hyp, data, "train", 4, mode="val", workers=0)
    seen = calibrate(m, (preprocess_batch(b, torch.device("cpu"))["img"] for b in loader), 6, progress=False)
    assert seen == 6
    scale = m.qat_quantizers["a1"].calculate_qparams()[0]
    assert torch.isfinite(scale).all() and float(scale) > 0


# ----------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("variant,kwargs", [("n", {}), ("s", {"fuse": False}), ("n", {"skip_detection_head": True})])
def test_checkpoint_round_trip_is_bit_identical(cfg, tmp_path, variant, kwargs):
    m = _calibrated(cfg, variant, **kwargs)
    m.train()
    m(torch.rand(2, 3, 64, 64))  # one training step's worth of observer/LSQ state
    m.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)[0]
    path = tmp_path / "q.pt"
    torch.save(qat_checkpoint(m, cfg), path)
    ckpt = torch.load(path, weights_only=True)
    m2, cfg2 = build_from_checkpoint(ckpt)
    m2.eval()
    with torch.no_grad():
        assert torch.equal(m2(x)[0], ref)
    assert cfg2.to_dict() == cfg.to_dict()
    assert m2.qat_placement.to_dict() == m.qat_placement.to_dict()
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


MIXED = {"model.1": {"weight_bits": 4}, "model.2.cv1": {"float": True}, "a3": {"activation_bits": 6}}


def test_placement_carries_bit_overrides_into_checkpoints(cfg, tmp_path):
    m = _calibrated(cfg, bit_overrides=MIXED).eval()
    assert m.qat_placement.bit_overrides == MIXED
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)[0]
    path = tmp_path / "q.pt"
    torch.save(qat_checkpoint(m, cfg), path)
    ckpt = load_checkpoint_file(path)
    assert ckpt["placement"]["bit_overrides"] == ckpt["bit_overrides"] == MIXED
    older = {**ckpt, "placement": {k: v for k, v in ckpt["placement"].items() if k != "bit_overrides"}}
    for c in (ckpt, older):  # checkpoints from before the placement carried them keep them only beside it
        m2, _ = build_from_checkpoint(c)
        assert m2.qat_placement.bit_overrides == MIXED
        with torch.no_grad():
            assert torch.equal(m2.eval()(x)[0], ref)


def test_forward_backward_through_fake_quant(cfg):
    m = _calibrated(cfg)
    m.train()
    set_observers(m, True)
    out = m(torch.rand(2, 3, 64, 64))
    loss = sum(v.float().abs().mean() for v in out.values() if isinstance(v, torch.Tensor))
    loss.backward()
    grads = [p.grad for n, p in m.named_parameters() if n.endswith("conv.weight") and p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) > 0 for g in grads) > 0.9 * len(grads)


@pytest.mark.parametrize("preset", ["default", "sensitive", "tensorrt", "openvino", "w4a8"])
def test_every_preset_prepares_calibrates_and_trains(preset):
    cfg = load_config(CONFIG, qconfig=preset)
    m = _model()
    placement = prepare_qat_model(m, cfg)
    calibrate(m, [torch.rand(2, 3, 64, 64)], 2, progress=False)
    m.train()
    out = m(torch.rand(2, 3, 64, 64))
    sum(v.float().abs().mean() for v in out.values() if isinstance(v, torch.Tensor)).backward()
    weights = {l.weight_bits for l in placement.layers if l.quantized}
    assert weights == ({4} if preset == "w4a8" else {8})
    lsq = [q for _, q in quantizers(m) if q.fq_type == "lsq"]
    if preset == "sensitive":
        assert lsq and all(q.scale.grad is not None for q in lsq)
        # LSQ+ learned offsets only on asymmetric activations, never on weights
        assert all(not isinstance(q.zero_point, nn.Parameter) for q in lsq if q.is_weight)
        assert any(isinstance(q.zero_point, nn.Parameter) for q in lsq if not q.is_weight)


def test_shared_quantizer_sites_run_in_site_order(cfg):
    """A shared quantizer refreshes its scale at site 0, so site 0 must be the first to run in every forward pass."""
    model = _calibrated(cfg)
    calls: dict[str, list[int]] = {}

    def record(key):
        return lambda mod, args, kwargs: calls.setdefault(key, []).append(kwargs.get("site", 0))

    for key, fq in model.qat_quantizers.items():
        if fq.observer.num_sites > 1:
            fq.register_forward_pre_hook(record(key), with_kwargs=True)
    model.train()
    model(torch.rand(1, 3, 64, 64))
    assert len(calls) >= 6  # C2f blocks and neck concats
    assert all(sites == list(range(len(sites))) for sites in calls.values()), calls
