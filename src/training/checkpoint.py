"""Atomic checkpoint files and RNG state as plain data (everything loads with torch.load(weights_only=True))."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from src.errors import ModelLoadError


def _file_mode() -> int:
    """0666 less the process umask: the mode ``open()`` gives every other output (0644 under the usual umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temp file in the same directory, flush + fsync, then rename over ``path`` (mode 0644).

    A crash or kill mid-write leaves the previous file intact (rename is atomic on POSIX within one filesystem).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; a checkpoint is shared like every other output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint_file(path: str | Path) -> dict:
    """Load one of this project's checkpoints without unpickling any class.

    Raises:
        ModelLoadError: The file is damaged (truncated, empty, not a torch file) or not a checkpoint of plain data.
    """
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports damage as RuntimeError, EOFError, UnpicklingError, ... by where it broke
        first = (str(err).splitlines() or [""])[0][:200]
        raise ModelLoadError(f"{path} cannot be read as a checkpoint (truncated, corrupted or not written by this "
                             f"toolkit: {type(err).__name__}: {first}); copy it again or start a new run") from err


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and plain data."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
