"""Bit allocation for mixed precision: pick each conv's weight width under a budget from measured sensitivities.

Pure numerics on plain data (no model, no data set): the sensitivities come from the mixed-precision stage.

Assignment: minimise the summed sensitivity subject to the budget (a multiple-choice knapsack, solved exactly by
dynamic programming over costs rounded *up*, so the result never exceeds the budget). Budgets:
  * ``avg_bits``: mean weight bits over the quantizable conv weights (float-kept layers count 32 bits);
  * ``weight_memory``: stored weight memory as a fraction of uniform INT8 (see :func:`stored_bits`);
  * ``max_map_drop``: the smallest ``avg_bits`` whose measured PTQ mAP50-95 stays within ``budget`` points of the
    uniform highest-width model (binary search, each step a measurement the caller supplies).

Storage: the QDQ ONNX export packs weights of 4 bits or fewer as INT4 and stores 5- to 8-bit weights as int8, so
memory (budgets, reports, the Pareto plot) counts what that file stores, not ``bits / 8``: a 6-bit layer costs as
much as an 8-bit one. OpenVINO and TFLite store every quantized weight as int8 (see README).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from src.errors import QATError

FLOAT_BITS = 32
STORAGE_NOTE = ("weight memory as the QDQ ONNX export stores it: weights of <= 4 bits packed INT4, 5-8 bits int8; "
                "OpenVINO and TFLite exports store every quantized weight as int8")


def stored_bits(bits: int | None) -> int:
    """Bits one weight of a ``bits``-wide layer takes in the QDQ ONNX export (None: kept float)."""
    if bits is None:
        return FLOAT_BITS
    return 4 if bits <= 4 else 8


class MixedPrecisionError(QATError):
    """The budget cannot be met or the sensitivity data do not match the model."""


# --------------------------------------------------------------------------------------------------------------------
# Plain data
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LayerSensitivity:
    """One quantizable conv: its weight parameter count and sensitivity per option ("4", "8", ..., "float")."""

    name: str
    params: int
    loss: dict[str, float] = field(default_factory=dict)
    sqnr_db: dict[str, float] = field(default_factory=dict)
    pinned_bits: int | None = None  # set by a layer_configs entry: not reassigned


@dataclass
class SensitivityTable:
    float_loss: float
    images: int
    layers: list[LayerSensitivity]
    key: str = ""

    def to_dict(self) -> dict:
        return {"float_loss": self.float_loss, "images": self.images, "key": self.key,
                "layers": [asdict(l) for l in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityTable":
        return cls(d["float_loss"], d["images"], [LayerSensitivity(**l) for l in d["layers"]], d.get("key", ""))


@dataclass
class Assignment:
    """Weight bits per layer (None = kept float) and the activation width of every group."""

    weight_bits: dict[str, int | None]
    activation_bits: int | None
    params: dict[str, int]
    predicted: float = 0.0  # summed sensitivity of the choice

    @property
    def avg_bits(self) -> float:
        return average_bits(self.weight_bits, self.params)

    @property
    def weight_memory(self) -> float:
        """Stored weight memory as a fraction of uniform INT8."""
        return self.weight_bytes() / max(sum(self.params[n] for n in self.weight_bits), 1)

    def weight_bytes(self) -> float:
        """Stored weight bytes of the assigned layers (:func:`stored_bits`)."""
        return sum(self.params[n] * stored_bits(b) for n, b in self.weight_bits.items()) / 8.0

    def bit_overrides(self, group_keys: list[str] | None = None) -> dict[str, dict]:
        """The ``prepare_qat_model(bit_overrides=...)`` form."""
        out: dict[str, dict] = {n: ({"float": True} if b is None else {"weight_bits": int(b)})
                                for n, b in self.weight_bits.items()}
        if self.activation_bits is not None:
            for key in group_keys or []:
                out[key] = {"activation_bits": int(self.activation_bits)}
        return out

    def to_dict(self) -> dict:
        return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits,
                "avg_bits": round(self.avg_bits, 6), "weight_memory_vs_int8": round(self.weight_memory, 6),
                "stored_weight_bytes": self.weight_bytes(), "predicted_sensitivity": self.predicted,
                "float_layers": sorted(n for n, b in self.weight_bits.items() if b is None)}


def average_bits(weight_bits: dict[str, int | None], params: dict[str, int]) -> float:
    """Parameter-weighted mean weight bits; float-kept layers count 32 bits."""
    total = sum(params[n] for n in weight_bits)
    return sum(params[n] * (FLOAT_BITS if b is None else b) for n, b in weight_bits.items()) / max(total, 1)


# --------------------------------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------------------------------
def _options(layer: LayerSensitivity, weight_bits: list[int], allow_float: bool, metric: str):
    """(bits or None, sensitivity) per option of one layer, ascending in bits; sensitivity never rises with bits."""
    if layer.pinned_bits is not None:
        return [(layer.pinned_bits, 0.0)]
    out = []
    floor = -math.inf
    for b in sorted(weight_bits, reverse=True):
        if metric == "sqnr":
            sq = layer.sqnr_db[str(b)]
            value = 0.0 if math.isinf(sq) else 10.0 ** (-sq / 10.0)  # noise-to-signal power ratio
        else:
            value = layer.loss[str(b)]
        # fewer bits are never taken to be better than more: a measured loss change below the wider width's is noise
        floor = max(floor, float(value))
        out.append((b, floor))
    out.reverse()
    if allow_float:
        out.append((None, 0.0))  # float adds no quantization error
    return out


def knapsack(costs: list[list[int]], values: list[list[float]], capacity: float,
             max_units: int = 500_000) -> list[int] | None:
    """Pick one option per item minimising the summed value with summed cost <= ``capacity``.

    Integer costs are divided by their greatest common divisor, which makes the dynamic programme exact whenever
    ``capacity / gcd <= max_units``; otherwise costs are rounded *up* to ``capacity / max_units`` units, so a returned
    choice is still feasible in exact costs (and at most a sliver of the budget is given away). Among equal values the
    *larger* total wins: the budget is spent on precision rather than left unused. Returns option indices, or None
    when nothing fits.
    """
    g = 0
    for row in costs:
        for c in row:
            g = math.gcd(g, int(c))
    g = max(g, 1)
    if capacity / g <= max_units:
        resolution = int(math.floor(capacity / g + 1e-9))
        units = [[int(c) // g for c in row] for row in costs]
    else:
        resolution, unit = max_units, capacity / max_units
        units = [[int(math.ceil(c / unit - 1e-9)) for c in row] for row in costs]
    dp = np.full(resolution + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((len(costs), resolution + 1), dtype=np.int8)
    for i, (u_row, v_row) in enumerate(zip(units, values)):
        new = np.full(resolution + 1, np.inf)
        for o, (u, v) in enumerate(zip(u_row, v_row)):
            if u > resolution:
                continue
            cand = np.full(resolution + 1, np.inf)
            cand[u:] = dp[: resolution + 1 - u] + v
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = o
        dp = new
    if not np.isfinite(dp).any():
        return None
    best = float(np.min(dp))
    ties = np.flatnonzero(dp <= best + 1e-12 * max(1.0, abs(best)))
    c = int(ties[-1])  # the most precise among equal values
    picks = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        o = int(choice[i, c])
        picks[i] = o
        c -= units[i][o]
    return picks


def assign_bits(table: SensitivityTable, mp_cfg, activation_bits: int | None = None,
                avg_bits_budget: float | None = None) -> Assignment:
    """Least-sensitive assignment within the ``avg_bits`` or ``weight_memory`` budget of ``mp_cfg``.

    Args:
        table: Measured (or hand-made) sensitivities.
        mp_cfg: ``cfg.mixed_precision`` (weight_bits, allow_float, budget_type, budget, sensitivity_metric).
        activation_bits: Width of every activation quantizer (None: the config's own).
        avg_bits_budget: Use this average-bits budget instead of the configured one (the max_map_drop search).

    Raises:
        MixedPrecisionError: No assignment meets the budget (names the smallest achievable one).
    """
    if avg_bits_budget is None and mp_cfg.budget_type not in ("avg_bits", "weight_memory"):
        raise MixedPrecisionError(f"assign_bits: budget_type {mp_cfg.budget_type!r} is searched by "
                                  "search_max_map_drop, not assigned directly")
    layers = table.layers
    params = {l.name: l.params for l in layers}
    total = sum(params.values())
    capacity_in_avg_bits = avg_bits_budget is not None or mp_cfg.budget_type == "avg_bits"
    if avg_bits_budget is not None:
        capacity = avg_bits_budget * total
    elif mp_cfg.budget_type == "avg_bits":
        capacity = mp_cfg.budget * total
    else:
        capacity = mp_cfg.budget * 8.0 * total
    opts = [_options(l, mp_cfg.weight_bits, mp_cfg.allow_float, mp_cfg.sensitivity_metric) for l in layers]
    cost_bits = (lambda b: FLOAT_BITS if b is None else int(b)) if capacity_in_avg_bits else stored_bits
    costs = [[int(l.params) * cost_bits(b) for b, _ in row] for l, row in zip(layers, opts)]
    values = [[v for _, v in row] for row in opts]
    picks = knapsack(costs, values, capacity)
    if picks is None:
        least = sum(min(row) for row in costs) / max(total, 1)
        unit = "bits" if capacity_in_avg_bits else "stored bits per weight"
        raise MixedPrecisionError(
            f"mixed_precision.budget: no assignment fits {capacity / max(total, 1):.3f} {unit} "
            f"(budget_type {mp_cfg.budget_type}, budget {mp_cfg.budget:g}); the smallest possible is {least:.3f} "
            f"{unit} ({least / 8:.3f} of INT8 weight memory) -- raise the budget or add lower widths to weight_bits")
    bits = {l.name: row[p][0] for l, row, p in zip(layers, opts, picks)}
    predicted = float(sum(row[p][1] for row, p in zip(opts, picks)))
    a = Assignment(bits, activation_bits, params, predicted)
    spent = sum(params[n] * cost_bits(b) for n, b in bits.items())
    assert spent <= capacity * (1 + 1e-12), "knapsack rounding must never exceed the budget"
    return a


def uniform_assignment(table: SensitivityTable, bits: int, activation_bits: int | None = None) -> Assignment:
    """Every (unpinned) layer at ``bits``."""
    wb = {l.name: (l.pinned_bits if l.pinned_bits is not None else bits) for l in table.layers}
    return Assignment(wb, activation_bits, {l.name: l.params for l in table.layers})


def search_max_map_drop(table: SensitivityTable, mp_cfg, evaluate: Callable[[Assignment], float],
                        activation_bits: int | None = None) -> tuple[Assignment, list[dict]]:
    """Smallest-memory assignment whose mAP50-95 stays within ``mp_cfg.budget`` points of uniform max-width.

    Binary search over the average-bits budget (``mp_cfg.search_steps`` halvings), each candidate solved by
    :func:`assign_bits` and measured by ``evaluate`` (mAP50-95 as a fraction, e.g. a calibrated PTQ validation).

    Returns:
        (chosen assignment, every measured point as {"label", "avg_bits", "map50_95", "drop_points"}).
    """
    hi_bits, lo_bits = max(mp_cfg.weight_bits), min(mp_cfg.weight_bits)
    points: list[dict] = []

    def measure(a: Assignment, label: str) -> float:
        m = float(evaluate(a))
        points.append({"label": label, "avg_bits": a.avg_bits, "map50_95": m, "assignment": a})
        return m

    best = uniform_assignment(table, hi_bits, activation_bits)
    ref = measure(best, f"uniform W{hi_bits}")
    allowed = mp_cfg.budget / 100.0
    low = uniform_assignment(table, lo_bits, activation_bits)
    if ref - measure(low, f"uniform W{lo_bits}") <= allowed:
        best = low
    else:
        lo, hi = float(lo_bits), float(hi_bits)
        for _ in range(mp_cfg.search_steps):
            mid = (lo + hi) / 2
            a = assign_bits(table, mp_cfg, activation_bits, avg_bits_budget=mid)
            if ref - measure(a, f"mixed {a.avg_bits:.2f} bits") <= allowed:
                best, hi = a, mid
            else:
                lo = mid
    for p in points:
        p["drop_points"] = round((ref - p["map50_95"]) * 100.0, 4)
    return best, points
