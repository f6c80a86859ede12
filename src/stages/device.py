"""Devices and processes: --device resolution, the torchrun launcher and joining/leaving the process group."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist

from src.env import REPO_ROOT
from src.errors import QATError

LOGGER = logging.getLogger("yolov8_qat")


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
    script = REPO_ROOT / "train_qat.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={len(ids)}", f"--master_port={port}",
           str(script), *argv]
    LOGGER.info(f"DDP: launching {len(ids)} processes: {' '.join(cmd)}")
    return subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(ids)}).returncode


def init_distributed(device: torch.device) -> int:
    """Join the process group when started by torchrun; returns the rank (-1 when not distributed)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return -1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() > 0:
        LOGGER.setLevel(logging.WARNING)
    return dist.get_rank()


def leave_distributed(rank: int) -> bool:
    """Leave the process group after training; True for a DDP helper (rank > 0), which stops there."""
    if rank >= 0:
        dist.destroy_process_group()
    return rank > 0
