"""The mixed-precision cache: the sensitivity table and PTQ mAPs of measured assignments, one JSON file per key."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from torch import nn

from src.quantization.bit_allocation import Assignment, SensitivityTable

LOGGER = logging.getLogger("yolov8_qat")

CACHE_VERSION = 1


def cache_key(fp32_model: nn.Module, cfg, data: dict) -> str:
    """Hash of the float weights, the dataset (YAML + train image list) and every setting the measurement reads."""
    h = hashlib.sha256(f"mixed-precision-cache-v{CACHE_VERSION}".encode())
    for k, v in sorted(fp32_model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    yaml_file = data.get("yaml_file")
    if yaml_file and Path(yaml_file).is_file():
        h.update(Path(yaml_file).read_bytes())
    for split in ("train",):
        for d in (data.get(split) if isinstance(data.get(split), list) else [data.get(split)]):
            h.update(repr(d).encode())
            if d and Path(d).is_dir():  # names and sizes of the images: a regenerated set invalidates the cache
                for f in sorted(Path(d).iterdir()):
                    h.update(f"{f.name}:{f.stat().st_size}".encode())
    mp = cfg.mixed_precision
    relevant = {
        "quantization": cfg.quantization.to_dict(), "layer_configs": [l.to_dict() for l in cfg.layer_configs],
        "fuse": cfg.qat_params.fuse_modules, "skip_head": cfg.qat_params.skip_detection_head,
        "weight_bits": sorted(mp.weight_bits), "images": mp.sensitivity_images, "imgsz": cfg.train_params.img_size,
        "seed": cfg.train_params.seed, "batch": cfg.qat_params.calibration_batch_size,
    }
    h.update(json.dumps(relevant, sort_keys=True).encode())
    return h.hexdigest()[:20]


class SensitivityCache:
    """JSON file per key in ``mixed_precision.cache_dir``: the table and PTQ mAPs of measured assignments."""

    def __init__(self, cache_dir: str | None, key: str):
        self.path = Path(cache_dir) / f"sensitivity-{key}.json" if cache_dir else None
        self.key = key
        self.data: dict = {}
        if self.path is not None and self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                LOGGER.warning(f"ignoring unreadable sensitivity cache {self.path}")
                self.data = {}

    def table(self) -> SensitivityTable | None:
        return SensitivityTable.from_dict(self.data["table"]) if "table" in self.data else None

    def put_table(self, table: SensitivityTable) -> None:
        self.data["table"] = table.to_dict()
        self._save()

    def ptq_map(self, a: Assignment) -> dict | None:
        return self.data.get("ptq_map", {}).get(_assignment_key(a))

    def put_ptq_map(self, a: Assignment, metrics: dict) -> None:
        self.data.setdefault("ptq_map", {})[_assignment_key(a)] = metrics
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # ranks of a DDP run may write at once
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def _assignment_key(a: Assignment) -> str:
    return hashlib.sha256(json.dumps([sorted(a.weight_bits.items()), a.activation_bits]).encode()).hexdigest()[:16]
