"""Fairness checks of a comparison: a converged FP32 start model, a large enough val split; and the --quick subset.

The start model's convergence is read from its Ultralytics training log (results.csv): beside the .pt as
``<model>.results.csv`` (what scripts/train_fp32.py writes), or the run directory of ``<run>/weights/<model>.pt``.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

MAP_COLUMN = "metrics/mAP50-95(B)"
MIN_VAL_IMAGES = 500


@dataclass
class Convergence:
    """Verdict on an FP32 training log: ``converged`` is None when no log was found."""

    converged: bool | None
    message: str
    csv_path: str | None = None
    epochs: int | None = None
    best: float | None = None
    last_window_gain: float | None = None  # best mAP50-95 of the last `window` epochs minus the best before them


def find_results_csv(model: str | Path) -> Path | None:
    """The training log of an FP32 checkpoint: ``<model>.results.csv`` beside it, or ``<run>/results.csv``."""
    model = Path(model)
    for candidate in (model.with_suffix(".results.csv"), model.parent.parent / "results.csv"):
        if candidate.is_file():
            return candidate
    return None


def read_map_column(csv_path: str | Path, column: str = MAP_COLUMN) -> list[float]:
    """The per-epoch values of ``column`` (Ultralytics pads its headers with spaces; they are stripped)."""
    with open(csv_path, newline="") as f:
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in csv.DictReader(f)]
    if rows and column not in rows[0]:
        raise ValueError(f"{csv_path}: no column {column!r} (columns: {', '.join(rows[0])}); pass the results.csv "
                         "of an Ultralytics detection training")
    return [float(r[column]) for r in rows if (r.get(column) or "").strip()]


def check_convergence(csv_path: str | Path | None, window: int = 5, tol: float = 0.01) -> Convergence:
    """Converged = the last ``window`` epochs raised the best val mAP50-95 by less than ``tol`` (absolute).

    Args:
        csv_path: The training log (None: no log found).
        window: Epochs at the end of training that must not improve the best mAP50-95 by ``tol`` or more.
        tol: Absolute mAP50-95 gain (0.01 = one point) still counted as a plateau.
    """
    if csv_path is None:
        return Convergence(None, "no training log (results.csv) found beside the model or in its run directory: "
                           "convergence not checked")
    values = read_map_column(csv_path)
    n = len(values)
    if n <= window:
        return Convergence(False, f"only {n} epoch(s) logged in {csv_path}; need more than {window} to see a plateau",
                           str(csv_path), n, max(values, default=None))
    before, last = max(values[:-window]), max(values[-window:])
    gain = last - before
    converged = gain < tol
    verdict = "plateaued" if converged else "still improving"
    return Convergence(converged, f"{verdict}: best val mAP50-95 {max(values):.4f} after {n} epochs; the last "
                       f"{window} epochs changed the best by {gain:+.4f} (plateau below {tol:+.4f}) [{csv_path}]",
                       str(csv_path), n, max(values), gain)


def split_images(data_yaml: str | Path, split: str) -> list[Path]:
    """Image files of a split, sorted, as Ultralytics resolves them (directories recursively, or .txt lists)."""
    from ultralytics.data.utils import IMG_FORMATS, check_det_dataset

    d = check_det_dataset(str(data_yaml))
    roots = d[split] if isinstance(d[split], list) else [d[split]]
    files: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_dir():
            files += sorted(f for f in root.rglob("*") if f.suffix[1:].lower() in IMG_FORMATS)
        elif root.suffix == ".txt" and root.is_file():
            files += [Path(line.strip()) for line in root.read_text().splitlines() if line.strip()]
    return files


def val_split_warning(n_val: int, minimum: int = MIN_VAL_IMAGES) -> str | None:
    """A warning when the val split is too small for mAP differences of a point or two to mean anything."""
    if n_val >= minimum:
        return None
    return (f"the val split has {n_val} images (< {minimum}): mAP differences between contenders are within noise; "
            f"generate a larger one, e.g. python -m src.data.synthetic --val {minimum}")


def _label_of(image: Path) -> Path:
    parts = list(image.parts)
    i = len(parts) - 1 - parts[::-1].index("images")  # Ultralytics swaps the last /images/ for /labels/
    parts[i] = "labels"
    return Path(*parts).with_suffix(".txt")


def subset_dataset(data_yaml: str | Path, out: str | Path, n_train: int, n_val: int) -> Path:
    """Copy the first ``n_train``/``n_val`` images (and labels) of a dataset to ``out``; returns the new data YAML.

    Copies, not links: Ultralytics writes its label caches beside the labels, and the source dataset's caches must
    not be overwritten with a subset's.
    """
    import yaml
    from ultralytics.data.utils import check_det_dataset

    out = Path(out)
    d = check_det_dataset(str(data_yaml))
    if out.exists():
        shutil.rmtree(out)
    for split, n in (("train", n_train), ("val", n_val)):
        images = split_images(data_yaml, split)[:n]
        if not images:
            raise ValueError(f"{data_yaml}: the {split} split has no images")
        for img in images:
            for src, kind in ((img, "images"), (_label_of(img), "labels")):
                if src.is_file():
                    dst = out / kind / split / src.name
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
    names = d["names"]
    doc = {"path": str(out.resolve()), "train": "images/train", "val": "images/val", "nc": int(d["nc"]),
           "names": [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names),
           "subset_of": str(Path(data_yaml).resolve())}
    path = out / "data.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
