"""What the mixed-precision stage decided and measured, and its report under ``<run>/mixed_precision/``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from src.analysis.plots import pareto_plot
from src.quantization.bit_allocation import STORAGE_NOTE, Assignment, SensitivityTable


@dataclass
class MixedPrecisionResult:
    """What the stage decided and measured; :meth:`write` puts it under ``<run>/mixed_precision/``."""

    table: SensitivityTable
    assignment: Assignment
    bit_overrides: dict
    budget_type: str
    budget: float
    points: list[dict] = field(default_factory=list)  # Pareto: {"label", "avg_bits", "map50_95", "kind"}
    cached: bool = False

    def add_point(self, label: str, a: Assignment, map50_95: float | None, kind: str) -> None:
        self.points.append({"label": label, "avg_bits": round(a.avg_bits, 4),
                            "weight_mb": round(a.weight_bytes() / 1e6, 6),
                            "map50_95": None if map50_95 is None else float(map50_95), "kind": kind})

    def to_dict(self) -> dict:
        return {"budget_type": self.budget_type, "budget": self.budget, "assignment": self.assignment.to_dict(),
                "bit_overrides": self.bit_overrides, "pareto": self.points, "sensitivity_cached": self.cached,
                "note": STORAGE_NOTE}

    def report(self) -> str:
        """Markdown: the choice, then the sensitivity table (most sensitive first)."""
        a = self.assignment
        lines = [f"# Mixed precision", "",
                 f"Budget: {self.budget_type} = {self.budget:g}; chosen average weight bits {a.avg_bits:.3f} "
                 f"({100 * a.weight_memory:.1f}% of uniform INT8 weight memory*).",
                 f"Float-kept layers: {', '.join(a.to_dict()['float_layers']) or 'none'}.", "",
                 f"*{STORAGE_NOTE}.", "",
                 f"Sensitivity on {self.table.images} training images (float detection loss "
                 f"{self.table.float_loss:.4f}/image); loss = change when only this layer is quantized.", "",
                 "| layer | params | bits | " + " | ".join(
                     f"Δloss W{b} | SQNR W{b} (dB)" for b in sorted({int(k) for l in self.table.layers
                                                                    for k in l.loss})) + " |",
                 "|---|---:|---:|" + "---:|---:|" * len({k for l in self.table.layers for k in l.loss})]
        widths = sorted({int(k) for l in self.table.layers for k in l.loss})
        order = sorted(self.table.layers, key=lambda l: -max(l.loss.values(), default=0.0))
        for l in order:
            b = a.weight_bits.get(l.name)
            cells = " | ".join(f"{l.loss.get(str(w), float('nan')):.5f} | {l.sqnr_db.get(str(w), float('nan')):.2f}"
                               for w in widths)
            lines.append(f"| {l.name} | {l.params} | {'float' if b is None else b} | {cells} |")
        if self.points:
            lines += ["", "| configuration | kind | avg weight bits | stored weight MB* | mAP50-95 |",
                      "|---|---|---:|---:|---:|"]
            for p in self.points:
                m = "-" if p["map50_95"] is None else f"{p['map50_95']:.4f}"
                lines.append(f"| {p['label']} | {p['kind']} | {p['avg_bits']:.3f} | {p['weight_mb']:.4f}"
                             f" | {m} |")
        return "\n".join(lines) + "\n"

    def write(self, run_dir: Path) -> Path:
        """sensitivity.json, assignment.json, report.md and pareto.png under ``run_dir/mixed_precision``."""
        out = Path(run_dir) / "mixed_precision"
        out.mkdir(parents=True, exist_ok=True)
        (out / "sensitivity.json").write_text(json.dumps(self.table.to_dict(), indent=1) + "\n")
        (out / "assignment.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        (out / "report.md").write_text(self.report())
        if any(p["map50_95"] is not None for p in self.points):
            pareto_plot(self.points, out / "pareto.png")
        return out
