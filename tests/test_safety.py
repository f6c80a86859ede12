"""Safe and self-explanatory on bad input (issue 15): one section, with its own parametrized table, per numbered item.

Runs train_qat.py in-process (``src.cli.main`` with an argv list) on the tiny synthetic set. Items:
  1. checkpoint safety: no code from a checkpoint file runs unless the user passes ``--trust-checkpoint``;
  2. self-contained QAT checkpoints: ``--eval`` without the FP32 source file;
  3. exit codes and one clear line (validate_exports: 0 ok, 1 a gate failed, 2 bad input);
  4. early validation, errors attributed to the flag;
  5. validate_exports without a reference mAP;
  6. housekeeping.
"""

from __future__ import annotations

import copy
import datetime
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from src.cli import main
from src.data.resolve import load_fp32_model, resolve_model_path
from src.models.yolov8_qat import FP32_METRICS_KEY

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "pretrained" / "yolov8n_shapes.pt"


def _args(tiny_dataset: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--data", str(tiny_dataset), "--img-size", "64", "--batch-size", "4", "--device", "cpu", "--workers", "0",
            "--save-dir", str(tmp_path / "qat"), "--log-dir", str(tmp_path / "logs"), *extra]


@pytest.fixture(scope="module")
def ultralytics_trained(tiny_dataset, tmp_path_factory) -> Path:
    """weights/ of one epoch of Ultralytics' own trainer (yolov8n, 64 px) on the tiny set: genuine checkpoints."""
    from ultralytics import YOLO

    project = tmp_path_factory.mktemp("ultralytics_train")
    YOLO("yolov8n.yaml").train(data=str(tiny_dataset), epochs=1, imgsz=64, batch=4, workers=0, device="cpu",
                               val=False, plots=False, amp=False, project=str(project), name="run", exist_ok=True,
                               verbose=False, seed=0)
    return project / "run" / "weights"


@pytest.fixture(scope="module")
def ptq_run(ultralytics_trained, tiny_dataset, tmp_path_factory) -> dict:
    """A PTQ run with --eval from a copy of the trainer's best.pt: the QAT checkpoint and the run's metrics."""
    root = tmp_path_factory.mktemp("ptq_run")
    source = root / "fp32.pt"
    shutil.copy(ultralytics_trained / "best.pt", source)
    assert main(["--model", str(source), "--epochs", "0", "--eval", *_args(tiny_dataset, root)]) == 0
    run = root / "qat"
    return {"source": source, "checkpoint": run / "quantized_model.pt",
            "metrics": json.loads((run / "metrics.json").read_text())}


def _logged_row(out: str, label: str) -> tuple[float, float]:
    """(mAP50, mAP50-95) of ``label``'s row in evaluate's table."""
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == [label] and len(line.split()) == 3)
    return float(row[1]), float(row[2])


# ====================================================================================================================
# Item 1: no code execution from checkpoints (FP32 checkpoints load restricted; --trust-checkpoint is the way out)
# ====================================================================================================================
class _TouchOnLoad:
    """Unpickling this creates ``marker`` (a file under tmp_path): proof of whether a load ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _raw_pickle(path: Path, marker: Path) -> None:
    with path.open("wb") as f:
        pickle.dump({"model": _TouchOnLoad(marker), "train_args": {}}, f)


def _torch_zip(path: Path, marker: Path) -> None:
    torch.save({"model": _TouchOnLoad(marker), "train_args": {}}, path)


MALICIOUS_FORMATS = {"raw pickle": _raw_pickle, "torch.save zip": _torch_zip}


def _as_model(evil: Path, tiny_dataset: Path, tmp_path: Path, ptq_run: dict) -> list[str]:
    return ["--model", str(evil), "--epochs", "0"]


def _as_teacher(evil: Path, tiny_dataset: Path, tmp_path: Path, ptq_run: dict) -> list[str]:
    return ["--model", str(ptq_run["source"]), "--epochs", "1", "--distillation", "--teacher-model", str(evil)]


def _as_fp32_source(evil: Path, tiny_dataset: Path, tmp_path: Path, ptq_run: dict) -> list[str]:
    ckpt = torch.load(ptq_run["checkpoint"], weights_only=True)
    ckpt["fp32_source"] = str(evil)  # a QAT checkpoint (safe itself) naming a malicious file
    qat = tmp_path / "named" / "quantized_model.pt"
    qat.parent.mkdir()
    torch.save(ckpt, qat)
    return ["--model", str(qat), "--eval"]


# how the malicious file reaches the loader: argv for train_qat.py (before the common tiny-run flags)
ENTRY_POINTS = {"--model": _as_model, "--teacher-model": _as_teacher, "fp32_source": _as_fp32_source}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("fmt", MALICIOUS_FORMATS)
def test_malicious_checkpoint_is_refused_without_running_it(fmt, entry, ptq_run, tiny_dataset, tmp_path, capsys):
    marker, evil = tmp_path / "code_ran", tmp_path / "evil.pt"
    MALICIOUS_FORMATS[fmt](evil, marker)
    rc = main(ENTRY_POINTS[entry](evil, tiny_dataset, tmp_path, ptq_run) + _args(tiny_dataset, tmp_path))
    out = capsys.readouterr().out
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert rc != 0
    assert f"{evil} was not loaded" in out and "pathlib.Path" in out  # the file and what it would import
    assert "--trust-checkpoint" in out and "Traceback" not in out


@pytest.mark.parametrize("fmt", MALICIOUS_FORMATS)
def test_trust_checkpoint_unpickles_fully(fmt, tiny_dataset, tmp_path, capsys):
    marker, evil = tmp_path / "code_ran", tmp_path / "evil.pt"
    MALICIOUS_FORMATS[fmt](evil, marker)
    rc = main(["--model", str(evil), "--epochs", "0", "--trust-checkpoint", *_args(tiny_dataset, tmp_path)])
    assert marker.exists()  # the user vouched for the file: the full unpickling ran its payload
    assert rc != 0 and "could not be loaded as an Ultralytics checkpoint" in capsys.readouterr().out  # no model in it


def _eight_x_dict(tmp_path: Path, ultralytics_trained: Path) -> Path:
    """An 8.x-style dict with numpy scalars and a date, as older trainers and release assets hold."""
    model = torch.load(ultralytics_trained / "best.pt", weights_only=False)["model"]
    path = tmp_path / "eight_x.pt"
    torch.save({"date": datetime.datetime(2023, 1, 10).isoformat(), "version": "8.0.0", "epoch": -1,
                "model": copy.deepcopy(model), "ema": None, "train_args": {"imgsz": 64},
                "train_metrics": {"metrics/mAP50(B)": np.float64(0.5)}, "best_fitness": np.float64(0.25)}, path)
    return path


GENUINE = {
    "shipped yolov8n_shapes.pt": lambda tmp_path, trained: SHIPPED,
    "ultralytics trainer best.pt": lambda tmp_path, trained: trained / "best.pt",
    "ultralytics trainer last.pt": lambda tmp_path, trained: trained / "last.pt",
    "8.x dict with numpy scalars": _eight_x_dict,
}


@pytest.mark.parametrize("name", GENUINE)
def test_genuine_ultralytics_checkpoint_loads_restricted(name, ultralytics_trained, tmp_path):
    path = GENUINE[name](tmp_path, ultralytics_trained)
    restricted = load_fp32_model(resolve_model_path(str(path)))
    full = load_fp32_model(resolve_model_path(str(path)), trusted=True)
    assert type(restricted).__name__ == "DetectionModel" and restricted.args == full.args
    ours, theirs = restricted.state_dict(), full.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# ====================================================================================================================
# Item 2: QAT checkpoints are self-contained (the FP32 row survives the FP32 source file)
# ====================================================================================================================
def test_run_stores_the_fp32_metrics_in_its_checkpoint(ptq_run):
    stored = torch.load(ptq_run["checkpoint"], weights_only=True)[FP32_METRICS_KEY]
    fp32 = ptq_run["metrics"]["fp32"]
    assert (stored["map50"], stored["map50_95"], stored["imgsz"]) == (fp32["map50"], fp32["map50_95"], 64)


def _delete_source(ckpt: dict, source: Path) -> None:
    source.unlink()


def _delete_source_old_checkpoint(ckpt: dict, source: Path) -> None:
    source.unlink()
    del ckpt[FP32_METRICS_KEY]  # written before checkpoints stored the FP32 mAP


def _replace_source(ckpt: dict, source: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    torch.save({"model": DetectionModel("yolov8n.yaml", nc=5, verbose=False), "train_args": {}}, source)


def _keep_source(ckpt: dict, source: Path) -> None:
    pass


# what happened to the FP32 source -> (where the FP32 row comes from, the note in the log)
SOURCE_CASES = {
    "deleted": (_delete_source, "stored", "stored in the QAT checkpoint (measured at 64 px"),
    "deleted, old checkpoint": (_delete_source_old_checkpoint, None, "fp32: skipped"),
    "replaced by another model": (_replace_source, "stored", "no longer the FP32 model"),
    "at hand": (_keep_source, "evaluated", None),
}


@pytest.mark.parametrize("case", SOURCE_CASES)
def test_qat_checkpoint_evaluates_whatever_became_of_its_fp32_source(case, ptq_run, tiny_dataset, tmp_path, capsys):
    change, row, note = SOURCE_CASES[case]
    source = tmp_path / "fp32.pt"
    shutil.copy(ptq_run["source"], source)
    ckpt = torch.load(ptq_run["checkpoint"], weights_only=True)
    ckpt["fp32_source"] = str(source)
    change(ckpt, source)
    moved = tmp_path / "moved" / "quantized_model.pt"  # e.g. copied to another machine
    moved.parent.mkdir()
    torch.save(ckpt, moved)
    capsys.readouterr()
    assert main(["--model", str(moved), "--eval", *_args(tiny_dataset, tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "models/pretrained" not in out and "GitHub release" not in out
    if note:
        assert note in out
    expected = ptq_run["metrics"]
    assert _logged_row(out, "ptq") == pytest.approx((expected["ptq"]["map50"], expected["ptq"]["map50_95"]), abs=1e-4)
    if row is None:
        assert not any(line.split()[:1] == ["fp32"] for line in out.splitlines())
    else:  # stored or evaluated again: the numbers of the run that made the checkpoint (same model, data, size)
        fp32 = expected["fp32"]
        assert _logged_row(out, "fp32") == pytest.approx((fp32["map50"], fp32["map50_95"]), abs=1e-4)


# ====================================================================================================================
# Item 3: exit codes a CI gate can trust; one clear line, no traceback (validate_exports: 0 ok, 1 gate, 2 bad input)
# ====================================================================================================================
def _validate_corrupt_onnx(tmp_path: Path, data: Path) -> tuple[list[str], Path]:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage, not a protobuf" * 40)
    return ["--model", str(bad), "--data", str(data)], bad


def _validate_xml_without_bin(tmp_path: Path, data: Path) -> tuple[list[str], Path]:
    xml = tmp_path / "openvino" / "quantized_model.xml"
    xml.parent.mkdir()
    xml.write_text("<net name='m' version='11'><layers/></net>\n")  # its .bin was not copied
    return ["--model", str(xml), "--data", str(data)], xml.with_suffix(".bin")


VALIDATE_BAD_INPUT = {"corrupt .onnx": _validate_corrupt_onnx, ".xml without its .bin": _validate_xml_without_bin}


@pytest.mark.parametrize("case", VALIDATE_BAD_INPUT)
def test_validate_exports_bad_input_exits_2_naming_the_users_path(case, tiny_dataset, tmp_path, capsys):
    from src.export.validate import main as validate_main

    argv, named = VALIDATE_BAD_INPUT[case](tmp_path, tiny_dataset)
    rc = validate_main([*argv, "--runs", "0"])
    out = capsys.readouterr()
    text = out.out + out.err
    errors = [line for line in text.splitlines() if line.startswith("ERROR")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in text, text[-2000:]
    assert str(named) in errors[0] and "/tmp/ov_view" not in errors[0]


def _save_dir_under_a_file(tmp_path: Path) -> tuple[list[str], list[str]]:
    (tmp_path / "a_file").write_text("x")  # root ignores permission bits: a file in the path cannot be written past
    return ["--model", "yolov8n.yaml", "--epochs", "0", "--save-dir", str(tmp_path / "a_file" / "run")], \
        ["--save-dir", "a_file/run"]


def _log_dir_under_a_file(tmp_path: Path) -> tuple[list[str], list[str]]:
    (tmp_path / "a_file").write_text("x")
    return ["--model", "yolov8n.yaml", "--epochs", "0", "--log-dir", str(tmp_path / "a_file" / "tb")], ["--log-dir"]


def _export_dir_under_a_file(tmp_path: Path) -> tuple[list[str], list[str]]:
    (tmp_path / "a_file").write_text("x")
    return ["--model", "yolov8n.yaml", "--epochs", "0", "--export", "--export-dir", str(tmp_path / "a_file" / "x")], \
        ["--export-dir"]


def _truncated_last_pt(tmp_path: Path) -> tuple[list[str], list[str]]:
    last = tmp_path / "stopped" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"train_state": {"epoch": 0}, "weights": torch.zeros(1000)}, last)
    last.write_bytes(last.read_bytes()[:700])
    return ["--resume", "--save-dir", str(last.parents[1])], [str(last), "cannot be read as a checkpoint"]


TRAIN_BAD_OUTPUTS = {"--save-dir under a file": _save_dir_under_a_file, "--log-dir under a file": _log_dir_under_a_file,
                     "--export-dir under a file": _export_dir_under_a_file,
                     "truncated last.pt on --resume": _truncated_last_pt}


@pytest.mark.parametrize("case", TRAIN_BAD_OUTPUTS)
def test_train_qat_bad_output_or_resume_is_one_line_before_any_work(case, tiny_dataset, tmp_path, capsys):
    extra, needles = TRAIN_BAD_OUTPUTS[case](tmp_path)
    rc = main(_args(tiny_dataset, tmp_path) + extra)
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in out, out[-2000:]
    assert all(n in errors[0] for n in needles), errors[0]
    assert "Prepared model" not in out  # refused before any model work


# ====================================================================================================================
# Item 4: validated early (before models load) and attributed to the flag, not to configs/qat_config.yaml
# ====================================================================================================================
# argv -> (words the one ERROR line holds, words it must not hold)
EARLY = {
    "--lr nan": (["--lr", "nan"], ["--lr nan", "finite", "train_params.lr"]),
    "--lr inf": (["--lr", "inf"], ["--lr inf", "finite"]),
    "--lr 0": (["--lr", "0"], ["--lr 0.0", "out of range"]),
    "--lr -1": (["--lr", "-1"], ["--lr -1.0", "out of range"]),
    "--qconfig": (["--qconfig", "bogus"], ["--qconfig bogus", "unknown qconfig preset"]),
    "--img-size": (["--img-size", "33"], ["--img-size 33", "multiple of the model stride 32"]),
    "--epochs": (["--epochs", "-1"], ["--epochs -1", "out of range"]),
    "missing teacher": (["--epochs", "1", "--distillation", "--teacher-model", "no_such_teacher.pt"],
                        ["teacher", "no_such_teacher.pt", "not found"]),
}


@pytest.mark.parametrize("case", EARLY)
def test_bad_flag_is_reported_against_the_flag_before_models_load(case, tiny_dataset, tmp_path, capsys):
    extra, needles = EARLY[case]
    rc = main(_args(tiny_dataset, tmp_path, "--model", "yolov8n.yaml", "--epochs", "0") + extra)
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in out, out[-2000:]
    assert all(n in errors[0] for n in needles), errors[0]
    assert "qat_config.yaml" not in errors[0]
    assert "Prepared model" not in out and "Calibrat" not in out


def test_empty_config_file_is_noticed(tiny_dataset, tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert main(_args(tiny_dataset, tmp_path, "--model", "yolov8n.yaml", "--config", str(empty), "--epochs", "-1")) == 1
    out = capsys.readouterr().out
    assert f"config file {empty} is empty: using the built-in defaults (layer_configs is empty" in out
    assert "ERROR: --epochs -1" in out  # and a flag's error still names the flag, not the empty file


# ====================================================================================================================
# Item 5: validate_exports without a reference says the accuracy gate did not run; --require-reference fails it
# ====================================================================================================================
@pytest.fixture(scope="module")
def unreferenced_onnx(tmp_path_factory) -> dict:
    """An ONNX export with no reference mAP in its metadata (an --export run without data), and its checkpoint."""
    from helpers import calibrated_qat_model

    from src.config import load_config
    from src.export.pipeline import export_all
    from src.models.yolov8_qat import qat_checkpoint

    model, _ = calibrated_qat_model(64)
    cfg = load_config("configs/qat_config.yaml", {"export.formats": ["onnx"]})
    root = tmp_path_factory.mktemp("unreferenced")
    onnx_path = export_all(model, cfg, root / "exported", imgsz=64)["onnx"][0]
    ckpt = root / "quantized_model.pt"
    torch.save(qat_checkpoint(model, cfg), ckpt)
    return {"onnx": onnx_path, "ckpt": ckpt}


# extra flags -> (exit code, accuracy_gate in the JSON, the table's ref column, a line the output holds)
REFERENCE_CASES = {
    "no reference": ([], 0, "not run: no reference", "n/a", "NOTE {onnx}: accuracy gate not run"),
    "--require-reference": (["--require-reference"], 1, "not run: no reference", "n/a",
                            "FAIL {onnx}: no reference mAP"),
    "--reference": (["--reference", "{ckpt}"], 0, "passed", None, None),
}


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_accuracy_gate_without_reference_is_reported(case, unreferenced_onnx, tiny_dataset, tmp_path, capsys):
    from src.export.validate import main as validate_main

    flags, code, gate, ref_column, line = REFERENCE_CASES[case]
    flags = [f.format(**unreferenced_onnx) for f in flags]
    out_json = tmp_path / "v.json"
    rc = validate_main(["--model", str(unreferenced_onnx["onnx"]), "--data", str(tiny_dataset), "--runs", "0",
                        "--parity-images", "2", "--json", str(out_json), *flags])
    out = capsys.readouterr().out
    (result,) = json.loads(out_json.read_text())["exports"]
    assert rc == code and result["accuracy_gate"] == gate and result["passed"] is (code == 0)
    row = next(l.split() for l in out.splitlines() if l.startswith("onnx "))
    if ref_column:
        assert row[3] == ref_column and row[4] == ref_column
    else:
        assert float(row[3]) == pytest.approx(result["reference_map50_95"], abs=1e-4)
    if line:
        assert line.format(**unreferenced_onnx) in out


# ====================================================================================================================
# Item 6: housekeeping
# ====================================================================================================================
@pytest.fixture(scope="module")
def housekeeping_run(tiny_dataset, tmp_path_factory) -> dict:
    """One tiny QAT run (1 epoch, --eval --export --analyze) into an --export-dir that already holds another run's
    export; its output, the files it wrote, and the Ultralytics runs folders before and after."""
    import contextlib
    import io

    from ultralytics.utils import ROOT, SETTINGS

    root = tmp_path_factory.mktemp("housekeeping")
    foreign = root / "exported" / "onnx" / "other_run.onnx"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"another run's export")
    # where Ultralytics' validator puts an unnamed save_dir: its runs_dir, or under pytest its tests/tmp/runs
    detect = [Path(SETTINGS["runs_dir"]) / "detect", ROOT.parent / "tests" / "tmp" / "runs" / "detect"]

    def ultralytics_dirs() -> set[Path]:
        return {p for d in detect if d.is_dir() for p in d.iterdir()}

    before = ultralytics_dirs()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(_args(tiny_dataset, root, "--model", "yolov8n.yaml", "--epochs", "1", "--eval", "--export",
                        "--analyze", "--export-dir", str(root / "exported")))
    after = ultralytics_dirs()
    assert rc == 0, out.getvalue()[-3000:]
    return {"root": root, "run": root / "qat", "out": out.getvalue() + err.getvalue(), "foreign": foreign,
            "new_ultralytics_dirs": after - before}


def _mode_0644(r: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    for f in (r["run"] / "quantized_model.pt", r["run"] / "weights" / "last.pt", r["run"] / "weights" / "best.pt"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask == (r["run"] / "metrics.json").stat().st_mode & 0o777, f


def _tensorboard_per_run(r: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    logs = r["root"] / "logs"
    assert list((logs / "qat").glob("events.out.tfevents.*")), "no events in <log-dir>/<run folder name>"
    assert not list(logs.glob("events.out.tfevents.*")), "events written into the shared --log-dir itself"


def _no_empty_ultralytics_folders(r: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    assert not r["new_ultralytics_dirs"]


def _latency_of_this_runs_exports(r: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    timed = {row["path"] for row in json.loads((r["run"] / "analysis" / "report.json").read_text())["latency"]}
    assert timed == {str(r["root"] / "exported" / "onnx" / "quantized_model.onnx"),
                     str(r["root"] / "exported" / "openvino" / "quantized_model.xml")}


def _calibration_bar_and_scan_label(r: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    from src.config import load_config
    from src.data.resolve import resolve_data
    from src.stages.calibrate import TrainingImages

    assert "/8 [" in r["out"] and "/256" not in r["out"]  # 8 training images; qat_params.calibration_images is 256
    images = TrainingImages(load_config(None, {"train_params.img_size": 64}), resolve_data(tiny_dataset),
                            torch.device("cpu"), 32)
    assert len(images) == 8
    assert "train (no augmentation): " in images.loader.dataset.prefix  # the label of Ultralytics' scan lines


def _exported_lines_once(r: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    for path in ("onnx/quantized_model.onnx", "openvino/quantized_model.xml"):
        assert sum(path in line for line in r["out"].splitlines() if "xport" in line) == 1, path


def _garbage_jpeg_reason(r: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    from PIL import UnidentifiedImageError
    from ultralytics.data.utils import check_image

    from src.integrations.ultralytics import report_unreadable_images

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(bytes(range(256)) * 8)
    report_unreadable_images()
    with pytest.raises(UnidentifiedImageError, match="cannot identify image file"):
        check_image(str(garbage))


def _zero_image_error(r: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    from src.config import load_config
    from src.data.resolve import resolve_data
    from src.errors import DataError
    from src.training.data import check_split, hyperparameters

    data = _dataset_copy(tiny_dataset, tmp_path / "noimg")
    for f in (data.parent / "images" / "train").iterdir():
        f.unlink()
    with pytest.raises(DataError) as e:
        check_split(hyperparameters(load_config(None)), resolve_data(data), "train")
    assert "no images found" in str(e.value) and "\x1b" not in str(e.value) and "all 0" not in str(e.value)


def _eval_only_needs_no_train_split_and_honours_save_dir(r: dict, tiny_dataset: Path, tmp_path: Path) -> None:
    data = _dataset_copy(tiny_dataset, tmp_path / "valonly")
    shutil.rmtree(data.parent / "images" / "train")
    shutil.rmtree(data.parent / "labels" / "train")
    training_metrics = (r["run"] / "metrics.json").read_text()
    out_dir = tmp_path / "eval_out"
    assert main(["--model", str(r["run"] / "quantized_model.pt"), "--data", str(data), "--eval", "--device", "cpu",
                 "--workers", "0", "--batch-size", "4", "--save-dir", str(out_dir),
                 "--log-dir", str(tmp_path / "logs")]) == 0
    assert set(json.loads((out_dir / "metrics.json").read_text())) >= {"qat"}
    assert (r["run"] / "metrics.json").read_text() == training_metrics  # the training run's own record is kept


def _dataset_copy(tiny_dataset: Path, dst: Path) -> Path:
    root = Path(tiny_dataset).parent
    shutil.copytree(root, dst)
    for cache in dst.rglob("*.cache"):
        cache.unlink()
    (dst / "data.yaml").write_text((dst / "data.yaml").read_text().replace(str(root), str(dst)))
    return dst / "data.yaml"


HOUSEKEEPING = {
    "checkpoints mode 0644 like other outputs": _mode_0644,
    "TensorBoard: one sub-folder per run": _tensorboard_per_run,
    "no empty Ultralytics runs folders": _no_empty_ultralytics_folders,
    "--analyze times only this run's exports": _latency_of_this_runs_exports,
    "calibration bar total and train scan label": _calibration_bar_and_scan_label,
    "Exported lines print once": _exported_lines_once,
    "garbage JPEG dropped with its own reason": _garbage_jpeg_reason,
    "zero-image error is plain and exact": _zero_image_error,
    "eval-only: no train split, honours --save-dir": _eval_only_needs_no_train_split_and_honours_save_dir,
}


@pytest.mark.parametrize("item", HOUSEKEEPING)
def test_housekeeping(item, housekeeping_run, tiny_dataset, tmp_path):
    HOUSEKEEPING[item](housekeeping_run, tiny_dataset, tmp_path)
