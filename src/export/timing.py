"""Latency and size of exports: interleaved batch-1 timing of every runtime variant, and the files' size."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from src.export.discovery import Target
from src.export.hooks import hooks


def runners_for(t: Target, threads: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Runtime variants timed for one export (its format's; OpenVINO adds one with f32 inference precision)."""
    return hooks(t.spec).runners(t.path, threads)


def size_mb(t: Target) -> float:
    """Size of the export's main file and the files that belong to it (an IR's .bin)."""
    files = [t.path] + [t.path.with_suffix(s) for s in t.spec.companions]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


def measure_latency(variants: dict, x: np.ndarray, warmup: int, rounds: int) -> dict:
    """Per variant, ``rounds`` single-image timings (ms), taken round-robin so drift hits every variant alike."""
    for run in variants.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, run in variants.items():
            t0 = time.perf_counter()
            run(x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def median_iqr(ts: list[float]) -> tuple[float, float]:
    """Median and inter-quartile range of timings (IQR 0 for a single timing)."""
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return statistics.median(ts), q[2] - q[0]
