"""`train_qat.py` command line: argument parsing, config precedence, and the stage pipeline.

Stages: resolve data + model -> prepare (fuse, place quantizers) -> calibrate -> QAT epochs -> evaluate -> analyse ->
export -> validate exports. Each stage logs where its outputs went.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from src.config import ModelConfig, OverrideError, QATParams, QuantizationConfig, TrainParams
from src.env import prepare_environment
from src.errors import QATError
from src.quantization.presets import PRESET_NAMES

LOGGER = logging.getLogger("yolov8_qat")

DEFAULT_CONFIG = "configs/qat_config.yaml"
DEFAULT_SAVE_DIR = "models/checkpoints/qat"
DEFAULT_OUTPUT = "quantized_model.pt"
DEFAULT_LOG_DIR = "logs/qat"
DEFAULT_EXPORT_DIR = "models/exported"


class _StoreGiven(argparse.Action):
    """Stores the value and sets ``<dest>_given``: an explicit flag can mean more than its default value does."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends the default only where the help text does not already say it (config-derived defaults do)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text or action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The parser; every default named in its help is read from the config dataclasses and the presets."""
    tp, qp, quant = TrainParams(), QATParams(), QuantizationConfig()
    p = argparse.ArgumentParser(
        prog="train_qat.py",
        description="Quantization-aware training for Ultralytics YOLOv8 detectors: prepare, calibrate, train, "
        "evaluate, analyse and export INT8 models.",
        formatter_class=_HelpFormatter,
    )
    b = p.add_argument_group("basic parameters")
    b.add_argument("--model", default=None,
                   help="FP32 checkpoint (.pt), model YAML (yolov8n.yaml: random init), bare name looked up in "
                   "models/pretrained/ then the working directory, or a QAT checkpoint of this toolkit "
                   f"(default: models/pretrained/yolov8{{model.variant}}.pt = yolov8{ModelConfig().variant}.pt)")
    b.add_argument("--data", default=None,
                   help="Ultralytics dataset YAML (default: coco.yaml; optional for export-only runs)")
    b.add_argument("--config", default=DEFAULT_CONFIG, help="QAT configuration file")
    q = p.add_argument_group("QAT parameters")
    q.add_argument("--qconfig", default=None,
                   help=f"quantization preset: {', '.join(PRESET_NAMES)}; replaces the config's "
                   f"weight/activation/fake_quantize sections (default: quantization.default_qconfig = "
                   f"{quant.default_qconfig})")
    q.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=None,
                   help="fold BatchNorm into conv weights before weight fake-quant (default: qat_params.fuse_modules "
                   f"= {qp.fuse_modules}); --no-fuse keeps BN unfused")
    head = q.add_mutually_exclusive_group()
    head.add_argument("--keep-detection-head", dest="skip_head", action="store_false", default=None,
                      help=f"quantize the Detect head convs (default: qat_params.skip_detection_head = "
                      f"{qp.skip_detection_head})")
    head.add_argument("--skip-detection-head", dest="skip_head", action="store_true", default=None,
                      help=f"keep the Detect head convs in float (default: qat_params.skip_detection_head = "
                      f"{qp.skip_detection_head})")
    t = p.add_argument_group("training parameters")
    t.add_argument("--epochs", type=int, default=None,
                   help=f"QAT epochs; 0 = calibration only (PTQ) (default: {tp.epochs})")
    t.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {tp.batch_size})")
    t.add_argument("--img-size", type=int, default=None, help=f"input image size (default: {tp.img_size})")
    t.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {tp.lr:g})")
    t.add_argument("--device", default=None,
                   help=f"cuda, cpu, 0, 0,1 or cuda:N (default: {tp.device}, falling back to cpu when no GPU exists)")
    t.add_argument("--workers", type=int, default=None, help=f"dataloader workers (default: {tp.workers})")
    t.add_argument("--resume", action="store_true", help="continue the unfinished run in --save-dir")
    o = p.add_argument_group("output parameters")
    o.add_argument("--save-dir", default=DEFAULT_SAVE_DIR, action=_StoreGiven,
                   help="directory to save results (an existing QAT checkpoint only evaluated, exported or analysed: "
                   f"its own folder unless --save-dir is given) (default: {DEFAULT_SAVE_DIR})")
    p.set_defaults(save_dir_given=False)
    o.add_argument("--output", default=DEFAULT_OUTPUT, help="output model name")
    o.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help="TensorBoard log directory")
    o.add_argument("--exist-ok", action="store_true",
                   help="reuse --save-dir even if it holds a finished run (default: numbered sibling qat2, qat3, ...)")
    a = p.add_argument_group("advanced parameters")
    a.add_argument("--distillation", action="store_true", default=None,
                   help=f"use knowledge distillation (default: qat_params.use_distillation = {qp.use_distillation})")
    a.add_argument("--teacher-model", default=None, help="teacher checkpoint (default: the FP32 source model)")
    a.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the FP32 checkpoints this run opens (--model, --teacher-model, a QAT checkpoint's "
                   "FP32 source) fully, which runs any code they hold: only for files you vouch for (default: load "
                   "only what genuine Ultralytics checkpoints contain, refuse the rest)")
    a.add_argument("--mixed-precision", action="store_true", default=None,
                   help="sensitivity-driven per-layer bit widths (default: qat_params.use_mixed_precision = "
                   f"{qp.use_mixed_precision})")
    a.add_argument("--adaround", action="store_true", default=None,
                   help="learned weight rounding (AdaRound) after calibration (default: qat_params.adaround = "
                   f"{qp.adaround})")
    a.add_argument("--oscillation-dampening", type=float, default=None, metavar="LAMBDA",
                   help="weight of the loss term pulling latent weights to their grid points during QAT (Nagel et "
                   f"al. 2022), ramped up over training; 0 = off (default: qat_params.oscillation_dampening = "
                   f"{qp.oscillation_dampening:g})")
    a.add_argument("--analyze", action="store_true", help="write the quantization analysis report")
    a.add_argument("--seed", type=int, default=None, help=f"random seed (default: {tp.seed})")
    a.add_argument("--eval", action="store_true", help="evaluate FP32 and quantized models after training")
    a.add_argument("--export", action="store_true", help="export after training (formats from export.formats)")
    a.add_argument("--export-dir", default=DEFAULT_EXPORT_DIR, help="directory for exports")
    a.add_argument("--validate-exports", action="store_true", help="validate every export (implies --export)")
    a.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity; debug also prints full tracebacks")
    return p


# dotted config key -> (argparse dest, the flag as a user types it); an invalid value is reported against the flag
OVERRIDE_FLAGS = {
    "train_params.epochs": ("epochs", "--epochs"),
    "train_params.batch_size": ("batch_size", "--batch-size"),
    "train_params.img_size": ("img_size", "--img-size"),
    "train_params.lr": ("lr", "--lr"),
    "train_params.seed": ("seed", "--seed"),
    "train_params.workers": ("workers", "--workers"),
    "train_params.device": ("device", "--device"),
    "qat_params.fuse_modules": ("fuse", "--fuse"),
    "qat_params.skip_detection_head": ("skip_head", "--skip-detection-head"),
    "qat_params.use_distillation": ("distillation", "--distillation"),
    "qat_params.use_mixed_precision": ("mixed_precision", "--mixed-precision"),
    "qat_params.adaround": ("adaround", "--adaround"),
    "qat_params.oscillation_dampening": ("oscillation_dampening", "--oscillation-dampening"),
    "distillation.teacher_model": ("teacher_model", "--teacher-model"),
    "quantization.default_qconfig": ("qconfig", "--qconfig"),
}


def cli_overrides(args: argparse.Namespace) -> dict:
    """Dotted config keys set explicitly on the command line (they win over the YAML); --qconfig travels apart."""
    pairs = {k: getattr(args, dest) for k, (dest, _) in OVERRIDE_FLAGS.items() if dest != "qconfig"}
    return {k: v for k, v in pairs.items() if v is not None}


def error_line(err: Exception, args: argparse.Namespace) -> str:
    """The one line printed for ``err``; an invalid flag value names the flag, not the config file."""
    if isinstance(err, OverrideError) and err.key in OVERRIDE_FLAGS:
        dest, flag = OVERRIDE_FLAGS[err.key]
        return f"ERROR: {flag} {getattr(args, dest)}: {err.reason} (config key {err.key})"
    return f"ERROR: {err}"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(message)s", stream=sys.stdout, force=True)
    LOGGER.setLevel(getattr(logging, level.upper()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    prepare_environment()
    try:
        # deferred: the stages import torch and the whole toolkit, which --help and argument errors do not need
        from src.pipeline import run
        from src.stages.device import launch_ddp

        if args.device and "," in args.device and "LOCAL_RANK" not in os.environ:
            return launch_ddp(argv, args.device)

        run(args, cli_overrides(args))
        return 0
    except KeyboardInterrupt:
        LOGGER.error("Interrupted.")
        return 130
    except (QATError, OSError) as e:  # OSError: an output that became unwritable mid-run (disk full, permissions)
        if args.log_level == "debug":
            LOGGER.exception(str(e))
        else:
            LOGGER.error(error_line(e, args))
        return 1
