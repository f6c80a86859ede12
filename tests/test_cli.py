"""train_qat.py end to end on a tiny synthetic set: flags, errors, outputs, offline behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SPEC_FLAGS = [
    "--model", "--data", "--config", "--qconfig", "--fuse", "--keep-detection-head", "--epochs", "--batch-size",
    "--img-size", "--lr", "--device", "--save-dir", "--output", "--log-dir", "--distillation", "--teacher-model",
    "--mixed-precision", "--analyze", "--seed", "--eval", "--export", "--export-dir",
]
EXTRA_FLAGS = ["--no-fuse", "--validate-exports", "--log-level", "--resume", "--exist-ok", "--skip-detection-head"]


def _tiny_args(tiny_dataset, tmp_path, *extra):
    return [
        "--model", "yolov8n.yaml", "--data", str(tiny_dataset), "--img-size", "64", "--batch-size", "4",
        "--device", "cpu", "--workers", "0", "--save-dir", str(tmp_path / "qat"), "--log-dir", str(tmp_path / "logs"),
        *extra,
    ]


def test_help_lists_every_flag_with_defaults():
    text = build_parser().format_help()
    for flag in SPEC_FLAGS + EXTRA_FLAGS:
        assert flag in text, flag
    for default in ("configs/qat_config.yaml", "models/checkpoints/qat", "quantized_model.pt", "logs/qat",
                    "models/exported", "coco.yaml"):
        assert default in text


def test_missing_pretrained_model_fails_fast_saying_where_it_looked(tmp_path, monkeypatch, socket_guard, capsys):
    monkeypatch.chdir(tmp_path)
    t = time.time()
    # yolov8x.pt: make install fetches only yolov8n.pt into models/pretrained/
    rc = main(["--model", "yolov8x.pt", "--data", "coco.yaml", "--config", str(REPO / "configs/qat_config.yaml")])
    assert time.time() - t < 5
    assert rc == 1
    out = capsys.readouterr().out
    assert "yolov8x.pt" in out and "models/pretrained" in out and "Traceback" not in out


def test_config_typo_suggests_the_key(tmp_path, tiny_dataset, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantization:\n  weight:\n    observr: minmax\n")
    rc = main(_tiny_args(tiny_dataset, tmp_path, "--config", str(bad), "--epochs", "0"))
    assert rc == 1
    out = capsys.readouterr().out
    assert "observr" in out and "observer" in out


def test_unavailable_device_is_an_error(tiny_dataset, tmp_path, capsys):
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    args = _tiny_args(tiny_dataset, tmp_path, "--epochs", "0")
    args[args.index("--device") + 1] = "cuda:7"
    rc = main(args)
    assert rc == 1
    assert "cuda:7" in capsys.readouterr().out


def test_class_count_mismatch_says_to_finetune_in_fp32_first(tmp_path, tiny_dataset, capsys):
    from ultralytics.nn.tasks import DetectionModel

    ckpt = tmp_path / "m80.pt"
    m = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    torch.save({"model": m, "train_args": {}}, ckpt)
    rc = main(_tiny_args(tiny_dataset, tmp_path, "--epochs", "0")[2:] + ["--model", str(ckpt)])
    assert rc == 1
    out = capsys.readouterr().out
    assert "80 classes" in out and "3" in out and "yolo train" in out


def test_train_eval_export_offline_writes_every_output(tiny_dataset, tmp_path, socket_guard):
    rc = main(_tiny_args(tiny_dataset, tmp_path, "--epochs", "1", "--eval", "--export", "--export-dir",
                         str(tmp_path / "exported")))
    assert rc == 0
    exported = tmp_path / "exported"
    for f in ("onnx/quantized_model.onnx", "openvino/quantized_model.xml", "openvino/quantized_model.bin",
              "openvino/metadata.yaml"):
        assert (exported / f).exists(), f
    run = tmp_path / "qat"
    for f in ("quantized_model.pt", "weights/last.pt", "weights/best.pt", "results.csv", "metrics.json",
              "config.yaml", "placement.txt", "placement.json"):
        assert (run / f).exists(), f
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {"fp32", "qat"} and {"map50", "map50_95", "per_class"} <= set(metrics["qat"])
    assert list((tmp_path / "logs" / "qat").glob("events.out.tfevents.*"))  # one sub-folder per run
    ckpt = torch.load(run / "quantized_model.pt", weights_only=True)  # no pickled classes
    assert ckpt["stage"] == "qat" and "state_dict" in ckpt
    header = (run / "results.csv").read_text().splitlines()[0]
    assert "train/box_loss" in header and "metrics/mAP50-95(B)" in header

    # a second run into the same --save-dir goes to a numbered sibling
    rc = main(_tiny_args(tiny_dataset, tmp_path, "--epochs", "0"))
    assert rc == 0 and (tmp_path / "qat2" / "quantized_model.pt").exists()
    assert (run / "quantized_model.pt").stat().st_mtime < (tmp_path / "qat2" / "quantized_model.pt").stat().st_mtime

    # eval-only on the QAT checkpoint writes metrics beside it and reproduces the numbers
    rc = main(["--model", str(run / "quantized_model.pt"), "--data", str(tiny_dataset), "--eval", "--img-size", "64",
               "--batch-size", "4", "--device", "cpu"])
    assert rc == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["qat"] == metrics["qat"]


def test_ptq_only_with_zero_epochs(tiny_dataset, tmp_path):
    rc = main(_tiny_args(tiny_dataset, tmp_path, "--epochs", "0", "--eval"))
    assert rc == 0
    metrics = json.loads((tmp_path / "qat" / "metrics.json").read_text())
    assert set(metrics) == {"fp32", "ptq"}
    assert not (tmp_path / "qat" / "weights").exists()


def test_script_entry_point_runs_help():
    r = subprocess.run([sys.executable, "train_qat.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--qconfig" in r.stdout


def test_qat_checkpoint_keeps_its_image_size_for_eval_and_export(tiny_dataset, tmp_path):
    rc = main(_tiny_args(tiny_dataset, tmp_path, "--epochs", "0"))
    assert rc == 0
    ckpt = tmp_path / "qat" / "quantized_model.pt"
    rc = main(["--model", str(ckpt), "--export", "--export-dir", str(tmp_path / "exp"), "--device", "cpu"])
    assert rc == 0
    import onnx

    shape = onnx.load(str(tmp_path / "exp" / "onnx" / "quantized_model.onnx")).graph.input[0].type.tensor_type.shape
    assert [d.dim_value for d in shape.dim] == [1, 3, 64, 64]  # not the config default 640
