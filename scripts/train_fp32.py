#!/usr/bin/env python
"""Train the FP32 starting model of the embedded default: yolov8n from yolov8n.yaml on the synthetic shapes set.

The result is cached as models/pretrained/yolov8n_shapes.pt, a name that never shadows a user's yolov8n.pt.
Uses Ultralytics' own trainer with an explicitly named optimizer (optimizer=auto would ignore lr0) and nbs equal to
the batch size: with the default nbs=64 a 200-image set gets only 3 optimizer steps per epoch.

    python scripts/train_fp32.py --data dataset/shapes/data.yaml --epochs 30 --imgsz 256
    # continue a trained model at a lower lr until its mAP plateaus (the shipped checkpoint: 5 stages, 97 epochs,
    # listed in models/pretrained/README.md)
    python scripts/train_fp32.py --model models/pretrained/yolov8n_shapes.pt --epochs 20 --warmup-epochs 0 --lr0 0.001
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.env import prepare_environment  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="dataset/shapes/data.yaml")
    p.add_argument("--model", default="yolov8n.yaml")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr0", type=float, default=0.01)
    p.add_argument("--warmup-epochs", type=float, default=3.0, help="0 when continuing from a trained model")
    p.add_argument("--close-mosaic", type=int, default=10, help="last epochs without mosaic (Ultralytics' default 10; "
                   "= --epochs for a continuation stage without mosaic)")
    p.add_argument("--out", default="models/pretrained/yolov8n_shapes.pt")
    p.add_argument("--project", default="runs/fp32")
    p.add_argument("--name", default=None, help="run name under --project (default: train, or continue for a .pt)")
    a = p.parse_args(argv)
    prepare_environment()
    from ultralytics import YOLO

    continuing = a.model.endswith(".pt")
    name = a.name or ("continue" if continuing else "train")
    model = YOLO(a.model)
    model.train(data=a.data, epochs=a.epochs, imgsz=a.imgsz, batch=a.batch, workers=a.workers, device="cpu",
                optimizer="SGD", lr0=a.lr0, momentum=0.937, weight_decay=0.0005, warmup_epochs=a.warmup_epochs,
                close_mosaic=a.close_mosaic, seed=a.seed, nbs=a.batch,
                deterministic=True, plots=False, project=str(Path(a.project).resolve()), name=name, exist_ok=True,
                amp=False,
                verbose=False)
    best = Path(model.trainer.best)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    history = out.with_suffix(".results.csv")
    new_rows = (best.parent.parent / "results.csv").read_text().splitlines()
    if continuing and history.exists():  # one history across stages, so convergence can be judged on all epochs
        old = history.read_text().splitlines()
        offset = len(old) - 1
        new_rows = old + [_shift_epoch(r, offset) for r in new_rows[1:]]
    shutil.copy2(best, out)
    history.write_text("\n".join(new_rows) + "\n")
    print(f"FP32 model saved to {out} (training log: {best.parent.parent})")
    return 0


def _shift_epoch(row: str, offset: int) -> str:
    first, _, rest = row.partition(",")
    return f"{int(float(first)) + offset},{rest}"


if __name__ == "__main__":
    sys.exit(main())
