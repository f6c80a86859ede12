"""YOLOv8 segmentation and pose heads through the same traced placement: the mask-prototype branch (its
ConvTranspose2d upsampling included) and the keypoint convs quantized, every conv INT8 in ONNX Runtime's graph and
OpenVINO's compiled graph, ONNX equal to fake quant, and the swap reversible. train_qat.py refuses both tasks by
name: their losses and Ultralytics' segment / pose validators are not wired in."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import onnx_runtime_and_torch_outputs, usable_detector

IMGSZ = 64
SEG_CONVS = 76  # yolov8n's 63 detection convs + Proto's 3 convs and upsampling + cv4's 3 x 3 mask-coefficient convs
POSE_CONVS = 72  # yolov8n's 63 + cv4's 3 x 3 keypoint convs


def _task_model(task: str, *config_args):
    from ultralytics.nn.tasks import PoseModel, SegmentationModel

    from src.config import load_config

    yaml, cls = {"segment": ("yolov8n-seg.yaml", SegmentationModel), "pose": ("yolov8n-pose.yaml", PoseModel)}[task]
    model, _ = usable_detector(load_config("configs/qat_config.yaml", *config_args), yaml, IMGSZ, model_cls=cls)
    return model


@pytest.fixture(scope="module")
def seg():
    return _task_model("segment")


@pytest.fixture(scope="module")
def pose():
    return _task_model("pose")


def test_every_segment_conv_is_quantized_and_the_proto_upsampling_reads_a_zero_point_free_grid(seg):
    from src.analysis.model_stats import quantization_ratio
    from src.models.quant_modules import QuantConv

    placement = seg.qat_placement
    assert sum(l.quantized for l in placement.layers) == len(placement.layers) == SEG_CONVS
    up = seg.get_submodule("model.22.proto.upsample")
    assert isinstance(up, QuantConv) and isinstance(up.conv, nn.ConvTranspose2d)
    assert not up.weight_quant.per_channel  # OpenVINO runs a deconvolution int8 with one weight scale only
    group = next(g for g in placement.groups if g.consumers == ["model.22.proto.upsample"])
    assert group.signed and group.symmetric
    # every other group keeps the config's asymmetric unsigned grid
    assert not any(g.symmetric for g in placement.groups if g is not group)
    assert {l.name for l in placement.layers if l.name.startswith("model.22.cv4.")} >= {"model.22.cv4.0.2"}
    ratio = quantization_ratio(seg)  # the analysis report counts the transposed conv too
    assert (ratio["layers_quantized"], ratio["layers_total"]) == (SEG_CONVS, SEG_CONVS + 1)  # + DFL's fixed conv


def test_the_head_rule_written_for_detect_selects_segment_and_pose_heads(seg, pose):
    # configs/qat_config.yaml's "model.[0-9]+.detect" rule (LSQ on the head) reaches the task heads too
    for model in (seg, pose):
        head = [l for l in model.qat_placement.layers if l.name.startswith("model.22.")]
        assert head and all(l.match_name.startswith("model.22.detect.") and 1 in l.layer_configs for l in head)


@pytest.mark.parametrize("task", ["segment", "pose"])
def test_onnx_and_openvino_run_every_conv_int8_and_match_fake_quant(task, seg, pose, tmp_path):
    import onnx

    from src.export.onnx_qdq import export_onnx, qdq_summary
    from src.export.openvino_export import export_openvino, runtime_int8_report

    model, n = (seg, SEG_CONVS) if task == "segment" else (pose, POSE_CONVS)
    path = export_onnx(model, tmp_path / f"{task}.onnx", IMGSZ)
    proto = onnx.load(str(path))
    s = qdq_summary(proto)
    assert len(s.quantized_convs) == len(s.int8_weight_convs) == n
    assert s.float_convs == ["/model.22/dfl/conv/Conv"]
    assert [o.name for o in proto.graph.output] == (["output0", "output1"] if task == "segment" else ["output0"])
    report = runtime_int8_report(export_openvino(path, tmp_path / "ov", task))
    assert len(report.int8) == len(report.quantized) == n, report.float_fallbacks
    pairs = onnx_runtime_and_torch_outputs(model, path, IMGSZ)
    assert len(pairs) == 2 * len(proto.graph.output)
    for i, (got, expected) in enumerate(pairs):
        assert got.shape == expected.shape
        err = np.abs(got - expected)
        if i % 2 == 0:  # output0: boxes, class scores and mask coefficients / keypoints
            assert err.max() < 1e-3 * max(1.0, np.abs(expected).max())
        else:
            # output1, the mask prototypes: ONNX Runtime's ConvTranspose sums in another order than torch's, so a
            # few upsampled values (~0.06 %) land one code away, and proto.cv2 / cv3 spread that (measured: mean
            # error 0.08-0.12 % of the mean value, max 0.3-0.4 % of the max)
            assert err.mean() < 3e-3 * np.abs(expected).mean()
            assert err.max() < 1e-2 * np.abs(expected).max()


@pytest.mark.parametrize("task", ["segment", "pose"])
def test_tensorrt_ready_onnx_of_segment_and_pose_keeps_tensorrt_rules(task, tmp_path):
    import onnx

    from src.export.onnx_qdq import qdq_summary
    from src.export.tensorrt_export import check_tensorrt_rules, export_tensorrt

    # the tensorrt preset (symmetric int8 everywhere); min/max instead of its entropy histograms, for speed
    model = _task_model(task, {"quantization.activation.observer": "minmax"}, "tensorrt")
    out = export_tensorrt(model, tmp_path / "tensorrt", "quantized_model", IMGSZ, build=False)
    assert check_tensorrt_rules(out.onnx) == []
    s = qdq_summary(onnx.load(str(out.onnx)))
    assert len(s.quantized_convs) == len(s.int8_weight_convs) == (SEG_CONVS if task == "segment" else POSE_CONVS)


def test_tflite_refuses_segment_and_pose_heads_by_name(seg, pose):
    from src.export.tflite_export import TFLiteExportError, check_exportable

    for model, head in ((seg, "Segment"), (pose, "Pose")):
        with pytest.raises(TFLiteExportError, match=f"TFLite export of a {head} head is not supported"):
            check_exportable(model)


def test_bias_correction_measures_the_transposed_conv_and_adaround_refuses_it(seg):
    from src.errors import QATError
    from src.models.adaround import roundable_convs
    from src.models.bias_correction import OutputShift

    up = seg.get_submodule("model.22.proto.upsample")
    x = torch.rand(2, up.conv.in_channels, 4, 4, generator=torch.Generator().manual_seed(3))
    shift = OutputShift()
    with torch.no_grad():
        shift.collect(up, x)
        site = up._site("input_site")
        xq = site(x) if site is not None else x
        diff = (torch.nn.functional.conv_transpose2d(xq, up.quantized_weight(), None, 2, 0)
                - torch.nn.functional.conv_transpose2d(x, up.conv.weight, None, 2, 0))
    torch.testing.assert_close(shift.compute(), diff.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    with pytest.raises(QATError, match="model.22.proto.upsample is a transposed conv"):
        roundable_convs(seg)


def test_export_metadata_names_the_task_and_the_pose_keypoint_shape(seg, pose):
    from src.export.metadata import build_metadata

    meta = build_metadata(seg, IMGSZ)
    assert (meta["task"], meta["head"]) == ("segment", "Segment") and "kpt_shape" not in meta
    meta = build_metadata(pose, IMGSZ)
    assert (meta["task"], meta["head"], meta["kpt_shape"]) == ("pose", "Pose", [17, 3])


@pytest.mark.parametrize("task", ["segment", "pose"])
def test_checkpoints_rebuild_the_task_model_bit_identically_and_train_qat_refuses_them(task, seg, pose, tmp_path,
                                                                                       tiny_dataset, caplog, capsys):
    from ultralytics.nn.tasks import PoseModel, SegmentationModel

    from src.cli import main
    from src.config import load_config
    from src.models.yolov8_qat import build_from_checkpoint, qat_checkpoint

    model = seg if task == "segment" else pose
    path = tmp_path / "q.pt"
    torch.save(qat_checkpoint(model, load_config("configs/qat_config.yaml")), path)
    rebuilt, _ = build_from_checkpoint(torch.load(path, weights_only=True))
    assert type(rebuilt) is (SegmentationModel if task == "segment" else PoseModel)
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = rebuilt.eval()(x)[0], model.eval()(x)[0]
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, w)
    assert main(["--model", str(path), "--data", str(tiny_dataset), "--epochs", "1", "--device", "cpu",
                 "--save-dir", str(tmp_path / "run")]) != 0
    printed = capsys.readouterr()
    said = caplog.text + printed.out + printed.err
    assert f"QAT checkpoint {path} defines a '{task}' model; train_qat.py trains and evaluates detection" in said


def test_an_end_to_end_segment_heads_unused_branch_includes_its_mask_convs():
    from ultralytics.nn.modules import Segment

    from src.integrations.ultralytics import inactive_head_branches

    head = Segment(nc=3, nm=8, npr=16, end2end=True, ch=(16, 32, 64))
    head.end2end = False  # Ultralytics' default at inference: one-to-many outputs, NMS outside
    assert inactive_head_branches(head) == ("one2one_cv2", "one2one_cv3", "one2one_cv4")
    head.end2end = True
    assert inactive_head_branches(head) == ("cv2", "cv3", "cv4")


def test_segment_swap_is_reversible():
    from ultralytics.nn.tasks import SegmentationModel

    from src.config import load_config
    from src.models.yolov8_qat import prepare_qat_model, to_float

    torch.manual_seed(0)
    base = SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False).eval()
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        (ref, ref_proto), _ = base(x)
    m = copy.deepcopy(base)
    prepare_qat_model(m, load_config("configs/qat_config.yaml"), fuse=False, imgsz=IMGSZ)
    to_float(m).eval()
    assert isinstance(m.get_submodule("model.22.proto.upsample"), nn.ConvTranspose2d)
    with torch.no_grad():
        (out, out_proto), _ = m(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out_proto, ref_proto, rtol=0, atol=0)


def test_train_qat_refuses_segment_and_pose_models_by_task():
    from src.data.resolve import ModelLoadError, load_fp32_model, resolve_model_path

    for yaml, task in (("yolov8n-seg.yaml", "segment"), ("yolov8n-pose.yaml", "pose")):
        with pytest.raises(ModelLoadError, match=f"'{task}' model; train_qat.py trains and evaluates detection"):
            load_fp32_model(resolve_model_path(yaml))
