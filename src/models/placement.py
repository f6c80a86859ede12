"""How a model is quantized, as plain data: saved in checkpoints and reports, printed as the placement table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def plain_data(obj: Any) -> Any:
    """Convert to plain data (dict/list/str/int/float/bool/None) for weights_only checkpoints."""
    if isinstance(obj, dict):
        return {str(k): plain_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_data(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


@dataclass
class LayerPlacement:
    """How one convolution is quantized."""

    name: str
    match_name: str
    source: str
    quantized: bool
    weight_bits: int | None = None
    weight_scheme: str | None = None
    input_group: str | None = None
    output_group: str | None = None
    layer_configs: list[int] = field(default_factory=list)
    params: int = 0
    reason: str = ""


@dataclass
class GroupPlacement:
    """One activation quantizer and the producer sites that share it."""

    key: str
    sites: list[str]
    consumers: list[str]
    bits: int
    signed: bool
    symmetric: bool
    observer: str
    fq_type: str
    config_from: str


@dataclass
class Placement:
    """Where every quantizer of a prepared model sits and how it is configured (``model.qat_placement``)."""

    layers: list[LayerPlacement]
    groups: list[GroupPlacement]
    fused: bool
    skip_detection_head: bool
    mixed_concats: int = 0
    # the mixed-precision choices it was prepared with: per layer name {"weight_bits": b} or {"float": True}, per
    # group key {"activation_bits": b}
    bit_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "layers": [vars(l) for l in self.layers],
            "groups": [vars(g) for g in self.groups],
            "fused": self.fused,
            "skip_detection_head": self.skip_detection_head,
            "mixed_concats": self.mixed_concats,
            "bit_overrides": plain_data(self.bit_overrides),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Placement":
        return cls(
            [LayerPlacement(**l) for l in d["layers"]],
            [GroupPlacement(**g) for g in d["groups"]],
            d["fused"],
            d["skip_detection_head"],
            d.get("mixed_concats", 0),
            d.get("bit_overrides", {}),  # placements saved before they carried their overrides
        )

    def quantized_ratio(self) -> tuple[float, float]:
        """Quantized conv layers over all conv layers, by count and by parameter count."""
        q = [l for l in self.layers if l.quantized]
        n = len(self.layers) or 1
        p = sum(l.params for l in self.layers) or 1
        return len(q) / n, sum(l.params for l in q) / p

    def report(self) -> str:
        """Human-readable placement table."""
        lines = [
            f"{'layer':<34} {'match name':<40} {'quant':<5} {'w':>3} {'in group':<9} {'out group':<9} {'cfg':<6}",
        ]
        for l in self.layers:
            cfg = ",".join(map(str, l.layer_configs)) or "-"
            lines.append(
                f"{l.name:<34} {l.match_name:<40} {'yes' if l.quantized else 'no':<5} "
                f"{l.weight_bits or '-':>3} {l.input_group or '-':<9} {l.output_group or '-':<9} {cfg:<6}"
                + (f" {l.reason}" if l.reason else "")
            )
        lines.append("")
        lines.append(f"{'group':<6} {'bits':>4} {'sign':<5} {'obs':<22} {'type':<6} sites -> consumers")
        for g in self.groups:
            lines.append(
                f"{g.key:<6} {g.bits:>4} {'i' if g.signed else 'u':<5} {g.observer:<22} {g.fq_type:<6} "
                f"{', '.join(g.sites)} -> {', '.join(g.consumers) or '(none)'}"
            )
        r, rp = self.quantized_ratio()
        lines.append(f"quantized convs: {sum(l.quantized for l in self.layers)}/{len(self.layers)} "
                     f"({100 * r:.1f}% of layers, {100 * rp:.1f}% of conv parameters)")
        return "\n".join(lines)
