#!/usr/bin/env python
"""`make demo`: the whole workflow on the embedded default (synthetic shapes, yolov8n trained here).

1. Generate the synthetic dataset (dataset/shapes, 200 train / 500 val images at 256 px) if missing.
2. Train the FP32 starting model (models/pretrained/yolov8n_shapes.pt) if missing.
3. PTQ: calibration only (--epochs 0), evaluated.
4. QAT: calibration + 2 epochs, evaluated, analysed, exported (ONNX, OpenVINO) and the exports validated.
5. Print the FP32 / PTQ / QAT / export comparison and where every artifact is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sh(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=REPO)
    if r.returncode != 0:
        sys.exit(f"demo step failed (exit {r.returncode}): {' '.join(cmd)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="dataset/shapes")
    p.add_argument("--fp32", default="models/pretrained/yolov8n_shapes.pt")
    p.add_argument("--fp32-epochs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--out", default="runs/demo")
    a = p.parse_args(argv)
    py = sys.executable
    t0 = time.time()
    data = REPO / a.data_dir / "data.yaml"
    if not data.exists():
        sh([py, "-m", "src.data.synthetic", "--out", a.data_dir, "--train", "200", "--val", "500", "--imgsz",
            str(a.imgsz), "--seed", "0"])
    if not (REPO / a.fp32).exists():
        sh([py, "scripts/train_fp32.py", "--data", str(data), "--epochs", str(a.fp32_epochs), "--imgsz", str(a.imgsz),
            "--out", a.fp32, "--project", str(REPO / a.out / "fp32")])
    out = REPO / a.out
    common = ["--model", a.fp32, "--data", str(data), "--img-size", str(a.imgsz), "--device", "cpu", "--exist-ok",
              "--eval", "--log-dir", str(out / "logs")]
    sh([py, "train_qat.py", *common, "--epochs", "0", "--save-dir", str(out / "ptq")])
    sh([py, "train_qat.py", *common, "--epochs", str(a.epochs), "--save-dir", str(out / "qat"), "--analyze",
        "--export", "--validate-exports", "--export-dir", str(out / "exported")])

    ptq = json.loads((out / "ptq" / "metrics.json").read_text())
    qat = json.loads((out / "qat" / "metrics.json").read_text())
    rows = [("FP32 (source)", qat["fp32"]), ("PTQ INT8 (ours)", ptq["ptq"]), (f"QAT INT8 (ours, {a.epochs} ep)",
                                                                                qat["qat"])]
    for e in json.loads((out / "exported" / "validation.json").read_text())["exports"]:
        rows.append((f"QAT export: {e['format']}", e))
    print(f"\n{'model':<28} {'mAP50':>8} {'mAP50-95':>9} {'latency ms':>11} {'INT8 convs':>11} {'MB':>6}")
    for name, m in rows:
        lat = f"{m['latency_ms']:.1f}" if m.get("latency_ms") else "-"
        int8 = f"{m['int8_convs']}/{m['int8_convs'] + m['float_convs']}" if m.get("int8_convs") is not None else "-"
        size = f"{m['size_mb']:.2f}" if m.get("size_mb") else "-"
        print(f"{name:<28} {m['map50']:>8.4f} {m['map50_95']:>9.4f} {lat:>11} {int8:>11} {size:>6}")
    print(f"\nArtifacts:\n  dataset        {data}\n  FP32 model     {REPO / a.fp32}\n  PTQ run        {out / 'ptq'}"
          f"\n  QAT run        {out / 'qat'} (quantized_model.pt, metrics.json, results.csv, placement.txt)"
          f"\n  analysis       {out / 'qat' / 'analysis' / 'report.md'}"
          f"\n  exports        {out / 'exported'} (onnx/, openvino/, validation.json)"
          f"\n  TensorBoard    tensorboard --logdir {out / 'logs'}")
    print(f"\nDemo finished in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
