"""The train_qat.py pipeline: one function per stage, run in order by :func:`run`."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from src.errors import QATError
from src.training.data import seed_everything

LOGGER = logging.getLogger("yolov8_qat")


DEFAULT_DATA = "coco.yaml"


# --------------------------------------------------------------------------------------------------------------------
def select_device(requested: str | None, default: str = "cuda") -> torch.device:
    """Resolve --device. The default (cuda) falls back to CPU with a log line; a named GPU that is absent is an error.

    Args:
        requested: The --device value, None when not given.
        default: train_params.device.
    """
    value = str(requested if requested is not None else default).strip().lower()
    if value == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if "," in value:
        if local_rank < 0:
            raise QATError(f"--device {value}: multi-GPU runs are started by train_qat.py's launcher (torchrun)")
        return torch.device("cuda", local_rank)  # torchrun child: CUDA_VISIBLE_DEVICES holds the listed GPUs
    if value in ("cuda", "gpu", ""):
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        LOGGER.info("No CUDA GPU found: using the CPU (pass --device cpu to silence this)")
        return torch.device("cpu")
    index = value.split(":", 1)[1] if value.startswith("cuda:") else value
    if not index.isdigit():
        raise QATError(f"--device {value!r} is not a device; use cpu, cuda, a GPU index like 0, or cuda:0")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index) >= n:
        raise QATError(
            f"--device {value}: CUDA device {index} is not available (this machine has {n} CUDA device"
            f"{'s' if n != 1 else ''}); use --device cpu" + (f" or an index below {n}" if n else "")
        )
    return torch.device("cuda", int(index))


def next_run_dir(save_dir: Path, output: str, exist_ok: bool) -> Path:
    """``save_dir`` itself, or a numbered sibling (qat2, qat3, ...) when it already holds a finished run."""
    def finished(d: Path) -> bool:
        return (d / output).exists() or (d / "weights" / "last.pt").exists()

    if exist_ok or not finished(save_dir):
        return save_dir
    n = 2
    while finished(save_dir.with_name(f"{save_dir.name}{n}")):
        n += 1
    new = save_dir.with_name(f"{save_dir.name}{n}")
    LOGGER.info(f"{save_dir} holds a finished run; writing to {new} (pass --exist-ok to reuse it)")
    return new


@contextmanager
def graceful_stop(trainer):
    """First SIGINT/SIGTERM asks the trainer to stop after saving a resumable checkpoint; a second one aborts."""
    previous = {}

    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        LOGGER.warning(f"Received {signal.Signals(signum).name}: saving a resumable checkpoint and stopping "
                       "(signal again to abort)")
        trainer.stop_requested = True

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def write_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def launch_ddp(argv: list[str], devices: str) -> int:
    """Re-run train_qat.py under torchrun, one process per listed GPU (what Ultralytics does for device=0,1)."""
    ids = [d.strip() for d in devices.split(",") if d.strip()]
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    bad = [d for d in ids if not d.isdigit() or int(d) >= n]
    if bad:
        raise QATError(f"--device {devices}: CUDA device(s) {', '.join(bad)} not available (this machine has {n} "
                       f"CUDA device{'s' if n != 1 else ''}); list existing GPU indices or use --device cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).resolve().parents[1] / "train_qat.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={len(ids)}", f"--master_port={port}",
           str(script), *argv]
    LOGGER.info(f"DDP: launching {len(ids)} processes: {' '.join(cmd)}")
    return subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids)}).returncode


def init_distributed(device: torch.device) -> int:
    """Join the process group when started by torchrun; returns the rank (-1 when not distributed)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return -1
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() > 0:
        LOGGER.setLevel(logging.WARNING)
    return dist.get_rank()


# --------------------------------------------------------------------------------------------------------------------
def _check_classes(model, data: dict, model_desc: str) -> None:
    nc_model = int(model.yaml.get("nc", len(getattr(model, "names", {}) or {})))
    if nc_model != int(data["nc"]):
        raise QATError(
            f"{model_desc} predicts {nc_model} classes but {data.get('yaml_file', 'the data YAML')} has {data['nc']}: "
            "QAT starts from a model trained on the dataset's classes. Fine-tune it in FP32 first, e.g. "
            f"`yolo train model={model_desc} data=<your data.yaml>`, then quantize the result."
        )


def run(args, overrides: dict) -> dict:
    """Run the pipeline for parsed CLI ``args``; returns a summary dict (paths and metrics)."""
    from src.config import load_config
    from src.data.resolve import load_fp32_model, resolve_data, resolve_model_path
    from src.models.yolov8_qat import build_from_checkpoint, prepare_qat_model

    summary: dict = {}
    save_dir = Path(args.save_dir)
    mp = ptq_state = None
    if args.resume:
        return resume(args, overrides)

    cfg = load_config(args.config, overrides, qconfig=args.qconfig)
    resolved = resolve_model_path(args.model, cfg.model.variant)
    is_qat = resolved.kind == "qat_checkpoint"
    seed_everything(cfg.train_params.seed)  # model init (YAML), calibration sampling and training all follow it
    train_requested = (not is_qat) or args.epochs is not None
    needs_data = train_requested or args.eval or args.validate_exports or args.analyze or args.data is not None
    args.data = args.data or DEFAULT_DATA
    data = resolve_data(args.data) if needs_data else None
    device = select_device(args.device, cfg.train_params.device)
    rank = init_distributed(device)
    if data is not None:
        data_report(cfg, data, train=train_requested, val=args.eval or args.validate_exports)

    if is_qat:
        ckpt = torch.load(resolved.path, map_location="cpu", weights_only=True)
        model, stored = build_from_checkpoint(ckpt)
        # the checkpoint's quantization (placement, ranges) is kept; training settings come from this run
        cfg.quantization, cfg.layer_configs, cfg.mixed_precision = (stored.quantization, stored.layer_configs,
                                                                    stored.mixed_precision)
        cfg.qat_params.fuse_modules = stored.qat_params.fuse_modules
        cfg.qat_params.skip_detection_head = stored.qat_params.skip_detection_head
        cfg.qat_params.freeze_observers_epoch = 0  # fine-tuning keeps the learned ranges fixed
        cfg.qat_params.freeze_bn_epoch = 0
        if args.img_size is None:  # evaluate/export/fine-tune at the size the checkpoint was trained at
            cfg.train_params.img_size = stored.train_params.img_size
        if args.qconfig:
            LOGGER.warning("--qconfig is ignored for a QAT checkpoint: its placement and quantizers are kept")
        fp32_source = ckpt.get("fp32_source")
        LOGGER.info(f"Loaded QAT checkpoint {resolved.path}")
        if data is not None:
            _check_classes(model, data, str(resolved.path))
        if not train_requested:  # eval-only / export-only: outputs go beside --model and under --export-dir
            out_dir = Path(resolved.path).parent
            if args.eval:
                summary["metrics"] = evaluate_stage(model, None if not fp32_source else fp32_source, args, cfg, data,
                                                    device, out_dir, label=ckpt.get("stage", "qat"))
            if args.export or args.validate_exports:
                summary["exports"] = export_stage(model, cfg, args, data, device, Path(resolved.path))
            if args.analyze:
                analysis_stage(model, cfg, args, data, device, out_dir, fp32_source, None, ckpt.get("stage", "qat"))
            return summary
        fp32_model = None
        if fp32_source and Path(fp32_source).exists():
            fp32_model = load_fp32_model(resolve_model_path(fp32_source, cfg.model.variant))
        if cfg.qat_params.use_mixed_precision:
            LOGGER.warning("--mixed-precision is ignored when fine-tuning a QAT checkpoint: its bit widths are kept")
    else:
        fp32_model = load_fp32_model(resolved, nc=data["nc"] if resolved.kind == "yaml" else None)
        fp32_source = str(resolved.path) if resolved.kind == "checkpoint" else None
        _check_classes(fp32_model, data, str(resolved.path))
        model = copy.deepcopy(fp32_model)
        if cfg.qat_params.use_mixed_precision:
            from src.quantization.mixed_precision import mixed_precision_stage

            mp = mixed_precision_stage(fp32_model, cfg, data, str(args.data), device)
        t0 = time.time()
        placement = prepare_qat_model(model, cfg, imgsz=64, bit_overrides=mp.bit_overrides if mp else None)
        model.qat_bit_overrides = mp.bit_overrides if mp else {}
        LOGGER.info(f"Prepared model in {time.time() - t0:.1f}s: "
                    f"{sum(l.quantized for l in placement.layers)}/{len(placement.layers)} convs quantized, "
                    f"{len(placement.groups)} activation quantizers")

    run_dir = next_run_dir(save_dir, args.output, args.exist_ok)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(run_dir / "config.yaml")
    (run_dir / "placement.txt").write_text(model.qat_placement.report() + "\n")
    write_json(model.qat_placement.to_dict(), run_dir / "placement.json")
    LOGGER.debug(model.qat_placement.report())
    if mp:
        mp.write(run_dir)

    if not is_qat:
        calibrate_stage(model, cfg, data, device)
        if args.analyze and cfg.train_params.epochs > 0:  # the PTQ baseline of the report
            ptq_state = copy.deepcopy(model.state_dict())
    stage = "ptq" if cfg.train_params.epochs == 0 else "qat"
    extra = {"fp32_source": fp32_source, "stage": stage, "data": str(args.data)}
    final = model
    if cfg.train_params.epochs > 0 or (cfg.qat_params.post_qat_fine_tuning and cfg.qat_params.fine_tuning_epochs):
        final = train_stage(model, cfg, data, args, device, run_dir, extra, fp32_model=fp32_model)
    if rank >= 0:
        torch.distributed.destroy_process_group()
    if rank > 0:  # DDP helpers stop here; the main process saves, evaluates and exports
        return summary
    from src.models.yolov8_qat import qat_checkpoint
    from src.training.checkpoint import atomic_save

    out_path = atomic_save(qat_checkpoint(final, cfg, extra=extra), run_dir / args.output)
    LOGGER.info(f"Saved {stage.upper()} model to {out_path}")
    summary["model"] = str(out_path)
    if args.eval:
        summary["metrics"] = evaluate_stage(final, fp32_model, args, cfg, data, device, run_dir, label=stage)
        if mp and stage == "qat":
            mp.add_point("mixed (chosen)", mp.assignment, summary["metrics"][stage]["map50_95"], "qat")
            mp.write(run_dir)
    if args.export or args.validate_exports:
        summary["exports"] = export_stage(final, cfg, args, data, device, out_path)
    if args.analyze:
        ptq_model = None
        if ptq_state is not None:
            ptq_model = copy.deepcopy(final)
            ptq_model.load_state_dict(ptq_state)
        analysis_stage(final, cfg, args, data, device, run_dir, fp32_model, ptq_model, stage,
                       mp.to_dict() if mp else None)
    LOGGER.info(f"Results saved to {run_dir}")
    summary["run_dir"] = str(run_dir)
    return summary


def data_report(cfg, data: dict, *, train: bool, val: bool) -> dict:
    """Check the splits this run reads before any model work; count what Ultralytics would drop."""
    from src.training.data import check_split, hyperparameters

    hyp = hyperparameters(cfg, mode="val")
    report = {}
    for split, needed in (("train", train), ("val", val)):
        if needed:
            report[split] = check_split(hyp, data, split)
    return report


def calibrate_stage(model, cfg, data, device) -> int:
    """Calibrate on ``qat_params.calibration_images`` training images (no augmentation)."""
    from src.quantization.calibration import calibrate
    from src.training.data import build_loader, hyperparameters, preprocess_batch

    qp, tp = cfg.qat_params, cfg.train_params
    hyp = hyperparameters(cfg, mode="val")
    model.to(device)
    stride = max(int(model.stride.max()), 32)
    loader = build_loader(hyp, data, "train", qp.calibration_batch_size, mode="val", stride=stride, shuffle=True,
                          seed=tp.seed)
    batches = (preprocess_batch(b, device)["img"] for b in loader)
    n = calibrate(model, batches, qp.calibration_images)
    return n


def train_stage(model, cfg, data, args, device, run_dir: Path, extra: dict, resume_state: dict | None = None,
                fp32_model=None):
    from src.training.trainer import QATTrainer

    trainer = QATTrainer(model, cfg, data, args.data, device, run_dir, Path(args.log_dir), args.output,
                         checkpoint_extra=extra)
    if cfg.qat_params.use_distillation:  # before load_training_state: the adapters are an optimizer group
        from src.training.distill import attach_distiller

        attach_distiller(trainer, cfg, fp32_model, data)
    if resume_state is not None:
        trainer.load_training_state(resume_state)
    with graceful_stop(trainer):
        final = trainer.train()
    if trainer.stop_requested:
        raise QATError(f"training stopped at epoch {trainer.state.epoch + 1}; resumable checkpoint saved to "
                       f"{run_dir / 'weights' / 'last.pt'}. Continue with: python train_qat.py --resume "
                       f"--save-dir {run_dir}")
    return final


def analysis_stage(model, cfg, args, data, device, out_dir: Path, fp32_model, ptq_model, stage: str,
                   mixed_precision: dict | None = None) -> dict:
    """--analyze: the report under ``out_dir/analysis`` (FP32 / PTQ / QAT mAP, sizes, layer errors, latency)."""
    from src.analysis.report import run_analysis
    from src.data.resolve import load_fp32_model, resolve_model_path

    if isinstance(fp32_model, str):
        fp32_model = load_fp32_model(resolve_model_path(fp32_model, cfg.model.variant)) if Path(fp32_model).exists() \
            else None
    return run_analysis(model, cfg, out_dir, data=data, data_yaml=str(args.data), device=device,
                        fp32_model=fp32_model, ptq_model=ptq_model, stage=stage, export_dir=Path(args.export_dir),
                        log_dir=Path(args.log_dir), mixed_precision=mixed_precision)


def evaluate_stage(model, fp32_model, args, cfg, data, device, out_dir: Path, label: str) -> dict:
    """Evaluate the FP32 source (when known) and the quantized model; write metrics.json and print a table."""
    from src.data.resolve import load_fp32_model, resolve_model_path
    from src.training.evaluate import evaluate

    tp = cfg.train_params
    results = {}
    if isinstance(fp32_model, str):
        fp32_model = load_fp32_model(resolve_model_path(fp32_model, cfg.model.variant))
    if fp32_model is not None:
        results["fp32"] = evaluate(fp32_model, args.data, imgsz=tp.img_size, batch=tp.batch_size, device=device)
    results[label] = evaluate(model, args.data, imgsz=tp.img_size, batch=tp.batch_size, device=device)
    path = write_json(results, out_dir / "metrics.json")
    LOGGER.info(f"\n{'model':<8} {'mAP50':>8} {'mAP50-95':>9}")
    for k, v in results.items():
        LOGGER.info(f"{k:<8} {v['map50']:>8.4f} {v['map50_95']:>9.4f}")
    LOGGER.info(f"Metrics written to {path}")
    return results


def export_stage(model, cfg, args, data, device, checkpoint: Path) -> dict:
    """Export to ``export.formats`` under --export-dir; with --validate-exports gate on validate_exports' checks."""
    from dataclasses import asdict

    from src.export.pipeline import export_and_validate

    export_dir = Path(args.export_dir)
    res = export_and_validate(model, cfg, export_dir, Path(args.output).stem,
                              data=args.data if data is not None else None, checkpoint=checkpoint,
                              validate=args.validate_exports, device=str(device))
    for fmt, paths in res["exports"].items():
        LOGGER.info(f"Exported {fmt}: {paths[0]}")
    if res["validation"] is not None:
        write_json({"exports": [asdict(r) for r in res["validation"]]}, export_dir / "validation.json")
        if not res["passed"]:
            failed = [f"{r.path}: {'; '.join(r.reasons)}" for r in res["validation"] if not r.passed]
            raise QATError("export validation failed: " + " | ".join(failed))
    return {k: [str(p) for p in v] for k, v in res["exports"].items()}


def resume(args, overrides: dict) -> dict:
    """Continue the unfinished run in --save-dir from weights/last.pt."""
    from src.data.resolve import resolve_data
    from src.models.yolov8_qat import build_from_checkpoint, qat_checkpoint
    from src.training.checkpoint import atomic_save

    run_dir = Path(args.save_dir)
    last = run_dir / "weights" / "last.pt"
    if not last.exists():
        raise QATError(f"--resume: no {last} to resume from; start a new run without --resume")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    st = ckpt.get("train_state")
    if not st:
        raise QATError(f"--resume: {last} holds no training state")
    model, cfg = build_from_checkpoint(ckpt)
    for key in ("train_params.batch_size", "train_params.img_size", "train_params.workers", "train_params.device"):
        if key in overrides:  # e.g. a smaller batch after running out of memory; the recipe itself stays
            setattr(cfg.train_params, key.split(".")[1], overrides[key])
    total = cfg.train_params.epochs + (cfg.qat_params.fine_tuning_epochs if cfg.qat_params.post_qat_fine_tuning else 0)
    if int(st["epoch"]) >= total:
        raise QATError(f"--resume: the run in {run_dir} already finished all {total} epochs; nothing to resume")
    data_arg = args.data or ckpt.get("data") or DEFAULT_DATA
    args.data = data_arg
    data = resolve_data(data_arg)
    device = select_device(args.device, cfg.train_params.device)
    rank = init_distributed(device)
    LOGGER.info(f"Resuming {run_dir} from epoch {int(st['epoch']) + 1}/{total}")
    extra = {k: ckpt[k] for k in ("fp32_source", "stage", "data", "distill_adapters") if k in ckpt}
    final = train_stage(model, cfg, data, args, device, run_dir, extra, resume_state=st)
    if rank >= 0:
        torch.distributed.destroy_process_group()
    if rank > 0:
        return {}
    out = atomic_save(qat_checkpoint(final, cfg, extra=extra), run_dir / args.output)
    LOGGER.info(f"Saved QAT model to {out}")
    summary = {"model": str(out), "run_dir": str(run_dir)}
    if args.eval:
        summary["metrics"] = evaluate_stage(final, extra.get("fp32_source"), args, cfg, data, device, run_dir, "qat")
    return summary
