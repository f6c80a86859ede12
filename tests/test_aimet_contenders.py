"""The AIMET contenders' adapters (INT4 -> INT8 storage for OpenVINO) and one real AIMET QAT run, where installed."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_aimet_int4_codes_are_restored_as_int8_with_the_same_values():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.aimet_contenders import int8_storage

    codes = np.array([[-8, -3, 0, 7], [1, 2, -1, 5]], dtype=np.int8)
    w4 = helper.make_tensor("w", TensorProto.INT4, codes.shape, codes.flatten().tolist())
    scale = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "s")
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["w", "s"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, codes.shape)], [w4, scale])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assert int8_storage(proto) == 1
    stored = {i.name: i for i in proto.graph.initializer}
    assert stored["w"].data_type == TensorProto.INT8
    np.testing.assert_array_equal(numpy_helper.to_array(stored["w"]), codes)
    assert int8_storage(proto) == 0  # nothing left to convert
    import onnxruntime as ort

    y = ort.InferenceSession(proto.SerializeToString()).run(None, {})[0]
    np.testing.assert_array_equal(y, codes.astype(np.float32) * 0.5)


def test_aimet_qat_contender_trains_exports_and_runs_int8_in_openvino(tmp_path):
    """AIMET's QuantSim QAT of the shapes model through Ultralytics' trainer, exported and measured like the rest."""
    pytest.importorskip("aimet_torch", reason="aimet-torch is a harness extra (make bench)")
    from benchmarks.run_contender import run
    from src.data.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "shapes", n_train=16, n_val=8, imgsz=96, seed=0, progress=False)
    spec = {"name": "qat_aimet_w4a8", "seed": 0, "model": str(Path("models/pretrained/yolov8n_shapes.pt").resolve()),
            "data": str(data), "epochs": 1, "imgsz": 96, "batch": 8, "lr": 1e-4, "workers": 0, "device": "cpu",
            "out": str(tmp_path / "o"), "settings": {}}
    r = run(spec)
    assert r["status"] == "ok", r["error"]
    assert r["steps"] == 2 and r["map50_95"] is not None
    assert r["int8_convs"] >= 63 and r["export_check"]["passed"]


def test_aimet_calibration_images_have_the_contenders_size(tmp_path):
    """They were letterboxed to the config's 640 px whatever the harness's --imgsz (ranges from other images)."""
    from benchmarks.aimet_contenders import image_batches
    from src.data.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "d", n_train=4, n_val=2, imgsz=96, seed=0, progress=False)
    batches = image_batches(str(data), 4, seed=0, imgsz=96)
    assert sum(b.shape[0] for b in batches) == 4
    assert all(b.shape[-2:] == (96, 96) for b in batches)
