"""Placement tracing: one forward pass finds which producer sites reach which quantized convs, and which must share
a scale (tensors meeting in a concat).

Tags follow a tensor through quantization-agnostic ops (concat, chunk/split, max-pool, nearest upsample), so the
result holds for every model built from the supported blocks rather than for a list of layer indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from src.models.quant_modules import QuantBottleneck, QuantConv

_AGNOSTIC = ("chunk", "split", "max_pool", "interpolate", "upsample", "__getitem__", "contiguous", "unbind")
_CONCAT = ("cat", "concat", "concatenate")


class _TraceSite:
    """Placeholder site used while tracing: tags the tensor it sees with its site id and returns it unchanged."""

    def __init__(self, tracer: "_PlacementTracer", site_id: int):
        self.tracer, self.site_id = tracer, site_id

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.tracer.tag(x, self.site_id)
        return x


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def add(self, a: int) -> None:
        self.parent.setdefault(a, a)

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


class _PlacementTracer(TorchFunctionMode):
    """Follows site tags through quantization-agnostic ops during one forward pass."""

    def __init__(self):
        super().__init__()
        self.tags: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps traced tensors alive so their ids stay unique
        self.uf = _UnionFind()
        self.consumer_inputs: dict[str, int | None] = {}
        self.mixed_concats = 0
        self.execution_order: dict[int, int] = {}  # site id -> position of its first call in the forward pass

    def tag(self, x: torch.Tensor, site_id: int) -> None:
        self.execution_order.setdefault(site_id, len(self.execution_order))
        self.uf.add(site_id)
        self.tags[id(x)] = site_id
        self.keep.append(x)

    def tag_of(self, x: Any) -> int | None:
        return self.tags.get(id(x)) if isinstance(x, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if any(k == name for k in _CONCAT):
            tensors = args[0] if args else kwargs.get("tensors")
            tags = [self.tag_of(t) for t in tensors]
            if tags and all(t is not None for t in tags):
                for t in tags[1:]:
                    self.uf.union(tags[0], t)
                self._tag_out(out, tags[0])
            elif any(t is not None for t in tags):
                self.mixed_concats += 1
        elif any(k in name for k in _AGNOSTIC) and args:
            t = self.tag_of(args[0])
            if t is not None:
                self._tag_out(out, t)
        return out

    def _tag_out(self, out: Any, site_id: int) -> None:
        if isinstance(out, torch.Tensor):
            self.tags[id(out)] = site_id
            self.keep.append(out)
        elif isinstance(out, (tuple, list)):
            for o in out:
                self._tag_out(o, site_id)


@dataclass
class SiteTrace:
    """What the tracing pass found.

    Attributes:
        producers: (name, module) of every producer site, in module order; a site's id is its index here.
        groups: Per group root, the ids of the producers that must share one quantizer, in the order they run in a
            forward pass (a shared quantizer refreshes its scale at its first site); only groups whose tensors reach
            a quantized conv (other sites would be wasted Q/DQ pairs).
        consumer_roots: Per quantized conv, the root of the group covering its input; None when no producer site
            covers it (the image input, or after an unsupported op).
        mixed_concats: Concats joining covered and uncovered tensors.
    """

    producers: list[tuple[str, nn.Module]]
    groups: dict[int, list[int]]
    consumer_roots: dict[str, int | None]
    mixed_concats: int


def producer_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every quantized conv block with an activation (not the head's output convs) and every residual add."""
    producers: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if isinstance(m, QuantConv) and m.source != "Conv2d":
            producers.append((name, m))
        elif isinstance(m, QuantBottleneck) and m.add:
            producers.append((name, m))
    return producers


def trace_sites(model: nn.Module, qconvs: dict[str, QuantConv], imgsz: int) -> SiteTrace:
    """Run one forward pass of ``imgsz`` zeros with tracing sites in place and group the producer sites."""
    producers = producer_sites(model)
    tracer = _PlacementTracer()
    for i, (name, m) in enumerate(producers):
        m._set_site("output_site", _TraceSite(tracer, i))
    for name, q in qconvs.items():
        q._set_site("consumer_hook", lambda mod, x, n=name: tracer.consumer_inputs.__setitem__(n, tracer.tag_of(x)))
    try:
        p = next(model.parameters())
        with torch.no_grad(), tracer:
            model(torch.zeros(1, 3, imgsz, imgsz, device=p.device, dtype=p.dtype))
    finally:
        for name, m in producers:
            m._set_site("output_site", None)
        for q in qconvs.values():
            q._set_site("consumer_hook", None)

    # concat partners of a useful site are kept: they must share its scale anyway
    used_roots = {tracer.uf.find(t) for t in tracer.consumer_inputs.values() if t is not None}
    groups: dict[int, list[int]] = {}
    for i in sorted(tracer.execution_order, key=tracer.execution_order.get):
        if tracer.uf.find(i) in used_roots:
            groups.setdefault(tracer.uf.find(i), []).append(i)
    groups = dict(sorted(groups.items()))
    consumer_roots = {name: None if (t := tracer.consumer_inputs.get(name)) is None else tracer.uf.find(t)
                      for name in qconvs}
    return SiteTrace(producers, groups, consumer_roots, tracer.mixed_concats)
