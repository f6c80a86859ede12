"""Counting host synchronisations: Python-level reads of a tensor back to the host while a function runs."""

from __future__ import annotations

import collections
import traceback
from typing import Callable, Iterator

import torch

# The Tensor methods that read device memory back to Python (on CUDA each one waits for the launch queue)
SYNCING_METHODS = ("item", "__bool__", "__float__", "__int__", "tolist")


def count_host_syncs(fn: Callable[[], object]) -> collections.Counter:
    """Calls of :data:`SYNCING_METHODS` while ``fn`` runs, by (method, "file:line" of the caller)."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING_METHODS}

    def counted(name, original):
        def method(self, *args, **kwargs):
            frame = traceback.extract_stack()[-2]
            counts[(name, f"{frame.filename}:{frame.lineno}")] += 1
            return original(self, *args, **kwargs)
        return method

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(name, original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return counts


def output_tensors(out) -> Iterator[torch.Tensor]:
    """Every tensor of a model output (a tensor, or nested lists / tuples / dicts of them)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from output_tensors(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from output_tensors(v)
