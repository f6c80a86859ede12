"""ONNX QDQ export: Q/DQ at every quantized conv, int8 weights carrying exactly the checkpoint's ranges, parity with
the fake-quant model in ONNX Runtime, file size, and loading through Ultralytics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from helpers import calibrated_qat_model

IMGSZ = 64


def _qat_model(qconfig=None):
    return calibrated_qat_model(IMGSZ, qconfig)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import onnx

    from src.export.metadata import build_metadata
    from src.export.onnx_qdq import export_onnx

    model, cfg = _qat_model()
    out = tmp_path_factory.mktemp("onnx")
    meta = build_metadata(model, IMGSZ, cfg=cfg, reference_metrics={"map50": 0.61, "map50_95": 0.42})
    path = export_onnx(model, out / "quantized_model.onnx", IMGSZ, metadata=meta)
    return model, path, onnx.load(str(path))


def _images(n=3):
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, 3, IMGSZ, IMGSZ, generator=g)


def test_every_quantized_conv_is_fed_by_qdq_with_int8_weights(exported):
    from onnx import numpy_helper

    from src.export.onnx_qdq import count_qdq, qdq_summary

    model, _, proto = exported
    n_quantized = sum(l.quantized for l in model.qat_placement.layers)
    s = qdq_summary(proto)
    assert len(s.quantized_convs) == n_quantized == 63
    assert sorted(s.int8_weight_convs) == sorted(s.quantized_convs)
    assert s.float_convs == ["/model.22/dfl/conv/Conv"]  # DFL is float by design
    # no float weight goes through a QuantizeLinear any more: every remaining Q quantizes an activation
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in proto.graph.node)
    q_nodes, dq_nodes = count_qdq(proto)
    assert q_nodes == dq_nodes == 121  # 63 weights + 58 activation sites
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4:
            assert inits[n.input[0]].dtype == np.int8
            assert np.all(inits[n.input[2]] == 0) and inits[n.input[2]].dtype == np.int8
            assert next(a.i for a in n.attribute if a.name == "axis") == 0


def test_scales_and_codes_equal_the_checkpoint_exactly(exported):
    from onnx import numpy_helper

    from src.models.yolov8_qat import QuantConv
    from src.quantization.fake_quantize import export_mode

    model, _, proto = exported
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    onnx_weights = []
    for n in proto.graph.node:
        if n.op_type == "Conv" and producer.get(n.input[1]) is not None:
            dq = producer[n.input[1]]
            onnx_weights.append((inits[dq.input[0]], inits[dq.input[1]]))
    matched = 0
    m = copy.deepcopy(model)
    with torch.no_grad(), export_mode(m):
        for mod in m.modules():
            if not isinstance(mod, QuantConv) or mod.weight_quant is None:
                continue
            scale, zp = mod.weight_quant.calculate_qparams()
            fq_weight = mod.quantized_weight().numpy()
            # find the ONNX weight by value, not by name
            hits = [(c, s) for c, s in onnx_weights if c.shape == fq_weight.shape and np.array_equal(s, scale.numpy())]
            assert len(hits) == 1, f"{mod.weight_quant.name}: {len(hits)} ONNX weights with its exact scales"
            codes, s = hits[0]
            assert torch.equal(zp, torch.zeros_like(zp))
            np.testing.assert_array_equal(codes.astype(np.float32) * s.reshape(-1, 1, 1, 1), fq_weight)
            matched += 1
    assert matched == 63
    # activations: every ONNX activation (scale, zero point) is one of the shared quantizers' and all are used
    act = {(float(inits[n.input[1]]), int(inits[n.input[2]])) for n in proto.graph.node
           if n.op_type == "QuantizeLinear"}
    ckpt = set()
    for q in model.qat_quantizers.values():
        s, z = q.calculate_qparams()
        ckpt.add((float(s), int(z)))
    assert act == ckpt


def test_onnxruntime_matches_fake_quant_torch(exported):
    import onnxruntime as ort

    from src.export.common import prepare_for_export

    model, path, _ = exported
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = prepare_for_export(model)
    errs, coss = [], []
    for x in _images():
        with torch.no_grad():
            y_t = ref(x[None]).numpy()
        y_o = sess.run(None, {"images": x[None].numpy()})[0]
        assert y_o.shape == y_t.shape == (1, 4 + 3, 84)
        errs.append(np.abs(y_o - y_t).max())
        coss.append(float((y_o * y_t).sum() / np.linalg.norm(y_o) / np.linalg.norm(y_t)))
    print(f"ONNX Runtime vs torch fake quant: max abs err {max(errs):.3g}, min cosine {min(coss):.8f}")
    # boxes are in pixels (up to 64): agreement to ~1e-4 px means no activation code differs anywhere that matters
    assert max(errs) < 1e-3
    assert min(coss) > 0.999999


def test_int8_onnx_is_under_0p3_of_fp32(exported, tmp_path):
    from src.export.onnx_qdq import export_onnx
    from src.models.yolov8_qat import set_fake_quant

    model, path, _ = exported
    fp32 = copy.deepcopy(model)
    set_fake_quant(fp32, False)  # same weights, no Q/DQ: the FP32 graph of the same model
    fp32_path = export_onnx(fp32, tmp_path / "fp32.onnx", IMGSZ)
    ratio = path.stat().st_size / fp32_path.stat().st_size
    print(f"INT8 ONNX {path.stat().st_size / 1e6:.2f} MB / FP32 ONNX {fp32_path.stat().st_size / 1e6:.2f} MB "
          f"= {ratio:.3f}")
    assert ratio <= 0.3


def test_simplify_keeps_every_qdq_pair_and_the_outputs(exported, tmp_path):
    import onnx
    import onnxruntime as ort

    from src.export.onnx_qdq import count_qdq, export_onnx, qdq_summary

    model, path, proto = exported
    raw = export_onnx(model, tmp_path / "raw.onnx", IMGSZ, simplify=False)
    raw_proto = onnx.load(str(raw))
    assert count_qdq(raw_proto) == count_qdq(proto)
    assert len(qdq_summary(raw_proto).int8_weight_convs) == 63
    assert len(proto.graph.node) < len(raw_proto.graph.node)  # onnxsim did fold something
    x = _images(1).numpy()
    a = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    b = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    np.testing.assert_array_equal(a, b)


def test_metadata_and_ultralytics_predicts(exported, tmp_path):
    from ultralytics import YOLO

    from src.export.metadata import QUANT_KEY, REFERENCE_KEY, read_metadata

    model, path, _ = exported
    meta = read_metadata(path)
    assert meta["names"] == {0: "circle", 1: "square", 2: "triangle"}
    assert meta["imgsz"] == [IMGSZ, IMGSZ] and meta["stride"] == 32 and meta["task"] == "detect"
    assert meta[REFERENCE_KEY] == {"map50": 0.61, "map50_95": 0.42}
    assert meta[QUANT_KEY]["quantized_convs"] == 63
    assert meta[QUANT_KEY]["activation_symmetric"] is False  # default preset: asymmetric uint8 activations
    yolo = YOLO(str(path), task="detect")
    image = (np.random.default_rng(0).random((IMGSZ, IMGSZ, 3)) * 255).astype(np.uint8)
    results = yolo.predict(image, imgsz=IMGSZ, conf=0.0, verbose=False)
    assert yolo.predictor.model.format == "onnx"
    assert results[0].names == {0: "circle", 1: "square", 2: "triangle"}
    assert len(results[0].boxes) > 0  # conf=0 keeps the NMS survivors of the raw head output


@pytest.fixture(scope="module")
def w4a8_exports(tmp_path_factory):
    from src.export.onnx_qdq import export_onnx

    model, _ = _qat_model("w4a8")
    out = tmp_path_factory.mktemp("onnx_w4")
    packed = export_onnx(model, out / "w4a8.onnx", IMGSZ, int4_weights=True)
    int8 = export_onnx(model, out / "w4a8_int8_storage.onnx", IMGSZ)
    fp32 = copy.deepcopy(model)
    from src.models.yolov8_qat import set_fake_quant
    set_fake_quant(fp32, False)
    return model, packed, int8, export_onnx(fp32, out / "fp32.onnx", IMGSZ)


def test_pack_int4_puts_the_first_code_in_the_low_nibble():
    from src.export.onnx_qdq import pack_int4

    assert pack_int4(np.array([1, -1, -8, 7, 3], np.int8)) == bytes([0xF1, 0x78, 0x03])


def test_4bit_weights_are_stored_as_packed_int4_and_run_identically_in_onnxruntime(w4a8_exports):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from src.export.common import prepare_for_export
    from src.export.onnx_qdq import INT4_OPSET, export_bits_per_weight, qdq_summary

    model, packed, int8, fp32 = w4a8_exports
    proto = onnx.load(str(packed))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == INT4_OPSET
    weights = [i for i in proto.graph.initializer if len(i.dims) == 4 and i.name != "model.22.dfl.conv.weight"]
    assert len(weights) == 63 and all(i.data_type == onnx.TensorProto.INT4 for i in weights)
    assert all(len(i.raw_data) == (int(np.prod(i.dims)) + 1) // 2 for i in weights)  # two codes per byte
    s = qdq_summary(proto)
    assert len(s.quantized_convs) == len(s.int8_weight_convs) == 63
    # the unpacked codes are the int8-storage export's codes
    codes8 = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(int8)).graph.initializer}
    for i in weights:
        np.testing.assert_array_equal(numpy_helper.to_array(i).astype(np.int8), codes8[i.name])
    assert export_bits_per_weight(proto) == pytest.approx(4.0, abs=0.02)
    ref = prepare_for_export(model)
    a = ort.InferenceSession(str(packed), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    for x in _images():
        y_a = a.run(None, {"images": x[None].numpy()})[0]
        np.testing.assert_array_equal(y_a, b.run(None, {"images": x[None].numpy()})[0])
        with torch.no_grad():
            assert np.abs(y_a - ref(x[None]).numpy()).max() < 1e-3
    ratio = packed.stat().st_size / fp32.stat().st_size
    print(f"W4A8 ONNX {packed.stat().st_size / 1e6:.3f} MB / FP32 {fp32.stat().st_size / 1e6:.3f} MB = {ratio:.3f} "
          f"(int8 storage {int8.stat().st_size / fp32.stat().st_size:.3f})")
    assert ratio <= 0.17


def test_int8_exports_keep_their_opset_and_int8_storage(exported):
    from src.export.onnx_qdq import export_bits_per_weight

    _, _, proto = exported
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    assert export_bits_per_weight(proto) == pytest.approx(8.0, abs=0.01)  # DFL's 16 float weights
