"""Atomic JSON outputs of a run (metrics.json, placement.json, validation.json)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(obj, path: Path) -> Path:
    """Sorted, indented JSON written to a temp file and renamed over ``path`` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
