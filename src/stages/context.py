"""What a run was asked for and what it resolved to: plain, frozen values every stage reads."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from src.config import QATConfig


@dataclass(frozen=True)
class RunRequest:
    """The command line's choices, read once from the parsed arguments (the stages never see the Namespace)."""

    model: str | None
    data: str | None
    config: str
    qconfig: str | None
    device: str | None
    img_size: int | None
    epochs: int | None
    save_dir: str
    output: str
    log_dir: str
    export_dir: str
    exist_ok: bool
    resume: bool
    eval: bool
    export: bool
    validate_exports: bool
    analyze: bool
    trust_checkpoint: bool = False
    save_dir_given: bool = False  # --save-dir on the command line (else a reused checkpoint's folder is the run's)

    @classmethod
    def from_args(cls, args) -> "RunRequest":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class RunContext:
    """One run, resolved: the config, data, device and output places every stage works with.

    Attributes:
        cfg: The resolved config (for a QAT checkpoint: its stored quantization, this run's training settings).
        data: Checked data dict; None for an export-only run without --data.
        data_yaml: The data YAML argument (the validator and trainer read it).
        rank: DDP rank, -1 when not distributed.
        run_dir: Where the run's outputs go (a QAT checkpoint's own folder when it is only evaluated or exported).
        output: File name of the saved model.
        fp32_source: The float checkpoint QAT started from, when known.
        train: Whether this run trains (or calibrates) a model rather than reusing a QAT checkpoint as is.
        trust_checkpoint: ``--trust-checkpoint``: FP32 checkpoints this run opens are fully unpickled.
        fp32_metrics: The FP32 source's mAP stored in the QAT checkpoint this run starts from (its FP32 row when the
            source is not at hand), else None.
    """

    cfg: QATConfig
    data: dict | None
    data_yaml: str
    device: torch.device
    rank: int
    run_dir: Path
    export_dir: Path
    log_dir: Path
    output: str
    fp32_source: str | None
    train: bool
    eval: bool
    export: bool
    validate_exports: bool
    analyze: bool
    trust_checkpoint: bool = False
    fp32_metrics: dict | None = None

    @property
    def tensorboard_dir(self) -> Path:
        """``--log-dir/<run folder name>``: each run (qat, qat2, ...) is its own run in TensorBoard."""
        return self.log_dir / self.run_dir.name
