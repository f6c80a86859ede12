"""Contract tests of the third-party seams in src/integrations: each fails if the pinned library changes under it."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from src.integrations.torch_ops import (
    fused_fake_quantize_with_mask,
    is_batch_norm,
    is_norm_layer,
    learnable_fake_quantize_backward,
)
from src.quantization.utils import fake_quantize_with_mask
from src.integrations.ultralytics import (
    LAYER_ATTRS,
    block_modules,
    carry_layer_attrs,
    conv_block_bn,
    has_one2one_head,
    inactive_head_branches,
    normalize_coords_wrapper,
    rebuild_bottleneck,
    rebuild_conv_block,
    select_end2end,
    set_loss_epoch,
    set_model_args,
    validator_nms,
)


def _yolov8n(nc: int = 3) -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolov8n.yaml", nc=nc, verbose=False)


# --------------------------------------------------------------------------------------------------------------------
# Ultralytics
# --------------------------------------------------------------------------------------------------------------------
def test_parse_model_sets_exactly_the_layer_attrs(monkeypatch):
    from ultralytics.nn import tasks

    set_by_parse_model = []
    real_setattr = nn.Module.__setattr__

    def spy(module, name, value):
        if inspect.currentframe().f_back.f_code is tasks.parse_model.__code__:
            set_by_parse_model.append((module, name))
        real_setattr(module, name, value)

    monkeypatch.setattr(nn.Module, "__setattr__", spy)
    model = _yolov8n()
    monkeypatch.undo()
    layers = list(model.model)
    assert {name for m, name in set_by_parse_model if any(m is layer for layer in layers)} == set(LAYER_ATTRS)
    assert all(hasattr(layer, a) for layer in model.model for a in LAYER_ATTRS)


def test_forward_reads_the_layer_attrs_a_swapped_layer_carries():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = _yolov8n().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)[0]
        bare = Wrapper(model.model[3])
        model.model[3] = bare
        with pytest.raises(AttributeError):
            model(x)
        carry_layer_attrs(bare.inner, bare)
        assert torch.equal(model(x)[0], ref)


@pytest.mark.parametrize("name", ["Conv", "DWConv"])
def test_rebuilt_conv_block_equals_the_constructed_one(name):
    cls = getattr(block_modules().conv, name)
    torch.manual_seed(0)
    ref = cls(8, 8, 3).eval()
    ref.bn.running_mean.uniform_(-0.5, 0.5)
    block = rebuild_conv_block(name, ref.conv, ref.bn, ref.act)
    assert type(block) is cls
    assert set(vars(block)) == set(vars(ref))  # __init__ sets nothing beyond the three modules
    assert list(block.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(block(x), ref(x))


def test_rebuilt_bottleneck_equals_the_constructed_one():
    cls = block_modules().block.Bottleneck
    torch.manual_seed(0)
    ref = cls(8, 8).eval()
    b = rebuild_bottleneck(ref.cv1, ref.cv2, ref.add)
    assert type(b) is cls and ref.add is True
    assert set(vars(b)) == set(vars(ref))
    assert list(b.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 8, 8, 8)
    assert torch.equal(b(x), ref(x))


def test_ultralytics_fuse_deletes_the_conv_blocks_bn():
    model = _yolov8n().eval()
    convs = [m for m in model.modules() if isinstance(m, block_modules().conv.Conv)]
    assert convs and all(isinstance(conv_block_bn(m), nn.BatchNorm2d) for m in convs)
    model.fuse(verbose=False)
    assert all(conv_block_bn(m) is None for m in convs)


def test_normalize_coords_wrapper_divides_boxes_by_the_image_size():
    # what LiteRTBackend undoes: boxes (x, y, w, h in pixels) relative to width and height, scores untouched
    model = _yolov8n(nc=3).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        det = model(x)[0]
        wrapped = normalize_coords_wrapper(model, 64, 96, nc=3)
        out = wrapped(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    scale = torch.tensor([96.0, 64.0, 96.0, 64.0]).view(1, 4, 1)
    assert out.shape == det.shape and not wrapped.training
    assert torch.equal(out[:, :4], det[:, :4] / scale) and torch.equal(out[:, 4:], det[:, 4:])


def test_one2one_head_marks_end_to_end_detect():
    head = block_modules().head.Detect
    assert not has_one2one_head(head(nc=3, ch=(16, 32, 64)))
    assert has_one2one_head(head(nc=3, end2end=True, ch=(16, 32, 64)))


def _yolo26n(nc: int = 3) -> nn.Module:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    return DetectionModel("yolo26n.yaml", nc=nc, verbose=False)


def test_end_to_end_head_selection_and_the_branch_fuse_deletes():
    import copy

    model = _yolov8n()
    assert not select_end2end(model, True) and inactive_head_branches(model.model[-1]) == ()
    assert validator_nms(model) is None
    model = _yolo26n()
    head = model.model[-1]
    for on, unused, nms in ((False, ("one2one_cv2", "one2one_cv3"), None), (True, ("cv2", "cv3"), False)):
        assert select_end2end(model, on) and model.end2end is on
        assert inactive_head_branches(head) == unused and validator_nms(model) is nms
        fused = copy.deepcopy(head)
        fused.fuse()
        gone = {n for n in ("cv2", "cv3", "one2one_cv2", "one2one_cv3") if getattr(fused, n) is None}
        assert gone == set(unused)
        assert fused.end2end is on  # the branch left is the one selected


def test_end_to_end_loss_weights_follow_the_epoch_as_ultralytics_trainer_sets_them():
    from ultralytics.cfg import get_cfg

    model = _yolo26n()
    set_model_args(model, get_cfg(overrides={"epochs": 3}))
    weights = []
    for epoch in (2, 0, 1):  # any order: set from the index, not by counting calls
        set_loss_epoch(model, epoch)
        weights += [model.criterion.o2m, model.criterion.o2o]
    # Ultralytics' E2ELoss: one-to-many weight 0.8 at the first epoch, decaying linearly to 0.1 at the last
    assert weights == pytest.approx([0.1, 0.9, 0.8, 0.2, 0.45, 0.55])
    plain = _yolov8n()
    set_model_args(plain, get_cfg(overrides={"epochs": 3}))
    set_loss_epoch(plain, 1)  # a criterion without a schedule is left as it is
    assert type(plain.criterion).__name__ == "v8DetectionLoss"


def test_detection_loss_reads_its_gains_from_model_args():
    model = _yolov8n().train()
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [2.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.6, 0.2, 0.3]]),
    }
    preds = model(batch["img"])
    items = {}
    for gains in ((1.0, 1.0, 1.0), (2.0, 3.0, 5.0)):
        model.criterion = None  # built by the first model.loss call, from the model.args it finds
        set_model_args(model, SimpleNamespace(box=gains[0], cls=gains[1], dfl=gains[2]))
        items[gains] = model.loss(batch, preds)[1]
    unit, scaled = items[(1.0, 1.0, 1.0)], items[(2.0, 3.0, 5.0)]
    assert list(unit) == ["box_loss", "cls_loss", "dfl_loss"]
    for name, gain in zip(unit, (2.0, 3.0, 5.0)):
        assert float(unit[name]) > 0
        torch.testing.assert_close(scaled[name], unit[name] * gain)


# --------------------------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------------------------
def _lsq_reference_grads(x, s, zp, qmin, qmax, g, axis, dy):
    """Autograd, in float64, of ``(clamp(round(x/s) + zp, qmin, qmax) - zp) * s`` with a straight-through round and
    the scale / zero-point gradients scaled by ``g`` (LSQ / LSQ+)."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    x = x.double().requires_grad_()
    s, zp = s.double().requires_grad_(), zp.double().requires_grad_()
    sb, zb = s.reshape(shape), zp.reshape(shape)
    sg, zg = sb * g + (sb * (1 - g)).detach(), zb * g + (zb * (1 - g)).detach()  # value kept, gradient times g
    v = x / sg
    code = torch.round(v.detach()) + zb.detach()
    inside = (code >= qmin) & (code <= qmax)
    y = torch.where(inside, (v + (torch.round(v) - v).detach()) * sg, (code.clamp(qmin, qmax) - zg) * sg)
    y.backward(dy.double())
    return x.grad, s.grad, zp.grad


@pytest.mark.parametrize("axis", [None, 1])
def test_learnable_fake_quantize_backward_matches_autograd_of_reference(axis):
    qmin, qmax, g = 0, 15, 0.37
    gen = torch.Generator().manual_seed(0)
    nscale = 1 if axis is None else 5
    s = torch.linspace(0.05, 0.09, nscale)
    zp = torch.arange(nscale, dtype=torch.float32) + 3
    codes = torch.randint(-8, 20, (4, 5, 3), generator=gen).float()  # many fall outside [qmin - zp, qmax - zp]
    offset = torch.rand(4, 5, 3, generator=gen) * 0.8 - 0.4  # far from rounding midpoints
    sb = s if axis is None else s.reshape(1, -1, 1)
    x = (codes + offset) * sb
    dy = torch.randn(4, 5, 3, generator=gen)
    dx, ds, dz = learnable_fake_quantize_backward(dy, x, s, zp, qmin, qmax, g, axis)
    rx, rs, rz = _lsq_reference_grads(x, s, zp, qmin, qmax, g, axis, dy)
    torch.testing.assert_close(dx.double(), rx)
    torch.testing.assert_close(ds.double().reshape(-1), rs.reshape(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz.double().reshape(-1), rz.reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axis,qmin,qmax,zero", [(None, 0, 255, False), (None, -127, 127, True), (1, -127, 127, True),
                                                 (0, -127, 127, True)])
def test_fused_fake_quantize_kernels_equal_the_vectorized_path(axis, qmin, qmax, zero):
    """The one-pass kernels CUDA runs give exactly the values and mask of the CPU path (run here on the CPU)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 5, generator=g) * 3
    n = 1 if axis is None else x.shape[axis]
    scale = (torch.rand(n, generator=g) * 0.05 + 0.01).reshape(() if axis is None else (n,))
    zp = torch.zeros(scale.shape, dtype=torch.int32) if zero else torch.randint(60, 200, scale.shape, generator=g,
                                                                                  dtype=torch.int32)
    s_b = scale if axis is None else scale.reshape([-1 if d == axis else 1 for d in range(4)])
    v = x * (1.0 / s_b)
    x = torch.where((v - v.floor() - 0.5).abs() < 1e-3, x + 1e-2 * s_b, x)  # off rounding midpoints
    y_ref, mask_ref = fake_quantize_with_mask(x, scale, None if zero else zp, qmin, qmax, axis)
    y, mask = fused_fake_quantize_with_mask(x, scale, None if zero else zp, qmin, qmax, axis)
    assert torch.equal(y, y_ref) and torch.equal(mask, mask_ref) and (~mask).any()


def test_norm_layer_predicates():
    batch_norms = [nn.BatchNorm1d(4), nn.BatchNorm2d(4), nn.BatchNorm3d(4), nn.SyncBatchNorm(4), nn.LazyBatchNorm2d()]
    assert all(is_batch_norm(m) and is_norm_layer(m) for m in batch_norms)
    assert is_norm_layer(nn.InstanceNorm2d(4, affine=True)) and not is_batch_norm(nn.InstanceNorm2d(4))
    assert not any(is_norm_layer(m) for m in (nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.Conv2d(4, 4, 1)))


# --------------------------------------------------------------------------------------------------------------------
# LiteRT / ai-edge-quantizer
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_tflite(tmp_path_factory):
    """A float Conv-ReLU-Conv .tflite converted by litert-torch (skips where the TFLite packages are missing)."""
    import importlib

    for pkg in ("litert_torch", "ai_edge_litert.interpreter", "ai_edge_quantizer.quantizer"):
        try:
            importlib.import_module(pkg)
        except Exception as e:  # a broken native library fails as something other than ImportError
            pytest.skip(f"TFLite export needs {pkg.split('.')[0]} ({type(e).__name__}: {e})")
    import litert_torch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    path = tmp_path_factory.mktemp("litert") / "float.tflite"
    litert_torch.convert(model, (torch.rand(1, 3, 8, 8),)).export(str(path))
    return path


def test_interpreter_ops_details_are_the_graph_in_execution_order(float_tflite):
    from ai_edge_litert.interpreter import Interpreter

    from src.integrations.litert import ops_details

    it = Interpreter(model_path=str(float_tflite))
    it.allocate_tensors()
    ops = ops_details(it)
    assert [op["index"] for op in ops] == list(range(len(ops)))
    assert [op["op_name"] for op in ops].count("CONV_2D") == 2
    tensors = {d["index"] for d in it.get_tensor_details()}
    producer_position = {int(o): k for k, op in enumerate(ops) for o in op["outputs"]}
    for k, op in enumerate(ops):
        assert {"index", "op_name", "inputs", "outputs"} <= set(op)
        assert all(i in tensors for i in op["inputs"] if i >= 0) and all(o in tensors for o in op["outputs"])
        assert all(producer_position.get(int(i), -1) < k for i in op["inputs"] if i >= 0), op  # producers first
    assert it.get_output_details()[0]["index"] in set(ops[-1]["outputs"])


def test_quantizer_recipe_manager_drives_a_calibrator_with_its_own_update_rule(float_tflite):
    from ai_edge_quantizer import calibrator, quantizer, recipe
    from ai_edge_quantizer.recipe_manager import RecipeManager

    from src.integrations.litert import recipe_manager

    # why the seam exists: Quantizer.calibrate takes no range-update rule
    assert "qsv_update_func" not in inspect.signature(quantizer.Quantizer.calibrate).parameters
    assert "qsv_update_func" in inspect.signature(calibrator.Calibrator).parameters
    qt = quantizer.Quantizer(str(float_tflite))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    manager = recipe_manager(qt)
    assert isinstance(manager, RecipeManager)
    calls = []

    def update(qsv, new):
        calls.append(bool(qsv))
        return new

    cal = calibrator.Calibrator(str(float_tflite), num_threads=1, qsv_update_func=update)
    images = [{"args_0": torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(k)).numpy()} for k in range(2)]
    cal.calibrate({"serving_default": images}, manager)
    qsvs = cal.get_model_qsvs()
    assert qsvs and all({"min", "max"} <= set(v) for v in qsvs.values())
    assert True in calls  # the second image updated the first one's ranges through our rule


def test_ultralytics_image_open_patch_has_the_plugin_flag_report_unreadable_images_sets():
    """``report_unreadable_images`` relies on ``ultralytics.utils.patches._pil_plugins_registered``: without pi-heif,
    an unreadable image then fails with Pillow's own error, not "No module named 'pi_heif'"."""
    import importlib.util

    from ultralytics.utils import patches

    from src.integrations.ultralytics import report_unreadable_images

    assert hasattr(patches, "_pil_plugins_registered")
    report_unreadable_images()
    if importlib.util.find_spec("pi_heif") is None:
        assert patches._pil_plugins_registered is True
