#!/usr/bin/env python
"""OpenVINO CPU latency of every contender's IR, measured in one process with interleaved runs.

    python benchmarks/latency.py <spec.json>

spec: ``{"items": [{"name", "xml"}], "imgsz", "threads", "warmup", "runs", "out"}``. Each IR is compiled twice, with
the plugin's default inference precision and with ``INFERENCE_PRECISION_HINT=f32`` (the float reference: on CPUs with
bf16 the default runs the float parts in bf16); all variants are warmed up, then timed round-robin, batch 1, so every
contender sees the same machine load. Writes ``{name: {latency_ms, latency_iqr_ms, latency_f32_ms}}`` (``error`` for
an IR that does not compile) to spec["out"].
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.env import prepare_environment  # noqa: E402


def measure(items: list[dict], imgsz: int, threads: int, warmup: int, runs: int) -> dict[str, dict]:
    import numpy as np

    from src.export.openvino_export import ov_runner
    from src.export.timing import measure_latency, median_iqr

    results: dict[str, dict] = {}
    variants = {}
    for it in items:
        try:
            variants[(it["name"], "default")] = ov_runner(Path(it["xml"]), threads)
            variants[(it["name"], "f32")] = ov_runner(Path(it["xml"]), threads, f32=True)
            results[it["name"]] = {"threads": threads}
        except Exception as e:  # one broken IR must not cost the others their numbers
            results[it["name"]] = {"error": f"{type(e).__name__}: {e}"}
            variants.pop((it["name"], "default"), None)
    x = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    for (name, kind), ts in measure_latency(variants, x, warmup, runs).items():
        med, iqr = median_iqr(ts)
        if kind == "default":
            results[name].update(latency_ms=med, latency_iqr_ms=iqr)
        else:
            results[name]["latency_f32_ms"] = med
    return results


def main(argv: list[str] | None = None) -> int:
    from benchmarks.report import read_spec, write_json

    spec = read_spec(sys.argv[1:] if argv is None else argv, __doc__)
    if spec is None:
        return 2
    prepare_environment()
    res = measure(spec["items"], spec["imgsz"], spec["threads"], spec["warmup"], spec["runs"])
    write_json(res, spec["out"])
    for name, r in res.items():
        line = r["error"] if "error" in r else \
            f"{r['latency_ms']:8.2f} ms (IQR {r['latency_iqr_ms']:.2f}), f32 {r['latency_f32_ms']:.2f} ms"
        print(f"{name:<22} {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
