"""The comparison harness's own logic: seed aggregation, results.json/md/png, fairness checks, caching, failures.

No contender is trained here: the per-seed results are written by hand in the shape run_contender.py writes them.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest

from benchmarks import compare, report
from benchmarks.contenders import BY_NAME, CONTENDERS, FP32_REFERENCE, select, seeds_for
from benchmarks.fairness import (check_convergence, find_results_csv, read_map_column, split_images, subset_dataset,
                                 val_split_warning)
from benchmarks.run_contender import StepTimer


def seed_result(name, seed, status="ok", **kw):
    r = {"name": name, "seed": seed, "status": status, "error": None, "map50": None, "map50_95": None,
         "export_map50": None, "export_map50_95": None, "int8_convs": None, "float_convs": None, "size_mb": None,
         "export_path": None, "step_time_s": None, "wall_s": None}
    r.update(kw)
    return r


def qat_runs():
    return [seed_result("qat_ours", 0, map50=0.61, map50_95=0.40, export_map50=0.60, export_map50_95=0.39,
                        int8_convs=63, float_convs=1, size_mb=3.51, export_path="a.xml", step_time_s=0.9, wall_s=100.0),
            seed_result("qat_ours", 1, map50=0.63, map50_95=0.42, export_map50=0.62, export_map50_95=0.43,
                        int8_convs=63, float_convs=1, size_mb=3.51, export_path="b.xml", step_time_s=1.1, wall_s=110.0)]


# --------------------------------------------------------------------------------------------------------------------
# aggregation over seeds
# --------------------------------------------------------------------------------------------------------------------
def test_mean_std_matches_statistics_and_ignores_missing():
    assert report.mean_std([0.40, 0.42, None]) == (statistics.fmean([0.40, 0.42]), statistics.stdev([0.40, 0.42]))
    assert report.mean_std([0.5]) == (0.5, None)
    assert report.mean_std([None, None]) == (None, None)


def test_aggregate_two_good_seeds():
    row = report.aggregate("qat_ours", qat_runs(), "desc")
    assert row["status"] == "ok"
    assert row["map50_95"] == statistics.fmean([0.40, 0.42])
    assert row["map50_95_std"] == statistics.stdev([0.40, 0.42])
    assert row["export_map50_95"] == statistics.fmean([0.39, 0.43])
    assert row["step_time_s"] == statistics.fmean([0.9, 1.1])
    assert row["wall_s"] == 105.0
    # graph properties come from the first good seed, and so does the IR the latency pass times
    assert (row["int8_convs"], row["float_convs"], row["int8_total"], row["export_path"]) == (63, 1, 64, "a.xml")
    assert [s["seed"] for s in row["seeds"]] == [0, 1]
    assert row["error"] is None


def test_aggregate_failed_seed_is_kept_but_not_averaged():
    runs = qat_runs()
    runs[1] = seed_result("qat_ours", 1, status="failed", error="RuntimeError: boom", wall_s=5.0)
    row = report.aggregate("qat_ours", runs)
    assert row["status"] == "partial"
    assert row["map50_95"] == 0.40 and row["map50_95_std"] is None
    assert row["wall_s"] == 100.0
    assert row["error"] == "seed 1: RuntimeError: boom"
    assert len(row["seeds"]) == 2 and row["seeds"][1]["status"] == "failed"


def test_aggregate_all_failed_or_skipped():
    failed = report.aggregate("qat_ultralytics", [seed_result("qat_ultralytics", 0, status="failed",
                                                              error="ModuleNotFoundError: modelopt")])
    assert failed["status"] == "failed" and failed["map50"] is None
    assert "ModuleNotFoundError: modelopt" in failed["error"]
    skipped = report.aggregate("qat_ours_kd", [
        seed_result("qat_ours_kd", s, status="skipped", error="--distillation: not implemented yet") for s in (0, 1)])
    assert skipped["status"] == "skipped"
    assert skipped["error"].count("not implemented yet") == 2


def test_step_ratio_against_fp32_reference():
    rows = [report.aggregate(FP32_REFERENCE, [seed_result(FP32_REFERENCE, 0, step_time_s=0.5)]),
            report.aggregate("qat_ours", qat_runs()),
            report.aggregate("ptq_ours", [seed_result("ptq_ours", 0)])]
    report.attach_step_ratio(rows, FP32_REFERENCE)
    assert rows[0]["step_time_ratio"] == 1.0
    assert rows[1]["step_time_ratio"] == statistics.fmean([0.9, 1.1]) / 0.5
    assert rows[2]["step_time_ratio"] is None
    report.attach_step_ratio(rows[1:], FP32_REFERENCE)  # reference not run: no ratio rather than a wrong one
    assert rows[1]["step_time_ratio"] is None


def test_attach_latency_copies_numbers_and_errors():
    rows = [report.aggregate("qat_ours", qat_runs()), report.aggregate("ptq_ours", [seed_result("ptq_ours", 0)])]
    report.attach_latency(rows, {"qat_ours": {"latency_ms": 4.25, "latency_iqr_ms": 0.5, "latency_f32_ms": 9.0},
                                 "ptq_ours": {"error": "RuntimeError: cannot compile"}})
    assert (rows[0]["latency_ms"], rows[0]["latency_f32_ms"]) == (4.25, 9.0)
    assert rows[1]["latency_ms"] is None and "cannot compile" in rows[1]["note"]


# --------------------------------------------------------------------------------------------------------------------
# results.json / results.md / results.png
# --------------------------------------------------------------------------------------------------------------------
def make_doc():
    rows = [report.aggregate(FP32_REFERENCE, [seed_result(FP32_REFERENCE, 0, map50=0.7, map50_95=0.5,
                                                          export_map50=0.7, export_map50_95=0.5, int8_convs=0,
                                                          float_convs=64, size_mb=12.26, step_time_s=0.5,
                                                          wall_s=50.0)]),
            report.aggregate("qat_ours", qat_runs()),
            report.aggregate("qat_ultralytics", [seed_result("qat_ultralytics", 0, status="failed",
                                                             error="AssertionError: CUDA required")])]
    report.attach_latency(rows, {FP32_REFERENCE: {"latency_ms": 10.0, "latency_f32_ms": 10.5},
                                 "qat_ours": {"latency_ms": 4.0, "latency_f32_ms": 9.5}})
    report.attach_step_ratio(rows, FP32_REFERENCE)
    return report.results_doc(rows, machine={"summary": "test cpu"}, date="2026-01-02T03:04:05+00:00",
                              command="python benchmarks/compare.py --quick",
                              settings={"model": "m.pt", "data": "d.yaml", "epochs": 2, "imgsz": 256, "batch": 16,
                                        "lr": 5e-4, "seeds": [0, 1], "warnings": ["val split small"]})


def test_results_json_schema(tmp_path):
    doc = make_doc()
    path = report.write_json(doc, tmp_path / "results.json")
    back = json.loads(path.read_text())
    assert {"machine", "date", "command", "contenders"} <= set(back)
    for row in back["contenders"]:
        assert set(report.REQUIRED_KEYS) <= set(row), row["name"]
        assert isinstance(row["seeds"], list) and row["seeds"]
    qat = back["contenders"][1]
    assert qat["latency_ms"] == 4.0 and qat["step_time_ratio"] == pytest.approx(2.0, abs=1e-12)
    assert back["contenders"][2]["error"] == "seed 0: AssertionError: CUDA required"
    bad = dict(doc["contenders"][0])
    del bad["step_time_ratio"]
    with pytest.raises(ValueError, match="step_time_ratio"):
        report.results_doc([bad], machine={}, date="", command="", settings={})


def test_results_md_table():
    md = report.markdown_table(make_doc())
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| contender")]
    assert [r.split("|")[1].strip() for r in rows] == [FP32_REFERENCE, "qat_ours", "qat_ultralytics"]
    qat = rows[1].split("|")
    assert qat[4].strip() == f"0.4100 ± {statistics.stdev([0.40, 0.42]):.4f}"  # mAP50-95 mean ± std
    assert qat[7].strip() == "–"  # vs start: make_doc has no fp32_start row
    assert qat[8].strip() == "4.00" and qat[9].strip() == "9.50"  # latency, f32 latency
    assert qat[10].strip() == "63/64" and qat[12].strip() == "2.00" and qat[14].strip() == "2/2"
    assert rows[2].split("|")[2].strip() == "failed"
    assert "- **qat_ultralytics** (failed): seed 0: AssertionError: CUDA required" in md
    assert "**warning:** val split small" in md
    doc = make_doc()
    doc["contenders"][2]["error"] = "seed 0: process ended; last log lines:\nTraceback (most recent call last):\nKilled"
    md = report.markdown_table(doc)
    assert "- **qat_ultralytics** (failed): seed 0: process ended; last log lines:\n\n  ```\n  Traceback (most " \
        "recent call last):\n  Killed\n  ```\n" in md
    assert "`python benchmarks/compare.py --quick`" in md


def test_vs_start_is_export_map_minus_the_start_models_torch_map_in_points():
    rows = [report.aggregate("fp32_start", [seed_result("fp32_start", 0, map50_95=0.50, export_map50_95=0.49)]),
            report.aggregate("ptq", [seed_result("ptq", 0, map50_95=0.47, export_map50_95=0.46)]),
            report.aggregate("torch_only", [seed_result("torch_only", 0, map50_95=0.52, export_map50_95=None)])]
    report.attach_vs_start(rows, "fp32_start")
    assert [r["vs_start_points"] for r in rows] == pytest.approx([-1.0, -4.0, 2.0])
    md = report.markdown_table(report.results_doc(rows, machine={}, date="", command="", settings={}))
    assert "| ptq | ok |" in md and " -4.00 |" in md
    report.attach_vs_start(rows[1:], "fp32_start")  # no start row: the column stays empty
    assert rows[1]["vs_start_points"] is None


def test_plot_writes_png(tmp_path):
    path = report.plot(make_doc(), tmp_path / "results.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp*"))


# --------------------------------------------------------------------------------------------------------------------
# fairness checks
# --------------------------------------------------------------------------------------------------------------------
HEADER = ("                  epoch,         time,   train/box_loss,  metrics/mAP50(B),  metrics/mAP50-95(B)\n")


def write_log(path, maps):
    path.write_text(HEADER + "".join(f"{i + 1},{i * 10.0},1.0,{m + 0.2},{m}\n" for i, m in enumerate(maps)))
    return path


def test_convergence_plateau_and_still_improving(tmp_path):
    plateau = [0.1, 0.3, 0.45, 0.50, 0.52, 0.521, 0.519, 0.525, 0.52, 0.523]
    c = check_convergence(write_log(tmp_path / "a.csv", plateau), window=5, tol=0.01)
    assert c.converged is True and c.epochs == 10 and c.best == 0.525
    assert c.last_window_gain == pytest.approx(0.525 - 0.52, abs=1e-12)
    rising = [0.1, 0.2, 0.3, 0.35, 0.40, 0.42, 0.44, 0.46, 0.48, 0.50]
    c = check_convergence(write_log(tmp_path / "b.csv", rising), window=5, tol=0.01)
    assert c.converged is False and c.last_window_gain == pytest.approx(0.50 - 0.40, abs=1e-12)
    assert "still improving" in c.message
    c = check_convergence(write_log(tmp_path / "c.csv", [0.1, 0.2]), window=5)
    assert c.converged is False and "only 2 epoch" in c.message
    assert check_convergence(None).converged is None


def test_convergence_log_lookup_and_bad_column(tmp_path):
    model = tmp_path / "yolov8n_shapes.pt"
    model.write_bytes(b"x")
    assert find_results_csv(model) is None
    log = write_log(tmp_path / "yolov8n_shapes.results.csv", [0.5] * 7)
    assert find_results_csv(model) == log
    run_model = tmp_path / "run" / "weights" / "best.pt"  # Ultralytics' run layout
    run_model.parent.mkdir(parents=True)
    run_model.write_bytes(b"x")
    assert find_results_csv(run_model) is None
    run_log = write_log(tmp_path / "run" / "results.csv", [0.5] * 7)
    assert find_results_csv(run_model) == run_log
    assert read_map_column(log) == [0.5] * 7
    (tmp_path / "cls.csv").write_text("epoch,metrics/accuracy_top1\n1,0.5\n")
    with pytest.raises(ValueError, match="no column 'metrics/mAP50-95"):
        check_convergence(tmp_path / "cls.csv")


def test_val_split_warning():
    assert val_split_warning(500) is None
    w = val_split_warning(499)
    assert "499 images (< 500)" in w and "--val 500" in w


def test_subset_dataset_copies_first_images_and_labels(tmp_path):
    from src.data.synthetic import generate_dataset

    src = generate_dataset(tmp_path / "full", 5, 4, imgsz=64, seed=0)
    data = subset_dataset(src, tmp_path / "sub", 3, 2)
    full_train, full_val = split_images(src, "train"), split_images(src, "val")
    assert [p.name for p in split_images(data, "train")] == [p.name for p in full_train[:3]]
    assert [p.name for p in split_images(data, "val")] == [p.name for p in full_val[:2]]
    for img in full_train[:3]:
        label = tmp_path / "sub" / "labels" / "train" / (img.stem + ".txt")
        assert label.read_text() == (img.parent.parent.parent / "labels" / "train" / (img.stem + ".txt")).read_text()
    import yaml

    doc = yaml.safe_load(data.read_text())
    assert doc["nc"] == 6 and doc["names"][0] == "circle"


# --------------------------------------------------------------------------------------------------------------------
# contender selection, caching, step timing, failure capture
# --------------------------------------------------------------------------------------------------------------------
def test_contender_selection():
    quick = [c.name for c in select(None, quick=True)]
    assert quick == ["fp32_start", "fp32_finetuned", "ptq_ours", "ptq_ultralytics", "ptq_nncf_ac", "qat_ultralytics",
                     "qat_ours"]
    assert [c.name for c in select(None, quick=False)] == [c.name for c in CONTENDERS]
    assert [c.name for c in select("qat_ours_kd, ptq_ours", quick=True)] == ["ptq_ours", "qat_ours_kd"]
    with pytest.raises(ValueError, match="did you mean 'qat_ours_sensitive'"):
        select("qat_ours_sensitiv", quick=False)
    assert seeds_for(BY_NAME["qat_ours"], [0, 1]) == [0, 1]
    assert seeds_for(BY_NAME["ptq_ours"], [0, 1]) == [0]


def test_cache_reused_only_with_same_settings(tmp_path):
    c = BY_NAME["qat_ours"]
    base = {"model": "m.pt", "epochs": 2}
    d = tmp_path / "contenders" / "qat_ours" / "seed1"
    d.mkdir(parents=True)
    settings = {**base, "contender": "qat_ours", "flags": [], "ultralytics": {}, "seed": 1}
    (d / "result.json").write_text(json.dumps({"status": "ok", "settings": settings}))
    assert compare.cached(c, 1, base, tmp_path, retry_failed=False)["status"] == "ok"
    assert compare.cached(c, 1, {**base, "epochs": 3}, tmp_path, retry_failed=False) is None
    assert compare.cached(c, 0, base, tmp_path, retry_failed=False) is None
    (d / "result.json").write_text(json.dumps({"status": "failed", "settings": settings}))
    assert compare.cached(c, 1, base, tmp_path, retry_failed=False)["status"] == "failed"
    assert compare.cached(c, 1, base, tmp_path, retry_failed=True) is None


def test_step_timer_measures_gaps_between_optimizer_steps():
    import torch

    timer = StepTimer()
    timer.install()
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        for _ in range(4):
            time.sleep(0.02)
            p.grad = torch.ones(1)
            opt.step()
    finally:
        timer._handle.remove()
    median, steps = timer.summary()
    assert steps == 4 and 0.02 <= median < 0.2


def test_failed_contender_recorded_with_its_message(tmp_path):
    from benchmarks.run_contender import run

    spec = {"name": "ptq_ours", "seed": 0, "model": str(tmp_path / "missing.pt"), "data": str(tmp_path / "d.yaml"),
            "epochs": 0, "imgsz": 64, "batch": 2, "lr": 5e-4, "workers": 0, "device": "cpu", "out": str(tmp_path / "o"),
            "settings": {"x": 1}}
    r = run(spec)
    assert r["status"] == "failed" and r["settings"] == {"x": 1}
    assert "missing.pt" in r["error"] and r["wall_s"] > 0 and r["step_time_s"] is None


def test_aimet_options_are_part_of_the_cache_key_only_where_a_contender_has_them():
    base = {"model": "m.pt", "epochs": 2}
    assert "aimet" not in compare.contender_settings(BY_NAME["qat_ours"], 0, base)
    assert compare.contender_settings(BY_NAME["ptq_aimet_w4a8_adaround"], 0, base)["aimet"] == {
        "param_bw": 4, "adaround": True}

