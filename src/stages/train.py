"""Train: QAT (and optional post-QAT fine-tuning) with graceful stopping, then the saved checkpoint."""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from src.data.resolve import resolve_model_path
from src.errors import QATError
from src.models.yolov8_qat import qat_checkpoint
from src.stages.context import RunContext
from src.training.checkpoint import atomic_save
from src.training.distill import attach_distiller
from src.training.trainer import QATTrainer

LOGGER = logging.getLogger("yolov8_qat")


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


def check_teacher(cfg) -> None:
    """A distillation run's teacher (``distillation.teacher_model`` / --teacher-model) exists, before any model work.

    Raises:
        QATError: Names the teacher and where it was looked for.
    """
    source = cfg.distillation.teacher_model
    if cfg.qat_params.use_distillation and source:
        try:
            resolve_model_path(source, cfg.model.variant)
        except QATError as err:
            raise QATError(f"distillation teacher (--teacher-model / distillation.teacher_model) {source}: {err}") \
                from None


def train_stage(ctx: RunContext, model: nn.Module, extra: dict, *, fp32_model: nn.Module | None = None,
                resume_state: dict | None = None) -> nn.Module:
    """Train ``model`` in ``ctx.run_dir``; returns the final (best) model.

    Args:
        extra: Entries every checkpoint carries (fp32_source, stage, data; distillation adds its adapters).
        fp32_model: The float source, the self-distillation teacher.
        resume_state: ``train_state`` of the checkpoint being resumed.

    Raises:
        QATError: Training was stopped by a signal (a resumable checkpoint is saved first).
    """
    trainer = QATTrainer(model, ctx.cfg, ctx.data, ctx.data_yaml, ctx.device, ctx.run_dir, ctx.tensorboard_dir, ctx.output,
                         checkpoint_extra=extra)
    if ctx.cfg.qat_params.use_distillation:  # before load_training_state: the adapters are an optimizer group
        attach_distiller(trainer, ctx.cfg, fp32_model, ctx.data, trusted=ctx.trust_checkpoint)
    if resume_state is not None:
        trainer.load_training_state(resume_state)
    with graceful_stop(trainer):
        final = trainer.train()
    if trainer.stop_requested:
        raise QATError(f"training stopped at epoch {trainer.state.epoch + 1}; resumable checkpoint saved to "
                       f"{ctx.run_dir / 'weights' / 'last.pt'}. Continue with: python train_qat.py --resume "
                       f"--save-dir {ctx.run_dir}")
    return final


def save_model(ctx: RunContext, model: nn.Module, extra: dict, stage: str) -> Path:
    """The QAT checkpoint of ``model`` as ``ctx.run_dir / ctx.output``."""
    path = atomic_save(qat_checkpoint(model, ctx.cfg, extra=extra), ctx.run_dir / ctx.output)
    LOGGER.info(f"Saved {stage.upper()} model to {path}")
    return path
