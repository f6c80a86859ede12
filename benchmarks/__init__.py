"""Benchmarks: training-step overhead (overhead.py) and the side-by-side comparison harness (compare.py)."""
