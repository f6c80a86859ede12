#!/usr/bin/env python
"""Validate exported INT8 models (mAP vs reference, parity, latency, INT8 coverage, size). Run with --help."""

import sys

from src.export.validate import main

if __name__ == "__main__":
    sys.exit(main())
