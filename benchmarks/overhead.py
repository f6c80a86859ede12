#!/usr/bin/env python
"""Training-step overhead of fake quantization, measured side by side in one run.

A real yolov8n QAT training step (forward + v8DetectionLoss + backward + SGD step) against the same FP32 step, on
the same batch, interleaved so both see the same machine load; prints the median step times and their ratio.

    python benchmarks/overhead.py --batch 16 --imgsz 256 --steps 10
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.env import prepare_environment  # noqa: E402


def _batch(n: int, imgsz: int, nc: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    boxes_per_image = 4
    cls = torch.randint(0, nc, (n * boxes_per_image, 1), generator=g).float()
    xy = torch.rand(n * boxes_per_image, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n * boxes_per_image, 2, generator=g) * 0.3 + 0.05
    return {
        "img": torch.rand(n, 3, imgsz, imgsz, generator=g),
        "cls": cls,
        "bboxes": torch.cat([xy, wh], 1),
        "batch_idx": torch.arange(n).repeat_interleave(boxes_per_image).float(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="yolov8n.yaml")
    p.add_argument("--config", default="configs/qat_config.yaml")
    p.add_argument("--qconfig", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    prepare_environment()
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from src.config import load_config
    from src.integrations.ultralytics import set_model_args
    from src.models.yolov8_qat import prepare_qat_model, set_observers
    from src.quantization.calibration import calibrate
    from src.training.data import hyperparameters
    from src.training.trainer import build_optimizer

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.config, {"train_params.batch_size": a.batch, "train_params.img_size": a.imgsz},
                      qconfig=a.qconfig)
    torch.manual_seed(0)
    fp32 = DetectionModel(a.model, nc=6, verbose=False)
    qat = copy.deepcopy(fp32)
    prepare_qat_model(qat, cfg)
    calibrate(qat, [torch.rand(a.batch, 3, a.imgsz, a.imgsz)], a.batch, progress=False)
    frozen = copy.deepcopy(qat)  # after freeze_observers_epoch: ranges fixed, fake quant only
    set_observers(qat, True, histograms=False)  # as in the first QAT epoch: min/max observers still running
    hyp = hyperparameters(cfg, imgsz=a.imgsz)
    batch = _batch(a.batch, a.imgsz, 6)
    runs = {}
    names = ("fp32", "qat", "qat_frozen")
    for name, m in zip(names, (fp32, qat, frozen)):
        set_model_args(m, hyp)
        m.train()
        runs[name] = (m, build_optimizer(m, cfg, 1e-4))

    def step(name):
        m, opt = runs[name]
        t = time.perf_counter()
        preds = m(batch["img"])
        loss, _ = m.loss(batch, preds)
        loss.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    for _ in range(2):
        for name in names:
            step(name)
    times = {n: [] for n in names}
    for i in range(a.steps):
        order = names[i % 3:] + names[:i % 3]  # rotate so no model always runs first
        for name in order:
            times[name].append(step(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"yolov8n training step, batch {a.batch}, {a.imgsz} px, {torch.get_num_threads()} threads, "
          f"{a.steps} interleaved steps each (qconfig: {cfg.quantization.default_qconfig})")
    for k in names:
        print(f"  {k:<10} median {med[k] * 1000:8.1f} ms   (min {min(times[k]) * 1000:.1f}, "
              f"max {max(times[k]) * 1000:.1f})")
    print(f"  overhead ratio, observers on (first QAT epoch): {med['qat'] / med['fp32']:.3f}x")
    print(f"  overhead ratio, observers frozen:               {med['qat_frozen'] / med['fp32']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
