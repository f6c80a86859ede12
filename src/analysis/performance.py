"""Accuracy (FP32 / PTQ / QAT mAP) and exported-model latency for the analysis report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from src.export.discovery import discover
from src.export.timing import measure_latency, median_iqr, runners_for, size_mb
from src.training.evaluate import evaluate

LOGGER = logging.getLogger("yolov8_qat")


def collect_map(out_dir: Path, models: dict[str, nn.Module | None], data_yaml: str, cfg, device) -> dict[str, dict]:
    """mAP50 / mAP50-95 per label ("fp32", "ptq", "qat"), reusing ``out_dir/metrics.json`` entries when present.

    Args:
        out_dir: Where metrics.json of this run (or checkpoint) lives.
        models: label -> model to validate when metrics.json lacks that label (None: skip the label).
        data_yaml: Data YAML for Ultralytics' validator.
        cfg: Resolved config (img_size, batch_size).
        device: Validation device.
    """
    known: dict = {}
    path = Path(out_dir) / "metrics.json"
    if path.is_file():
        try:
            known = json.loads(path.read_text())
        except json.JSONDecodeError:
            known = {}
    out = {}
    tp = cfg.train_params
    for label, model in models.items():
        if label in known and "map50_95" in known[label]:
            out[label] = {"map50": known[label]["map50"], "map50_95": known[label]["map50_95"],
                          "source": str(path)}
        elif model is not None:
            r = evaluate(model, data_yaml, imgsz=tp.img_size, batch=tp.batch_size, device=device)
            out[label] = {"map50": r["map50"], "map50_95": r["map50_95"], "source": "validated now"}
    return out


def export_latency(exports: list[Path], imgsz: int, warmup: int = 3, rounds: int = 15) -> list[dict]:
    """Median/IQR batch-1 latency of ``exports`` (the run's own export files; empty when it made none).

    Uses validate_exports' discovery and interleaved timing; threads = torch's intra-op thread count.
    """
    if not exports:
        return []
    targets = discover([str(p) for p in exports])
    threads = torch.get_num_threads()
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    rows = []
    for t in targets:
        try:
            variants = runners_for(t, threads)
            times = measure_latency(variants, x, warmup, rounds)
        except Exception as err:  # an export of another image size or a broken file: report, keep going
            LOGGER.warning(f"analysis: could not time {t.path}: {err}")
            rows.append({"path": str(t.path), "format": t.format, "error": str(err)})
            continue
        size = round(size_mb(t), 4)
        for variant, ts in times.items():
            med, iqr = median_iqr(ts)
            rows.append({"path": str(t.path), "format": t.format, "variant": variant, "threads": threads,
                         "median_ms": round(med, 3), "iqr_ms": round(iqr, 3), "size_mb": size})
    return rows
