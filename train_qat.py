#!/usr/bin/env python
"""Quantization-aware training for Ultralytics YOLOv8 detectors. Run `python train_qat.py --help`."""

import sys

from src.cli import main

if __name__ == "__main__":
    sys.exit(main())
