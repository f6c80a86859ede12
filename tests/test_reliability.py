"""Bad inputs get one clear error line (naming the file/key/value and the fix), and nothing is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.cli import main

REPO = Path(__file__).resolve().parents[1]


def _base(data, tmp_path, *extra):
    return ["--data", str(data), "--img-size", "64", "--batch-size", "4", "--device", "cpu", "--workers", "0",
            "--save-dir", str(tmp_path / "run"), "--log-dir", str(tmp_path / "logs"), "--epochs", "0", *extra]


def _copy_dataset(tiny_dataset: Path, dst: Path) -> Path:
    root = Path(tiny_dataset).parent
    shutil.copytree(root, dst)
    for cache in dst.rglob("*.cache"):
        cache.unlink()
    text = (dst / "data.yaml").read_text().replace(str(root), str(dst))
    (dst / "data.yaml").write_text(text)
    return dst / "data.yaml"


# ----------------------------------------------------------------------------------------------- the bad-input table
def _model_missing(tmp_path, data):
    return ["--model", str(tmp_path / "nope.pt")], ["nope.pt", "not found"]


def _model_truncated(tmp_path, data):
    from ultralytics.nn.tasks import DetectionModel

    good = tmp_path / "good.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=3, verbose=False)}, good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    return ["--model", str(bad)], ["truncated.pt"]


def _model_classify(tmp_path, data):
    from ultralytics.nn.tasks import ClassificationModel

    p = tmp_path / "cls.pt"
    torch.save({"model": ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)}, p)
    return ["--model", str(p)], ["cls.pt", "detection"]


def _model_nc_mismatch(tmp_path, data):
    from ultralytics.nn.tasks import DetectionModel

    p = tmp_path / "nc80.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=80, verbose=False)}, p)
    return ["--model", str(p)], ["80 classes", "yolo train"]


def _teacher_other_classes(tmp_path, data):
    from ultralytics.nn.tasks import DetectionModel

    p = tmp_path / "teacher80.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=80, verbose=False)}, p)
    return ["--model", "yolov8n.yaml", "--epochs", "1", "--distillation", "--teacher-model", str(p)], ["teacher80.pt"]


def _data_missing_yaml(tmp_path, data):
    return ["--model", "yolov8n.yaml", "--data", str(tmp_path / "absent.yaml")], ["absent.yaml"]


def _data_missing_images(tmp_path, data):
    d = _copy_dataset(data, tmp_path / "noimg")
    shutil.rmtree(d.parent / "images" / "val")
    return ["--model", "yolov8n.yaml", "--data", str(d)], ["images/val"]


def _data_bad_class(tmp_path, data):
    d = _copy_dataset(data, tmp_path / "badcls")
    for f in (d.parent / "labels" / "train").glob("*.txt"):
        f.write_text("7 0.5 0.5 0.2 0.2\n")
    return ["--model", "yolov8n.yaml", "--data", str(d)], ["train", "no usable", "class"]


def _data_bad_coords(tmp_path, data):
    d = _copy_dataset(data, tmp_path / "badxy")
    for f in (d.parent / "labels" / "val").glob("*.txt"):
        f.write_text("0 1.7 0.5 0.2 0.2\n")
    return ["--model", "yolov8n.yaml", "--data", str(d), "--eval"], ["val", "no usable"]


def _data_corrupt_images(tmp_path, data):
    d = _copy_dataset(data, tmp_path / "corrupt")
    for f in (d.parent / "images" / "train").glob("*"):
        f.write_bytes(b"not an image")
    return ["--model", "yolov8n.yaml", "--data", str(d)], ["train", "no usable"]


def _config_unknown_key(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text("qat_params:\n  skip_detection_haed: true\n")
    return ["--model", "yolov8n.yaml", "--config", str(p)], ["skip_detection_haed", "skip_detection_head"]


def _config_wrong_type(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text("train_params:\n  momentum: high\n")
    return ["--model", "yolov8n.yaml", "--config", str(p)], ["train_params.momentum", "high"]


def _config_bits(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text("quantization:\n  weight:\n    bit_width: 1\n")
    return ["--model", "yolov8n.yaml", "--config", str(p)], ["bit_width", "1"]


def _config_axis(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text("quantization:\n  weight:\n    ch_axis: 5\n")
    return ["--model", "yolov8n.yaml", "--config", str(p)], ["axis", "5"]


def _config_regex(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text("layer_configs:\n  - pattern: 'model.[0-9+.detect'\n    config:\n      weight:\n"
                 "        observer: minmax\n")
    return ["--model", "yolov8n.yaml", "--config", str(p)], ["model.[0-9+.detect"]


def _config_tensorrt_w4(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text("export:\n  formats: [onnx, tensorrt]\nquantization:\n  weight:\n    bit_width: 16\n")
    return ["--model", "yolov8n.yaml", "--config", str(p)], ["16", "tensorrt", "bit_width <= 8"]


def _device_missing(tmp_path, data):
    return ["--model", "yolov8n.yaml", "--device", "cuda:7"], ["cuda:7", "not available"]


CASES = {
    "model missing file": _model_missing,
    "model truncated .pt": _model_truncated,
    "model not a detector": _model_classify,
    "model class count differs from data": _model_nc_mismatch,
    "teacher with a different class set": _teacher_other_classes,
    "data missing yaml": _data_missing_yaml,
    "data missing image folder": _data_missing_images,
    "data labels with class >= nc": _data_bad_class,
    "data coordinates out of range": _data_bad_coords,
    "data corrupt images": _data_corrupt_images,
    "config unknown key": _config_unknown_key,
    "config wrong type": _config_wrong_type,
    "config bit width outside 2..16": _config_bits,
    "config per-channel axis the layer lacks": _config_axis,
    "config regex does not compile": _config_regex,
    "config not exportable to requested format": _config_tensorrt_w4,
    "device unavailable": _device_missing,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(case, tmp_path, tiny_dataset, capsys):
    if case == "device unavailable" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    extra, needles = CASES[case](tmp_path, tiny_dataset)
    args = _base(tiny_dataset, tmp_path)
    # later flags win in argparse, so the case's --data/--device/--model override the base ones
    rc = main(args + extra)
    out = capsys.readouterr().out
    assert rc == 1, out[-2000:]
    errors = [l for l in out.splitlines() if l.startswith("ERROR")]
    assert len(errors) == 1, out[-2000:]
    assert "Traceback" not in out
    for n in needles:
        assert n.lower() in out.lower(), (n, errors[0])


def test_debug_log_level_prints_the_traceback(tmp_path, tiny_dataset, capsys):
    extra, _ = _model_missing(tmp_path, tiny_dataset)
    rc = main(_base(tiny_dataset, tmp_path) + extra + ["--log-level", "debug"])
    assert rc == 1
    assert "Traceback" in capsys.readouterr().out


def test_dropped_images_are_counted_in_the_summary(tmp_path, tiny_dataset, capsys):
    d = _copy_dataset(tiny_dataset, tmp_path / "some_bad")
    bad = sorted((d.parent / "images" / "train").glob("*"))[:3]
    for f in bad:
        f.write_bytes(b"junk")
    rc = main(_base(d, tmp_path, "--model", "yolov8n.yaml"))
    assert rc == 0
    assert "3 of 8 train images were dropped" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ numerics
def test_divergence_rolls_back_then_stops_naming_step(tmp_path, tiny_dataset, capsys):
    rc = main(_base(tiny_dataset, tmp_path, "--model", "yolov8n.yaml", "--epochs", "1", "--lr", "1e30"))
    out = capsys.readouterr().out
    assert rc == 1
    assert "rolling back" in out and "diverged at epoch 1, step" in out


def test_cuda_oom_ends_with_advice_and_a_resumable_checkpoint(tmp_path, tiny_dataset, capsys, monkeypatch):
    """A real CUDA OOM cannot happen on this CPU machine: the training step raises the same exception type."""
    from src.training import trainer as trainer_mod

    original = trainer_mod.QATTrainer._train_epoch
    calls = {"n": 0}

    def oom_in_second_epoch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *a, **k)

    monkeypatch.setattr(trainer_mod.QATTrainer, "_train_epoch", oom_in_second_epoch)
    rc = main(_base(tiny_dataset, tmp_path, "--model", "yolov8n.yaml", "--epochs", "2"))
    out = capsys.readouterr().out
    assert rc == 1
    assert "out of memory" in out.lower() and "--batch-size" in out and "--img-size" in out and "--resume" in out
    assert torch.load(tmp_path / "run" / "weights" / "last.pt", weights_only=True)["train_state"]["epoch"] == 1


# --------------------------------------------------------------------------------------------------- nothing lost
_WRITER = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from src.training.checkpoint import atomic_save
big = {{"w": torch.randn(32, 1024, 1024)}}  # 128 MiB: slow enough to be killed mid-write
while True:
    atomic_save(big, {path!r})
"""


def test_killed_writer_leaves_previous_checkpoint_loadable(tmp_path):
    from src.training.checkpoint import atomic_save

    path = tmp_path / "last.pt"
    atomic_save({"epoch": 7}, path)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(repo=str(REPO), path=str(path))])
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob(".last.pt.*.tmp")) and time.time() < deadline:
            time.sleep(0.01)
        assert list(tmp_path.glob(".last.pt.*.tmp")), "writer never started writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    state = torch.load(path, weights_only=True)  # either the old or a complete new one, never a torn file
    assert state == {"epoch": 7} or tuple(state["w"].shape) == (32, 1024, 1024)


def test_same_command_same_seed_gives_identical_metrics(tmp_path, tiny_dataset):
    outs = []
    for i in range(2):
        args = _base(tiny_dataset, tmp_path / f"r{i}", "--model", "yolov8n.yaml", "--epochs", "1", "--eval")
        assert main(args) == 0
        outs.append((tmp_path / f"r{i}" / "run" / "metrics.json").read_text())
    assert outs[0] == outs[1]
    assert json.loads(outs[0])["qat"]
