"""Model and data resolution: local lookup order, kinds, loading, and fast offline failures."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
import yaml

from src.data.resolve import (
    QAT_CHECKPOINT_KEY,
    ResolvedModel,
    load_fp32_model,
    resolve_data,
    resolve_model_path,
)
from src.errors import DataError, ModelLoadError, ModelNotFoundError, QATError


def _save_ultralytics_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """The layout Ultralytics' trainer saves: a pickled half-precision module plus metadata."""
    from ultralytics import __version__

    torch.save(
        {"epoch": -1, "best_fitness": None, "model": copy.deepcopy(model).half(), "ema": None,
         "train_args": {"imgsz": 64}, "version": __version__},
        path,
    )


@pytest.fixture(scope="module")
def detection_ckpt(tmp_path_factory):
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    path = tmp_path_factory.mktemp("ckpt") / "det.pt"
    _save_ultralytics_checkpoint(model, path)
    return path, model


class _TouchOnLoad:
    """Unpickling this object creates a file: proof of whether a load ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_missing_checkpoint_fails_fast_listing_every_place(tmp_path, socket_guard):
    dirs = (tmp_path / "models" / "pretrained", tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path("yolov8n.pt", search_dirs=dirs)
    assert time.perf_counter() - start < 5
    message = str(info.value)
    for d in dirs:
        assert str(d / "yolov8n.pt") in message
    assert "never downloads" in message and "--model yolov8n.yaml" in message and "models/pretrained" in message
    assert "train an FP32 model first" in message


def test_default_model_comes_from_variant(tmp_path, socket_guard):
    with pytest.raises(ModelNotFoundError, match="model.variant='s' selects yolov8s.pt"):
        resolve_model_path(None, variant="s", search_dirs=(tmp_path,))
    with pytest.raises(ModelNotFoundError, match="variant='q'"):
        resolve_model_path(None, variant="q")


def test_bare_name_prefers_first_search_dir(tmp_path, detection_ckpt):
    first, second = tmp_path / "pretrained", tmp_path / "cwd"
    for d in (first, second):
        d.mkdir()
        (d / "yolov8n.pt").write_bytes(detection_ckpt[0].read_bytes())
    resolved = resolve_model_path(None, variant="n", search_dirs=(first, second))
    assert resolved == ResolvedModel("checkpoint", first / "yolov8n.pt", "yolov8n.pt")
    (first / "yolov8n.pt").unlink()
    assert resolve_model_path("yolov8n.pt", search_dirs=(first, second)).path == second / "yolov8n.pt"


def test_ultralytics_pickle_is_classified_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": _TouchOnLoad(marker)}, path)
    assert resolve_model_path(str(path)).kind == "checkpoint"
    assert not marker.exists()


def test_qat_checkpoint_detected_by_content(tmp_path):
    path = tmp_path / "quantized_model.pt"
    torch.save({QAT_CHECKPOINT_KEY: 1, "state_dict": {"w": torch.ones(2)}}, path)
    resolved = resolve_model_path(str(path))
    assert resolved.kind == "qat_checkpoint"
    with pytest.raises(ModelLoadError, match="QAT checkpoint"):
        load_fp32_model(resolved)
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)  # a safe dict, but not ours
    assert resolve_model_path(str(plain)).kind == "checkpoint"


def test_corrupt_checkpoint_named_in_error(tmp_path, detection_ckpt):
    truncated = tmp_path / "half.pt"
    data = detection_ckpt[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for bad in (truncated, empty):
        with pytest.raises(ModelLoadError, match=f"{bad}.*not a readable PyTorch checkpoint"):
            resolve_model_path(str(bad))


def test_load_checkpoint_restores_exact_weights(detection_ckpt, socket_guard):
    path, original = detection_ckpt
    model = load_fp32_model(resolve_model_path(str(path)), nc=80)  # nc is ignored for checkpoints
    from ultralytics.nn.tasks import DetectionModel

    assert type(model) is DetectionModel and model.model[-1].nc == 3
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    # trainable except DFL's fixed integral conv, as in Ultralytics' trainer
    assert all(p.requires_grad == (".dfl" not in n) for n, p in model.named_parameters())
    expected = copy.deepcopy(original).half().float().state_dict()  # saved in half precision
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k].float(), expected[k].float()), k
    assert model.args["imgsz"] == 64


def test_non_detection_checkpoint_rejected(tmp_path):
    from ultralytics.nn.tasks import ClassificationModel

    path = tmp_path / "cls.pt"
    _save_ultralytics_checkpoint(ClassificationModel("yolov8n-cls.yaml", nc=2, verbose=False), path)
    with pytest.raises(ModelLoadError, match="'classify' model.*detection"):
        load_fp32_model(resolve_model_path(str(path)))


def test_unusable_pickle_is_a_load_error(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a bare module, not an Ultralytics checkpoint dict
    with pytest.raises(ModelLoadError, match=f"{path} could not be loaded as an Ultralytics checkpoint"):
        load_fp32_model(resolve_model_path(str(path)))


def test_packaged_yaml_builds_random_init_model(tiny_model_yaml, socket_guard):
    resolved = resolve_model_path(tiny_model_yaml)
    assert resolved == ResolvedModel("yaml", "yolov8n.yaml", "yolov8n.yaml")
    model = load_fp32_model(resolved, nc=3)
    assert model.yaml["scale"] == "n" and model.model[-1].nc == 3
    assert sum(p.numel() for p in model.parameters()) == 3_011_433  # yolov8n with a 3-class head
    assert not model.training and isinstance(model.args, dict)


def test_yaml_file_path_and_bad_yamls(tmp_path):
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load("yolov8n.yaml")
    own = tmp_path / "my_model.yaml"
    own.write_text(yaml.safe_dump({k: cfg[k] for k in ("nc", "scales", "backbone", "head")}))
    assert resolve_model_path(str(own)) == ResolvedModel("yaml", own, str(own))
    with pytest.raises(ModelNotFoundError, match="model YAML 'yolov9000.yaml' not found"):
        resolve_model_path("yolov9000.yaml")
    with pytest.raises(ModelLoadError, match="'segment' model"):
        load_fp32_model(resolve_model_path("yolov8n-seg.yaml"))


def test_urls_and_exports_are_refused(socket_guard):
    with pytest.raises(ModelNotFoundError, match="URL.*never downloads"):
        resolve_model_path("https://github.com/ultralytics/assets/releases/download/v8.4.0/yolov8n.pt")
    with pytest.raises(ModelNotFoundError, match="'.onnx'"):
        resolve_model_path("model.onnx")
    with pytest.raises(DataError, match="URL"):
        resolve_data("https://example.com/data.zip")


def test_resolve_data_returns_checked_dict(tiny_dataset, socket_guard):
    for arg in (tiny_dataset, tiny_dataset.parent):  # the YAML or its folder
        data = resolve_data(arg)
        assert data["nc"] == 3 and data["names"] == {0: "circle", 1: "square", 2: "triangle"}
        assert data["val"] == str(tiny_dataset.parent / "images" / "val")


def test_missing_data_yaml(tmp_path, socket_guard):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.yaml'}.*python -m src.data.synthetic"):
        resolve_data(tmp_path / "nope.yaml")


def test_missing_split_named_before_any_model_work(tiny_dataset, tmp_path, socket_guard):
    data = yaml.safe_load(tiny_dataset.read_text())
    data["val"] = "images/validation"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(data))
    missing = tiny_dataset.parent / "images" / "validation"
    with pytest.raises(DataError, match=f"val images not found, missing path {missing}"):
        resolve_data(broken)
    del data["val"]
    broken.write_text(yaml.safe_dump(data))
    with pytest.raises(DataError, match="no 'val' entry"):
        resolve_data(broken)


def test_coco_offline_fails_fast_without_download(socket_guard):
    from ultralytics.utils import DATASETS_DIR

    start = time.perf_counter()
    with pytest.raises(DataError) as info:
        resolve_data("coco.yaml")
    assert time.perf_counter() - start < 5
    assert str(DATASETS_DIR / "coco" / "train2017.txt") in str(info.value)
    assert "never downloads" in str(info.value)


def test_errors_share_one_base():
    assert all(issubclass(e, QATError) for e in (DataError, ModelLoadError, ModelNotFoundError))


def test_qat_key_matches_the_checkpoint_writer():
    from src.models import yolov8_qat

    assert yolov8_qat.QAT_CHECKPOINT_KEY == QAT_CHECKPOINT_KEY
