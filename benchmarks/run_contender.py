#!/usr/bin/env python
"""Run one contender for one seed (compare.py starts this in its own process) and write <out>/result.json.

    python benchmarks/run_contender.py <spec.json>

The spec names the contender, seed, start model, data, epochs, image size, batch, lr, workers, device and the output
directory. Ours runs through train_qat.py's own entry point; Ultralytics' contenders through its Python API with the
same recipe (optimizer, lr, momentum, weight decay, warm-up, nominal batch = batch) read from our default config.
Whatever happens, result.json is written: ``status`` ok, failed (with the error) or skipped (a capability of ours that
is not available yet).
"""

from __future__ import annotations

import glob
import json
import logging
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.env import prepare_environment  # noqa: E402

DEFAULT_CONFIG = ROOT / "configs" / "qat_config.yaml"
NOT_IMPLEMENTED_MARK = "not implemented yet"


class Unavailable(Exception):
    """The contender needs a capability this version does not have (recorded as skipped, not failed)."""


class StepTimer:
    """Times training steps from outside any trainer: a global optimizer step hook stamps every optimizer step.

    The median gap between consecutive steps is the time of one training step (data, forward, loss, backward,
    optimizer, EMA); the few gaps that span an epoch end (validation) fall outside the median.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._handle = None

    def install(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: self.stamps.append(
            time.perf_counter()))

    def summary(self) -> tuple[float | None, int]:
        """(median seconds per step or None, number of optimizer steps)."""
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return (statistics.median(gaps) if gaps else None), len(self.stamps)


class _ErrorLog(logging.Handler):
    """Keeps the CLI's error lines: train_qat.py reports failures through its logger and an exit status."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# --------------------------------------------------------------------------------------------------------------------
def run_ours(c, spec: dict, out: Path) -> dict:
    """train_qat.py with --eval --export; the OpenVINO IR it exports is measured afterwards."""
    from src.cli import main as cli_main

    save, export_dir = out / "run", out / "export"
    argv = ["--model", spec["model"], "--data", spec["data"], "--epochs", str(spec["epochs"]),
            "--img-size", str(spec["imgsz"]), "--batch-size", str(spec["batch"]), "--lr", str(spec["lr"]),
            "--seed", str(spec["seed"]), "--device", spec["device"], "--workers", str(spec["workers"]),
            "--save-dir", str(save), "--exist-ok", "--log-dir", str(out / "tensorboard"), "--eval", "--export",
            "--export-dir", str(export_dir), *c.cli]
    errors = _ErrorLog()
    logger = logging.getLogger("yolov8_qat")
    logger.addHandler(errors)
    try:
        rc = cli_main(argv)
    finally:
        logger.removeHandler(errors)
    if rc != 0:
        message = " ".join(errors.lines) or f"train_qat.py exited with status {rc}"
        if NOT_IMPLEMENTED_MARK in message:
            raise Unavailable(message)
        raise RuntimeError(message)
    metrics = json.loads((save / "metrics.json").read_text())
    stage = next(k for k in metrics if k != "fp32")
    xml = sorted((export_dir / "openvino").glob("*.xml"))
    if not xml:
        raise RuntimeError(f"train_qat.py --export wrote no OpenVINO IR under {export_dir / 'openvino'}")
    return {"map50": metrics[stage]["map50"], "map50_95": metrics[stage]["map50_95"],
            "fp32_map50_95": metrics.get("fp32", {}).get("map50_95"), "export_path": str(xml[0]),
            "command": "python train_qat.py " + " ".join(argv)}


def recipe(spec: dict, config: Path = DEFAULT_CONFIG) -> dict:
    """Ultralytics train arguments with our default config's recipe, so every contender trains the same way.

    optimizer is named (Ultralytics' optimizer=auto ignores lr0); nbs = batch (our nominal_batch_size default) so a
    small set is not left a few optimizer steps per epoch.
    """
    from src.config import load_config

    tp = load_config(str(config)).train_params
    return dict(data=spec["data"], epochs=spec["epochs"], imgsz=spec["imgsz"], batch=spec["batch"],
                workers=spec["workers"], device=spec["device"], seed=spec["seed"], deterministic=True,
                optimizer=tp.optimizer, lr0=spec["lr"], lrf=0.01, cos_lr=tp.lr_scheduler == "cosine",
                momentum=tp.momentum, weight_decay=tp.weight_decay, warmup_epochs=tp.warmup_epochs,
                nbs=tp.nominal_batch_size or spec["batch"], amp=tp.amp, plots=False, verbose=False)


NNCF_NOTE = "NNCF quantizes the OpenVINO graph: there is no PyTorch model to evaluate (torch mAP empty)"


def ir_in(ov_dir) -> Path:
    """The IR (.xml) of an OpenVINO model directory Ultralytics' exporter wrote."""
    return Path(sorted(glob.glob(str(Path(ov_dir) / "*.xml")))[0])


def _start_copy(spec: dict, out: Path) -> Path:
    """A private copy of the start model: Ultralytics writes exports beside the .pt it loads."""
    start = out / "start.pt"
    shutil.copy2(spec["model"], start)
    return start


def _evaluate(model, spec: dict) -> dict:
    from src.training.evaluate import evaluate

    device = spec["device"]
    device = f"cuda:{device}" if str(device).isdigit() else device  # Ultralytics' "0" is torch's "cuda:0"
    return evaluate(model, spec["data"], imgsz=spec["imgsz"], batch=spec["batch"], device=device)


def run_ultralytics_train(c, spec: dict, out: Path) -> dict:
    """YOLO(fp32).train with the shared recipe (+ quantize=8: ModelOpt QAT, + distill_model: KD from the FP32 model)."""
    from ultralytics import YOLO

    start = _start_copy(spec, out)
    args = recipe(spec)
    if c.ultralytics.get("quantize"):
        args["quantize"] = c.ultralytics["quantize"]
    if c.ultralytics.get("distill"):
        args["distill_model"] = str(start)
    model = YOLO(str(start))
    model.train(**args, project=str(out), name="train", exist_ok=True)
    last = Path(model.trainer.last)
    trained = YOLO(str(last))
    m = _evaluate(trained.model, spec)
    export_dir = out / "export"
    if c.ultralytics.get("quantize"):
        # a ModelOpt QAT model exports only to ONNX (Q/DQ) or TensorRT; OpenVINO reads the Q/DQ ONNX
        from src.export.metadata import read_metadata
        from src.export.openvino_export import export_openvino

        onnx_path = Path(trained.export(format="onnx", imgsz=spec["imgsz"]))
        xml = export_openvino(onnx_path, export_dir / f"{last.stem}_openvino_model", last.stem,
                              read_metadata(onnx_path))
    else:
        ov_dir = trained.export(format="openvino", imgsz=spec["imgsz"])
        xml = ir_in(ov_dir)
    return {"map50": m["map50"], "map50_95": m["map50_95"], "export_path": str(xml),
            "command": f"YOLO({str(start)!r}).train(**{args!r})"}


def run_ultralytics_ptq(c, spec: dict, out: Path) -> dict:
    """YOLO(fp32).export(format="openvino", quantize=8): NNCF PTQ, calibrated on the train split as ours is."""
    from ultralytics import YOLO

    start = _start_copy(spec, out)
    args = dict(format="openvino", quantize=8, data=spec["data"], split="train", imgsz=spec["imgsz"], batch=1)
    ov_dir = YOLO(str(start)).export(**args)
    xml = ir_in(ov_dir)
    return {"map50": None, "map50_95": None, "export_path": str(xml),
            "note": NNCF_NOTE,
            "command": f"YOLO({str(start)!r}).export(**{args!r})"}


def run_fp32_start(c, spec: dict, out: Path) -> dict:
    """The start model evaluated as it is, and exported to an FP32 OpenVINO IR by Ultralytics."""
    from ultralytics import YOLO

    start = _start_copy(spec, out)
    yolo = YOLO(str(start))
    m = _evaluate(yolo.model, spec)
    ov_dir = yolo.export(format="openvino", imgsz=spec["imgsz"])
    xml = ir_in(ov_dir)
    return {"map50": m["map50"], "map50_95": m["map50_95"], "export_path": str(xml),
            "command": f"YOLO({str(start)!r}).export(format='openvino', imgsz={spec['imgsz']})"}


def run_nncf_accuracy_control(c, spec: dict, out: Path) -> dict:
    """nncf.quantize_with_accuracy_control with a 0.2-point mAP50-95 budget (benchmarks/nncf_accuracy_control.py)."""
    from benchmarks.nncf_accuracy_control import quantize_with_accuracy_control

    start = _start_copy(spec, out)
    xml, search = quantize_with_accuracy_control(start, spec["data"], spec["imgsz"], max_drop_points=0.2)
    return {"map50": None, "map50_95": None, "export_path": str(xml), "search": search,
            "note": NNCF_NOTE,
            "command": f"benchmarks/nncf_accuracy_control.py quantize_with_accuracy_control({str(start)!r}, "
                       f"{spec['data']!r}, {spec['imgsz']}, max_drop_points=0.2)"}


def run_aimet(c, spec: dict, out: Path) -> dict:
    """AIMET QuantSim of the start model: AdaRound PTQ or range-learning QAT (benchmarks/aimet_contenders.py)."""
    from benchmarks import aimet_contenders as aimet

    try:
        import aimet_torch  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"aimet-torch is not installed ({e}); `make bench` installs it") from None
    start = _start_copy(spec, out)
    opts = c.aimet
    sim = aimet.quantsim(start, spec["data"], spec["imgsz"], param_bw=opts["param_bw"],
                         adaround=opts.get("adaround", False), iterations=spec.get("adaround_iterations", 1000),
                         qat=opts.get("qat", False), seed=spec["seed"], work=out / "aimet")
    command = (f"aimet_contenders.quantsim({str(start)!r}, param_bw={opts['param_bw']}, "
               f"adaround={opts.get('adaround', False)}, qat={opts.get('qat', False)})")
    if opts.get("qat"):
        args = recipe(spec)
        aimet.train_qat(sim, spec, args, out)
        command += f" + DetectionTrainer(**{args!r})"
    m = _evaluate(aimet.Unfusable(sim.model), spec)
    xml = aimet.export_openvino_ir(sim, spec["imgsz"], out / "export")
    return {"map50": m["map50"], "map50_95": m["map50_95"], "export_path": str(xml), "command": command}


RUNNERS = {"ours": run_ours, "aimet": run_aimet, "ultralytics_train": run_ultralytics_train,
           "ultralytics_ptq": run_ultralytics_ptq, "nncf_accuracy_control": run_nncf_accuracy_control,
           "fp32_start": run_fp32_start}


def measure_export(xml: Path, spec: dict) -> dict:
    """mAP of the IR through Ultralytics' validator, INT8 coverage of the compiled graph, size (latency: later)."""
    from src.export.openvino_export import runtime_int8_report
    from src.export.validate import validate

    v = validate([str(xml)], spec["data"], imgsz=spec["imgsz"], device=spec["device"], runs=0)[0]
    rep = runtime_int8_report(xml)
    return {"export_map50": v.map50, "export_map50_95": v.map50_95, "int8_convs": len(rep.int8),
            "float_convs": len(rep.float_fallbacks) + len(rep.unquantized), "float_fallbacks": rep.float_fallbacks,
            "size_mb": v.size_mb, "export_check": {"passed": v.passed, "reasons": v.reasons}}


def run(spec: dict) -> dict:
    """Run the contender of ``spec``; never raises (failures become the result's status and error)."""
    from benchmarks.contenders import BY_NAME

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    result = {"name": spec["name"], "seed": spec["seed"], "status": "ok", "error": None, "settings": spec["settings"]}
    timer = StepTimer()
    t0 = time.time()
    try:
        prepare_environment()
        timer.install()
        c = BY_NAME[spec["name"]]
        result.update(RUNNERS[c.family](c, spec, out))
        result.update(measure_export(Path(result["export_path"]), spec))
    except Unavailable as e:
        result["status"], result["error"] = "skipped", str(e)
    except Exception as e:  # recorded with its message, never dropped
        traceback.print_exc()
        result["status"], result["error"] = "failed", f"{type(e).__name__}: {e}"
    result["wall_s"] = time.time() - t0
    step, result["steps"] = timer.summary()
    c = BY_NAME.get(spec["name"])
    result["step_time_s"] = step if c is not None and c.trains and result["status"] == "ok" else None
    return result


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import read_spec, write_json

    spec = read_spec(sys.argv[1:] if argv is None else argv, __doc__)
    if spec is None:
        return 2
    result = run(spec)
    write_json(result, Path(spec["out"]) / "result.json")
    print(f"{spec['name']} seed {spec['seed']}: {result['status']}" + (f" ({result['error']})" if result["error"]
                                                                       else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
