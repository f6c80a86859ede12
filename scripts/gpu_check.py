#!/usr/bin/env python
"""The prepared GPU check: every number the CPU cannot give, measured in one run, written to one JSON file.

    bash scripts/gpu_check.sh                       # on a CUDA machine (installs missing wheels from .whl/ first)
    python scripts/gpu_check.py --device cpu --tiny --out /tmp/gpu_check.json   # dry run, as the test suite does

(a) QAT vs FP32 training-step time, yolov8n and yolov8s, 640 px, batch 32, AMP, interleaved (benchmarks/overhead.py);
(b) host synchronisations in one frozen-range QAT step (torch.cuda.set_sync_debug_mode on CUDA; on the CPU the
    Tensor-method count of tests/test_host_syncs.py);
(c) one QAT epoch + evaluation of the shipped shapes model on the synthetic set, through train_qat.py;
(d) the ONNX export of that CUDA-trained model (and its ONNX Runtime mAP through validate_exports);
(e) a TensorRT engine from a TensorRT-preset PTQ model and its mAP, where ``tensorrt`` imports.
Each part records its error instead of stopping the others.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from src.env import prepare_environment  # noqa: E402

SHAPES_MODEL = REPO / "models" / "pretrained" / "yolov8n_shapes.pt"
# (variants, batch, imgsz, steps, synthetic train/val images, their size) for a GPU run and for the CPU dry run
FULL = {"variants": ("n", "s"), "batch": 32, "imgsz": 640, "steps": 10, "train": 200, "val": 200, "data_imgsz": 256}
TINY = {"variants": ("n",), "batch": 2, "imgsz": 64, "steps": 1, "train": 8, "val": 4, "data_imgsz": 64}


def _part(results: dict, name: str, fn) -> None:
    """Run one part, recording its result or its error, and its duration."""
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as err:  # one broken part must not hide the others' numbers
        results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=8)}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {json.dumps(results[name], default=str)[:400]}", flush=True)


def step_times(sizes: dict, device: str, amp: bool) -> dict:
    from overhead import measure_step_times  # benchmarks/overhead.py

    from src.config import load_config

    out = {}
    for v in sizes["variants"]:
        cfg = load_config(REPO / "configs" / "qat_config.yaml",
                          {"train_params.batch_size": sizes["batch"], "train_params.img_size": sizes["imgsz"]})
        r = measure_step_times(f"yolov8{v}.yaml", cfg, batch=sizes["batch"], imgsz=sizes["imgsz"],
                               steps=sizes["steps"], device=device, amp=amp)
        out[f"yolov8{v}"] = {"fp32_ms": round(r["fp32"] * 1e3, 2), "qat_ms": round(r["qat"] * 1e3, 2),
                             "qat_frozen_ms": round(r["qat_frozen"] * 1e3, 2),
                             "ratio_observers_on": round(r["ratio_observers_on"], 3),
                             "ratio_frozen": round(r["ratio_frozen"], 3)}
    return {"batch": sizes["batch"], "imgsz": sizes["imgsz"], "amp": amp, "steps": sizes["steps"], **out}


def host_syncs(device: str) -> dict:
    """Synchronising calls in one frozen-range QAT forward + backward of yolov8n."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from src.analysis.host_syncs import count_host_syncs, output_tensors
    from src.config import load_config
    from src.models.yolov8_qat import prepare_qat_model, set_observers
    from src.quantization.calibration import calibrate

    dev = torch.device(device)
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=6, verbose=False).to(dev)
    prepare_qat_model(model, load_config(REPO / "configs" / "qat_config.yaml"))
    calibrate(model, [torch.rand(2, 3, 64, 64, device=dev)], 2, progress=False)
    model.train()
    set_observers(model, False)
    x = torch.rand(2, 3, 64, 64, device=dev)

    def run():
        sum(t.float().sum() for t in output_tensors(model(x))).backward()

    run()  # warm-up: lazy initialisation is not the steady state
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message).lower()]
        return {"method": "torch.cuda.set_sync_debug_mode", "syncs": len(syncs), "examples": syncs[:5]}
    counts = count_host_syncs(run)
    return {"method": "Tensor.item/__bool__/__float__/__int__/tolist calls (CPU)", "syncs": sum(counts.values()),
            "examples": [f"{m} at {where}" for (m, where), _ in counts.most_common(5)]}


def _synthetic_data(sizes: dict, work: Path) -> Path:
    from src.data.synthetic import generate_dataset

    return generate_dataset(work / "shapes", n_train=sizes["train"], n_val=sizes["val"], imgsz=sizes["data_imgsz"],
                            seed=0, progress=False)


def _train_qat(args: list[str]) -> None:
    from src.cli import main as train_qat

    rc = train_qat(args)
    if rc != 0:
        raise RuntimeError(f"train_qat.py {' '.join(args)} exited {rc}")


def qat_epoch_and_onnx(sizes: dict, device: str, work: Path) -> dict:
    """(c) + (d): one QAT epoch of the shapes model on CUDA, its evaluation, its ONNX export and that export's mAP."""
    from src.export.validate import main as validate_exports

    data = _synthetic_data(sizes, work)
    run = work / "qat"
    cfg = work / "onnx.yaml"
    cfg.write_text("export:\n  formats: [onnx]\n")
    _train_qat(["--model", str(SHAPES_MODEL), "--data", str(data), "--img-size", str(sizes["data_imgsz"]),
                "--device", device, "--epochs", "1", "--batch-size", str(min(sizes["batch"], 16)), "--workers", "0",
                "--config", str(cfg), "--save-dir", str(run), "--exist-ok", "--log-dir", str(work / "logs"),
                "--eval", "--export", "--export-dir", str(work / "exported")])
    metrics = json.loads((run / "metrics.json").read_text())
    validation = work / "validation.json"
    rc = validate_exports(["--model", str(work / "exported" / "onnx"), "--data", str(data), "--reference",
                           str(run / "quantized_model.pt"), "--json", str(validation), "--runs", "2", "--warmup", "1"])
    exports = json.loads(validation.read_text())["exports"] if validation.exists() else []
    return {"fp32_map50_95": metrics.get("fp32", {}).get("map50_95"), "qat_map50_95": metrics["qat"]["map50_95"],
            "onnx": [{k: e.get(k) for k in ("path", "map50_95", "reference_map50_95", "passed", "reasons")}
                     for e in exports], "validate_exports_rc": rc}


def tensorrt_engine(sizes: dict, device: str, work: Path) -> dict:
    """(e): PTQ with the TensorRT preset, the engine built from its QDQ ONNX, and both mAPs."""
    try:
        import tensorrt  # noqa: F401  (deferred: only on machines that have it)
    except ImportError as err:
        return {"skipped": f"tensorrt does not import here ({err}); the engine build needs it"}
    from ultralytics import YOLO

    data = _synthetic_data(sizes, work)
    run = work / "ptq_trt"
    _train_qat(["--model", str(SHAPES_MODEL), "--data", str(data), "--img-size", str(sizes["data_imgsz"]),
                "--device", device, "--epochs", "0", "--qconfig", "tensorrt", "--workers", "0", "--save-dir",
                str(run), "--exist-ok", "--log-dir", str(work / "logs"), "--eval", "--export", "--export-dir",
                str(work / "trt_exported"), "--config", str(_trt_config(work))])
    engines = sorted((work / "trt_exported").rglob("*.engine"))
    if not engines:
        return {"error": "no engine was built (see the log above)"}
    r = YOLO(str(engines[0]), task="detect").val(data=str(data), imgsz=sizes["data_imgsz"], batch=1, rect=False,
                                                  plots=False, verbose=False)
    fake_quant = json.loads((run / "metrics.json").read_text())["ptq"]["map50_95"]
    return {"engine": str(engines[0]), "engine_map50_95": float(r.box.map), "fake_quant_map50_95": fake_quant,
            "delta_points": round((float(r.box.map) - fake_quant) * 100, 2)}


def _trt_config(work: Path) -> Path:
    p = work / "trt.yaml"
    p.write_text("export:\n  formats: [tensorrt]\n")
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run of every part)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the test suite's dry run)")
    p.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="the JSON file written")
    p.add_argument("--work", default=None, help="scratch folder (default: beside --out)")
    a = p.parse_args(argv)
    prepare_environment()
    import torch

    sizes = TINY if a.tiny else FULL
    out = Path(a.out)
    work = Path(a.work) if a.work else out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --device cpu for a dry run", file=sys.stderr)
        return 2
    results: dict = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)
                    if a.device.startswith("cuda") else platform.processor() or "cpu", "sizes": sizes},
    }
    amp = a.device.startswith("cuda")
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = {"step_time": lambda: step_times(sizes, a.device, amp), "host_syncs": lambda: host_syncs(a.device),
             "qat_epoch_onnx": lambda: qat_epoch_and_onnx(sizes, a.device, work),
             "tensorrt": lambda: tensorrt_engine(sizes, a.device, work)}
    for name, fn in parts.items():
        _part(results, name, fn)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")  # kept if a later part hits the timeout
    print(f"[gpu_check] wrote {out}")
    return 1 if any("error" in v for v in results.values() if isinstance(v, dict)) else 0


if __name__ == "__main__":
    sys.exit(main())
