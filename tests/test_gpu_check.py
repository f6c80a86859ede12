"""The prepared GPU check runs end to end in its CPU dry mode (tiny sizes), so it is known to work before a GPU run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_every_number(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from gpu_check import main
    finally:
        sys.path.remove(str(REPO / "scripts"))
    out = tmp_path / "gpu_check.json"
    rc = main(["--device", "cpu", "--tiny", "--out", str(out), "--work", str(tmp_path / "work")])
    results = json.loads(out.read_text())
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    assert rc == 0 and errors == {}
    st = results["step_time"]["yolov8n"]
    assert st["fp32_ms"] > 0 and st["ratio_frozen"] > 0 and st["ratio_observers_on"] > 0
    assert results["host_syncs"]["syncs"] == 0
    q = results["qat_epoch_onnx"]
    assert 0 <= q["qat_map50_95"] <= 1 and q["onnx"] and q["onnx"][0]["path"].endswith(".onnx")
    assert "skipped" in results["tensorrt"] or "engine_map50_95" in results["tensorrt"]
