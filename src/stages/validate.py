"""Validate: the --validate-exports gate (validation.json beside the exports; a failed check fails the run)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from src.errors import QATError
from src.stages.files import write_json


def validation_gate(export_dir: Path, results: list) -> None:
    """Write ``export_dir/validation.json`` from validate_exports' results; raise when any export failed.

    Raises:
        QATError: Names each failed export and its reasons.
    """
    write_json({"exports": [asdict(r) for r in results]}, export_dir / "validation.json")
    failed = [f"{r.path}: {'; '.join(r.reasons)}" for r in results if not r.passed]
    if failed:
        raise QATError("export validation failed: " + " | ".join(failed))
