"""A run's output places: their writability, checked before any work, and atomic JSON outputs (metrics.json,
placement.json, validation.json)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from src.errors import QATError


def check_writable(path: Path, flag: str) -> None:
    """``path`` is, or can be created as, a folder this process can write to; nothing is left behind.

    Probed by creating a temporary file in ``path`` or its nearest existing ancestor, which also catches what
    permission bits do not say (a read-only mount; root ignores the bits).

    Raises:
        QATError: Names the flag, the folder and the reason.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise QATError(f"{flag} {path}: cannot create a folder there, {existing} is a file; pass another {flag}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise QATError(f"{flag} {path}: not writable ({err.strerror or err}); pass a writable {flag} or fix the "
                       f"permissions of {existing}") from None


def write_json(obj, path: Path) -> Path:
    """Sorted, indented JSON written to a temp file and renamed over ``path`` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
