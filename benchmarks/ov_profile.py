"""Where an OpenVINO IR spends its CPU time: per-node profiling counters, summed by node and kernel type, and the
convolutions' time by their narrowest channel count (int8 kernels pad narrow convs more than bf16 ones do).

    python benchmarks/ov_profile.py runs/fp32/model.xml models/exported/openvino/quantized_model.xml --threads 1

Each IR is compiled with ``PERF_COUNT`` on (which adds a little overhead to every node), warmed up, then run
``--runs`` times; the times are means per inference. For latency claims use the harness's interleaved latency
(benchmarks/latency.py); this script explains them.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.env import prepare_environment  # noqa: E402

CHANNEL_BUCKETS = (8, 16, 32, 64, 128, 256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("irs", nargs="+", help="OpenVINO .xml files")
    p.add_argument("--threads", type=int, default=1, help="INFERENCE_NUM_THREADS (default 1: stable per-node times)")
    p.add_argument("--runs", type=int, default=30, help="profiled runs after 10 warm-up runs (default 30)")
    p.add_argument("--top", type=int, default=12, help="rows of the (node, kernel) table (default 12)")
    return p.parse_args(argv)


def _bucket(channels: int) -> str:
    upper = next((b for b in CHANNEL_BUCKETS if channels <= b), None)
    return f"<= {upper}" if upper else f"> {CHANNEL_BUCKETS[-1]}"


def profile(xml: str | Path, threads: int, runs: int) -> dict:
    """Mean ms per inference: ``total``, ``by_kernel`` {(node type, kernel): (ms, nodes)} and ``conv_by_channels``
    {bucket: (ms, nodes)}."""
    import openvino as ov  # deferred: heavy dependency, loaded only when profiling

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", {
        "PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY"})
    narrowest = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" in info and "onvolution" in info["layerType"].astype(str):
            shapes = op.get_input_partial_shape(0), op.get_output_partial_shape(0)
            narrowest[op.get_friendly_name()] = min(int(s[1].get_length()) for s in shapes)
    request = compiled.create_infer_request()
    image = np.random.default_rng(0).random(tuple(compiled.input(0).shape), dtype=np.float32)
    for _ in range(10):
        request.infer({0: image})
    by_kernel: dict = collections.defaultdict(lambda: [0.0, 0])
    by_channels: dict = collections.defaultdict(lambda: [0.0, 0])
    total = 0.0
    for i in range(runs):
        request.infer({0: image})
        for p in request.get_profiling_info():
            if p.status != p.Status.EXECUTED:
                continue
            ms = p.real_time.total_seconds() * 1e3 / runs
            total += ms
            row = by_kernel[(p.node_type, p.exec_type)]
            row[0] += ms
            row[1] += i == 0
            if p.node_name in narrowest:
                row = by_channels[_bucket(narrowest[p.node_name])]
                row[0] += ms
                row[1] += i == 0
    return {"total": total, "by_kernel": dict(by_kernel), "conv_by_channels": dict(by_channels)}


def main(argv=None) -> int:
    a = parse_args(argv)
    prepare_environment()
    for xml in a.irs:
        if not Path(xml).is_file():
            print(f"ERROR: {xml} not found; pass an OpenVINO .xml", file=sys.stderr)
            return 2
    for xml in a.irs:
        r = profile(xml, a.threads, a.runs)
        print(f"{xml}: {r['total']:.2f} ms per inference ({a.threads} thread(s), {a.runs} runs, profiling on)")
        rows = sorted(r["by_kernel"].items(), key=lambda kv: -kv[1][0])[: a.top]
        for (node, kernel), (ms, n) in rows:
            print(f"  {node:20s} {kernel:36s} {ms:7.3f} ms  {n:3d} nodes")
        print("  convolutions by narrowest channel count (input or output):")
        for bucket in sorted(r["conv_by_channels"], key=lambda b: (b.startswith(">"), int(b.split()[-1]))):
            ms, n = r["conv_by_channels"][bucket]
            print(f"    {bucket:>6s} channels {ms:7.3f} ms  {n:3d} convs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
