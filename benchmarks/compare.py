#!/usr/bin/env python
"""Side-by-side comparison of our PTQ/QAT against Ultralytics' own PTQ (NNCF), QAT (ModelOpt) and KD.

    python benchmarks/compare.py --model models/pretrained/yolov8n_shapes.pt --data dataset/shapes/data.yaml \\
        --epochs 2 --imgsz 256 --out benchmarks/results [--quick] [--seeds 2] [--only qat_ours,ptq_ours]

Every contender starts from the same FP32 model and gets the same data, epochs and recipe (SGD, lr, momentum 0.937,
weight decay 5e-4, no warm-up, nominal batch = batch: our default config's train_params). Each contender and seed
runs in its own process (benchmarks/run_contender.py) with its own directory under <out>/contenders/<name>/seed<k>/,
so one crash does not end the comparison; a finished one is cached there and reused by the next run with the same
settings (--retry-failed reruns failures). Then one process times every contender's OpenVINO IR with interleaved
runs (benchmarks/latency.py), and <out>/results.json, results.md and results.png are written.

Fairness checks: the FP32 model's training log (<model>.results.csv beside it, or its Ultralytics run directory)
must show a val mAP plateau, and the val split should hold at least 500 images; both are warned about, recorded in
results.json, and --require-converged makes the first one an error.

--quick: the contenders marked quick (fp32_finetuned, ptq_ours, ptq_ultralytics, qat_ultralytics, qat_ours), one
seed, at most 1 epoch, the first --quick-train/--quick-val images of the dataset (copied to <out>/quick_data).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.contenders import FP32_REFERENCE, START_REFERENCE, Contender, select, seeds_for  # noqa: E402
from benchmarks.fairness import (check_convergence, find_results_csv, split_images, subset_dataset,  # noqa: E402
                                 val_split_warning)
from benchmarks.report import (aggregate, attach_latency, attach_step_ratio, attach_vs_start,  # noqa: E402
                               markdown_table, plot, results_doc, write_json)

LOG_TAIL_LINES = 15


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the FP32 start model (.pt trained on --data's classes)")
    p.add_argument("--data", required=True, help="Ultralytics dataset YAML")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of every training contender (default 2)")
    p.add_argument("--imgsz", type=int, default=256, help="image size (default 256)")
    p.add_argument("--batch", type=int, default=16, help="batch size = nominal batch size (default 16)")
    p.add_argument("--lr", type=float, default=0.0005, help="learning rate of every training contender (default 5e-4)")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers (default 2)")
    p.add_argument("--device", default=None, help="cpu or a GPU index (default: 0 when CUDA is available, else cpu)")
    p.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per training contender (default 2; --quick: 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0); seeds are seed, seed+1, ...")
    p.add_argument("--quick", action="store_true", help="quick subset: fewer contenders, 1 seed, <= 1 epoch, fewer "
                   "images")
    p.add_argument("--quick-train", type=int, default=64, help="--quick: train images (default 64)")
    p.add_argument("--quick-val", type=int, default=100, help="--quick: val images (default 100)")
    p.add_argument("--only", help="comma-separated contender names to run (any, also outside --quick)")
    p.add_argument("--retry-failed", action="store_true", help="rerun contenders whose cached result is a failure")
    p.add_argument("--fresh", action="store_true", help="ignore every cached contender result (e.g. after a code "
                   "change) and rerun all")
    p.add_argument("--timeout", type=float, default=None, help="seconds per contender run before it is killed and "
                   "recorded as failed (default: none)")
    p.add_argument("--threads", type=int, default=None, help="OpenVINO threads for latency (default: all cores)")
    p.add_argument("--latency-runs", type=int, default=None, help="timed runs per IR (default 50; --quick 20)")
    p.add_argument("--latency-warmup", type=int, default=None, help="warm-up runs per IR (default 10; --quick 5)")
    p.add_argument("--require-converged", action="store_true",
                   help="stop when the FP32 model's log does not show a plateau (default: warn)")
    p.add_argument("--plateau-window", type=int, default=5, help="epochs that must not improve mAP50-95 (default 5)")
    p.add_argument("--plateau-tol", type=float, default=0.01, help="mAP50-95 gain still counted as a plateau "
                   "(default 0.01)")
    return p


def machine_info() -> dict:
    """Where the numbers were measured: CPU, cores, GPU and the versions of every package that produced them."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "ultralytics", "openvino", "nncf", "nvidia-modelopt", "aimet-torch", "onnx", "onnxruntime"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["git"] = (commit + (" (uncommitted changes)" if dirty else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    info["summary"] = (f"{info['cpu']}, {info['cores']} cores" + (f", {info['gpu']}" if info["gpu"] else "") +
                       f"; torch {info['torch']}, ultralytics {info['ultralytics']}, openvino {info['openvino']}, "
                       f"nncf {info['nncf']}, modelopt {info['nvidia-modelopt']}, aimet-torch {info['aimet-torch']}" +
                       (f"; git {info['git']}" if info["git"] else ""))
    return info


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def log_tail(path: Path, n: int = LOG_TAIL_LINES) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def contender_settings(c: Contender, seed: int, base: dict) -> dict:
    """What a stored result must have been made with to be reused (AIMET's options only where there are some)."""
    extra = {"aimet": c.aimet} if c.aimet else {}
    return {**base, "contender": c.name, "flags": list(c.cli), "ultralytics": c.ultralytics, **extra, "seed": seed}


def run_one(c: Contender, seed: int, base: dict, out: Path, timeout: float | None) -> dict:
    """Run one contender seed in a fresh process; a crash or timeout becomes a failed result with the log's tail."""
    run_dir = out / "contenders" / c.name / f"seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a rerun must not mix with a previous run's artifacts
    run_dir.mkdir(parents=True)
    settings = contender_settings(c, seed, base)
    spec = {**base, "name": c.name, "seed": seed, "out": str(run_dir), "settings": settings}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    log = run_dir / "log.txt"
    t0 = time.time()
    try:
        with open(log, "w") as f:
            cmd = [sys.executable, str(ROOT / "benchmarks" / "run_contender.py"), str(run_dir / "spec.json")]
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = f"killed after the --timeout of {timeout:.0f} s"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    return {"name": c.name, "seed": seed, "status": "failed", "settings": settings, "wall_s": time.time() - t0,
            "error": f"the contender process ended ({rc}) without a result; last log lines ({log}):\n{log_tail(log)}"}


def cached(c: Contender, seed: int, base: dict, out: Path, retry_failed: bool) -> dict | None:
    """The stored result of this contender seed when it was made with the same settings."""
    path = out / "contenders" / c.name / f"seed{seed}" / "result.json"
    if not path.is_file():
        return None
    try:
        r = json.loads(path.read_text())
    except ValueError:
        return None
    if r.get("settings") != contender_settings(c, seed, base) or (retry_failed and r.get("status") == "failed"):
        return None
    return r


def run_latency(rows: list[dict], out: Path, imgsz: int, threads: int, warmup: int, runs: int) -> dict:
    items = [{"name": r["name"], "xml": r["export_path"]} for r in rows if r.get("export_path")]
    if not items:
        return {}
    spec_path, res_path, log = out / "latency_spec.json", out / "latency.json", out / "latency_log.txt"
    spec_path.write_text(json.dumps({"items": items, "imgsz": imgsz, "threads": threads, "warmup": warmup,
                                     "runs": runs, "out": str(res_path)}, indent=2))
    res_path.unlink(missing_ok=True)
    print(f"Timing {len(items)} OpenVINO IRs: {warmup} warm-up + {runs} interleaved runs each, default and f32 "
          f"precision, batch 1, {threads} threads...", flush=True)
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), str(spec_path)], stdout=f,
                            stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if res_path.is_file():
        return json.loads(res_path.read_text())
    err = f"latency process failed ({rc}): {log_tail(log, 5)}"
    return {it["name"]: {"error": err} for it in items}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    model, data = Path(a.model).resolve(), Path(a.data).resolve()
    if not model.is_file():
        print(f"ERROR: --model {a.model}: no such file; pass the FP32 start model, e.g. models/pretrained/"
              "yolov8n_shapes.pt (scripts/train_fp32.py makes it)", file=sys.stderr)
        return 2
    if not data.is_file():
        print(f"ERROR: --data {a.data}: no such file; pass an Ultralytics dataset YAML", file=sys.stderr)
        return 2
    try:
        contenders = select(a.only, a.quick)
    except ValueError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    for flag in ("epochs", "seeds", "batch", "imgsz"):
        if getattr(a, flag) < 1:
            print(f"ERROR: --{flag} {getattr(a, flag)}: must be at least 1", file=sys.stderr)
            return 2

    from src.env import prepare_environment

    prepare_environment()
    import torch

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    epochs = min(a.epochs, 1) if a.quick else a.epochs
    n_seeds = 1 if a.quick else a.seeds
    seeds = list(range(a.seed, a.seed + n_seeds))
    device = a.device or ("0" if torch.cuda.is_available() else "cpu")
    warnings: list[str] = []

    conv = check_convergence(find_results_csv(model), a.plateau_window, a.plateau_tol)
    print(f"FP32 start model {model}: {conv.message}")
    if not conv.converged:
        warnings.append(f"FP32 start model not shown converged: {conv.message}")
        if a.require_converged:
            print("ERROR: --require-converged: train the FP32 model until its val mAP plateaus (e.g. more --epochs "
                  "in scripts/train_fp32.py), then rerun", file=sys.stderr)
            return 2
    if a.quick:
        data = subset_dataset(data, out / "quick_data", a.quick_train, a.quick_val)
        print(f"--quick: first {a.quick_train} train / {a.quick_val} val images copied to {data.parent}")
    n_train, n_val = len(split_images(data, "train")), len(split_images(data, "val"))
    w = val_split_warning(n_val)
    if w:
        warnings.append(w + (" (--quick uses --quick-val images; the full mode uses the whole split)" if a.quick
                             else ""))
    for msg in warnings:
        print(f"WARNING: {msg}")

    # the cache key: a changed model file, dataset size or recipe reruns the contender
    base = {"model": str(model), "model_sha256": file_digest(model), "data": str(data),
            "data_images": [n_train, n_val], "epochs": epochs,
            "imgsz": a.imgsz, "batch": a.batch, "lr": a.lr, "workers": a.workers, "device": device}
    plan = [(c, s) for c in contenders for s in seeds_for(c, seeds)]
    print(f"{len(plan)} contender runs: " + ", ".join(f"{c.name}[{s}]" for c, s in plan), flush=True)
    results: dict[str, list[dict]] = {c.name: [] for c in contenders}
    for i, (c, seed) in enumerate(plan, 1):
        prior = results[c.name]
        r = None if a.fresh else cached(c, seed, base, out, a.retry_failed)
        how = "cached"
        if r is None and prior and all(p.get("status") == "skipped" for p in prior):
            r = {**prior[0], "seed": seed, "wall_s": 0.0}  # a missing capability does not appear with another seed
            how = "skipped like seed " + str(prior[0]["seed"])
        if r is None:
            print(f"[{i}/{len(plan)}] {c.name} seed {seed}: running (log: {out / 'contenders' / c.name}/seed{seed}/"
                  "log.txt)", flush=True)
            r = run_one(c, seed, base, out, a.timeout)
            how = "ran"
        results[c.name].append(r)
        err = f" - {r['error'].splitlines()[0][:300]}" if r.get("error") else ""
        print(f"[{i}/{len(plan)}] {c.name} seed {seed}: {r['status']} ({how}, {r.get('wall_s') or 0:.0f} s){err}",
              flush=True)

    rows = [aggregate(c.name, results[c.name], c.description) for c in contenders]
    threads = a.threads or os.cpu_count() or 1
    latency = run_latency(rows, out, a.imgsz, threads, a.latency_warmup if a.latency_warmup is not None else
                          (5 if a.quick else 10), a.latency_runs if a.latency_runs is not None else
                          (20 if a.quick else 50))
    attach_latency(rows, latency)
    attach_step_ratio(rows, FP32_REFERENCE)
    attach_vs_start(rows, START_REFERENCE)
    settings = {**base, "seeds": seeds, "quick": a.quick, "latency_threads": threads, "warnings": warnings,
                "n_val_images": n_val, "total_wall_s": round(time.time() - t_start, 1),
                "recipe": "SGD, lr {}, cosine to lr x 0.01, momentum/weight decay/warm-up from configs/qat_config.yaml "
                          "train_params, nominal batch = batch, EMA".format(a.lr)}
    doc = results_doc(rows, machine=machine_info(), date=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                      command="python benchmarks/compare.py " + shlex.join(argv), settings=settings,
                      fp32={"path": str(model), "converged": conv.converged, "message": conv.message,
                            "epochs": conv.epochs, "best_map50_95": conv.best})
    write_json(doc, out / "results.json")
    md = markdown_table(doc)
    (out / "results.md").write_text(md)
    plot(doc, out / "results.png")
    print(md)
    print(f"Results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} "
          f"({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
