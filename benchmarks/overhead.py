#!/usr/bin/env python
"""Training-step overhead of fake quantization, measured side by side in one run.

A real QAT training step (forward + v8DetectionLoss + backward + SGD step) against the same FP32 step, on the same
batch, interleaved so both see the same machine load; prints the median step times and their ratio. On CUDA each
step is timed between device synchronisations, under autocast when ``--amp``.

    python benchmarks/overhead.py --batch 16 --imgsz 256 --steps 10
    python benchmarks/overhead.py --model yolov8s.yaml --batch 32 --imgsz 640 --device cuda --amp
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

NAMES = ("fp32", "qat", "qat_frozen")


def _batch(n: int, imgsz: int, nc: int, device, seed: int = 0) -> dict:
    import torch  # deferred: the script parses --help without torch

    g = torch.Generator().manual_seed(seed)
    boxes_per_image = 4
    cls = torch.randint(0, nc, (n * boxes_per_image, 1), generator=g).float()
    xy = torch.rand(n * boxes_per_image, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n * boxes_per_image, 2, generator=g) * 0.3 + 0.05
    batch = {
        "img": torch.rand(n, 3, imgsz, imgsz, generator=g),
        "cls": cls,
        "bboxes": torch.cat([xy, wh], 1),
        "batch_idx": torch.arange(n).repeat_interleave(boxes_per_image).float(),
    }
    return {k: v.to(device) for k, v in batch.items()}


def measure_step_times(model_yaml: str, cfg, *, batch: int, imgsz: int, steps: int, device: str = "cpu",
                       amp: bool = False, nc: int = 6) -> dict:
    """Median step times (s) of the FP32 model and its QAT copy (observers on / frozen), interleaved.

    Returns:
        ``{"fp32": s, "qat": s, "qat_frozen": s, "ratio_observers_on": x, "ratio_frozen": x, "steps": n}``.
    """
    # deferred: Ultralytics starts after prepare_environment(), in main()
    import torch
    from ultralytics.nn.tasks import DetectionModel

    from src.integrations.ultralytics import set_model_args
    from src.models.yolov8_qat import prepare_qat_model, quantizers, set_observers
    from src.quantization.calibration import calibrate
    from src.training.data import hyperparameters
    from src.training.trainer import build_optimizer

    dev = torch.device(device)
    torch.manual_seed(0)
    fp32 = DetectionModel(model_yaml, nc=nc, verbose=False).to(dev)
    qat = copy.deepcopy(fp32)
    prepare_qat_model(qat, cfg)
    calibrate(qat, [torch.rand(batch, 3, imgsz, imgsz, device=dev)], batch, progress=False)
    frozen = copy.deepcopy(qat)  # after freeze_observers_epoch: ranges fixed, fake quant only
    set_observers(qat, True, histograms=False)  # as in the first QAT epoch: min/max observers still running
    for _, q in quantizers(qat):
        q.observer.defer_finite_check = True  # as the trainer runs them: no host read per observation
    hyp = hyperparameters(cfg, imgsz=imgsz)
    data = _batch(batch, imgsz, nc, dev)
    runs = {}
    for name, m in zip(NAMES, (fp32, qat, frozen)):
        set_model_args(m, hyp)
        m.train()
        runs[name] = (m, build_optimizer(m, cfg, 1e-4))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(name):
        m, opt = runs[name]
        sync()
        t = time.perf_counter()
        with torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
            preds = m(data["img"])
            loss, _ = m.loss(data, preds)
        loss.sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    for _ in range(2):
        for name in NAMES:
            step(name)
    times = {n: [] for n in NAMES}
    for i in range(steps):
        for name in NAMES[i % 3:] + NAMES[:i % 3]:  # rotate so no model always runs first
            times[name].append(step(name))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**med, "min": {k: min(v) for k, v in times.items()}, "max": {k: max(v) for k, v in times.items()},
            "ratio_observers_on": med["qat"] / med["fp32"], "ratio_frozen": med["qat_frozen"] / med["fp32"],
            "steps": steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="yolov8n.yaml")
    p.add_argument("--config", default="configs/qat_config.yaml")
    p.add_argument("--qconfig", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--imgsz", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast (CUDA only)")
    a = p.parse_args(argv)
    prepare_environment()
    import torch  # deferred: after prepare_environment()

    from src.config import load_config

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.config, {"train_params.batch_size": a.batch, "train_params.img_size": a.imgsz},
                      qconfig=a.qconfig)
    r = measure_step_times(a.model, cfg, batch=a.batch, imgsz=a.imgsz, steps=a.steps, device=a.device, amp=a.amp)
    print(f"{a.model} training step, batch {a.batch}, {a.imgsz} px, {a.device}"
          f"{' amp' if a.amp else ''}, {torch.get_num_threads()} threads, {a.steps} interleaved steps each "
          f"(qconfig: {cfg.quantization.default_qconfig})")
    for k in NAMES:
        print(f"  {k:<10} median {r[k] * 1000:8.1f} ms   (min {r['min'][k] * 1000:.1f}, "
              f"max {r['max'][k] * 1000:.1f})")
    print(f"  overhead ratio, observers on (first QAT epoch): {r['ratio_observers_on']:.3f}x")
    print(f"  overhead ratio, observers frozen:               {r['ratio_frozen']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
