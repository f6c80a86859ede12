"""Sensitivity-driven mixed precision: measure each conv's sensitivity per weight bit width, then assign bits.

Sensitivity of layer L at b bits: only L's weight quantizer is on (b bits, ranges from the weights), everything else
float; measured on ``mixed_precision.sensitivity_images`` training images (no augmentation) as
  * ``loss``: the change in Ultralytics' detection loss (box + cls + dfl, per image) against the float model -- a
    cheap stand-in for the mAP change, which would need a full validation per layer and bit width;
  * ``sqnr_db``: SQNR of L's output against its float output on the same input.

Assignment: minimise the summed sensitivity subject to the budget (a multiple-choice knapsack, solved exactly by
dynamic programming over costs rounded *up*, so the result never exceeds the budget). Budgets:
  * ``avg_bits``: mean weight bits over the quantizable conv weights (float-kept layers count 32 bits);
  * ``weight_memory``: weight memory as a fraction of uniform INT8;
  * ``max_map_drop``: the smallest ``avg_bits`` whose measured PTQ mAP50-95 stays within ``budget`` points of the
    uniform highest-width model (binary search, each step a calibrated PTQ validation).

Deployment note: 4-bit (and other sub-8-bit) weights export as int8 storage holding 4-bit levels, and every such conv
still runs INT8 kernels; memory numbers below 8 bits are therefore *theoretical* (packed), which every output says.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from src.errors import QATError

LOGGER = logging.getLogger("yolov8_qat")

FLOAT = "float"
FLOAT_BITS = 32
CACHE_VERSION = 1
THEORETICAL_NOTE = ("sub-8-bit weights are exported as int8 storage holding their levels (every conv still runs INT8), "
                    "so their memory saving is theoretical (bit-packed)")


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
        """Weight memory as a fraction of uniform INT8 (sub-8-bit counted packed: theoretical)."""
        return self.avg_bits / 8.0

    def weight_bytes(self) -> float:
        """Theoretical (bit-packed) weight bytes of the assigned layers."""
        return sum(self.params[n] * (FLOAT_BITS if b is None else b) for n, b in self.weight_bits.items()) / 8.0

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
                "theoretical_weight_bytes": self.weight_bytes(), "predicted_sensitivity": self.predicted,
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
    if avg_bits_budget is not None:
        capacity = avg_bits_budget * total
    elif mp_cfg.budget_type == "avg_bits":
        capacity = mp_cfg.budget * total
    else:
        capacity = mp_cfg.budget * 8.0 * total
    opts = [_options(l, mp_cfg.weight_bits, mp_cfg.allow_float, mp_cfg.sensitivity_metric) for l in layers]
    costs = [[int(l.params) * (FLOAT_BITS if b is None else int(b)) for b, _ in row] for l, row in zip(layers, opts)]
    values = [[v for _, v in row] for row in opts]
    picks = knapsack(costs, values, capacity)
    if picks is None:
        least = sum(min(row) for row in costs) / max(total, 1)
        raise MixedPrecisionError(
            f"mixed_precision.budget: no assignment fits {capacity / max(total, 1):.3f} average weight bits "
            f"(budget_type {mp_cfg.budget_type}, budget {mp_cfg.budget:g}); the smallest possible is {least:.3f} "
            f"bits ({least / 8:.3f} of INT8 weight memory) -- raise the budget or add lower widths to weight_bits")
    bits = {l.name: row[p][0] for l, row, p in zip(layers, opts, picks)}
    predicted = float(sum(row[p][1] for row, p in zip(opts, picks)))
    a = Assignment(bits, activation_bits, params, predicted)
    spent = sum(params[n] * (FLOAT_BITS if b is None else b) for n, b in bits.items())
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


# --------------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------------
def quantizable_layers(placement, cfg) -> list[tuple[str, int, int | None]]:
    """(name, weight params, pinned bits) of each conv a placement quantizes; pinned = bits set by layer_configs."""
    out = []
    for l in placement.layers:
        if not l.quantized:
            continue
        pinned = l.weight_bits if any(isinstance(i, int) and "bit_width" in cfg.layer_configs[i].weight
                                      for i in l.layer_configs) else None
        out.append((l.name, l.params, pinned))
    return out


def _prepared(fp32_model: nn.Module, cfg, overrides: dict, batches: list[dict]) -> nn.Module:
    from src.models.yolov8_qat import prepare_qat_model
    from src.quantization.calibration import calibrate

    m = copy.deepcopy(fp32_model)
    prepare_qat_model(m, cfg, bit_overrides=overrides)
    m.qat_bit_overrides = overrides
    calibrate(m, (b["img"] for b in batches), sum(int(b["img"].shape[0]) for b in batches), progress=False)
    return m.eval()


@torch.no_grad()
def _detection_loss(model: nn.Module, batches: list[dict]) -> float:
    """Mean per-image detection loss (box + cls + dfl with Ultralytics' gains) in eval mode."""
    total, n = 0.0, 0
    for b in batches:
        loss, _ = model.loss(b, model(b["img"]))
        total += float(loss.sum())  # v8DetectionLoss returns the per-image loss x batch size
        n += int(b["img"].shape[0])
    return total / max(n, 1)


class _OutputSQNR:
    """Forward hook on one QuantConv: accumulates signal and noise power of its output against the float output."""

    def __init__(self, conv):
        self.conv, self.signal, self.noise, self.busy = conv, 0.0, 0.0, False
        self.handle = conv.register_forward_hook(self)

    def __call__(self, mod, inputs, out):
        if self.busy:
            return
        self.busy = True
        try:
            mod.weight_quant.enable_fake_quant(False)
            ref = mod(inputs[0])
            mod.weight_quant.enable_fake_quant(True)
        finally:
            self.busy = False
        self.signal += float((ref.double() ** 2).sum())
        self.noise += float(((ref.double() - out.double()) ** 2).sum())

    def db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return 10.0 * math.log10(max(self.signal, 1e-300) / self.noise)


def measure_sensitivity(fp32_model: nn.Module, cfg, batches: list[dict], *, progress: bool = True) -> SensitivityTable:
    """Per-layer detection-loss change and output SQNR for each candidate weight width (only that layer quantized).

    Args:
        fp32_model: The float DetectionModel (not modified).
        cfg: Resolved QATConfig (placement, quantizer settings, ``mixed_precision``).
        batches: Preprocessed Ultralytics batches (``img`` in [0, 1], labels) on the model's device.
        progress: tqdm bar over layer x width measurements.
    """
    from tqdm import tqdm

    from src.models.yolov8_qat import QuantConv, quantizers, set_fake_quant
    from src.training.data import hyperparameters

    mp = cfg.mixed_precision
    hyp = hyperparameters(cfg)
    base = _prepared(fp32_model, cfg, {}, batches)
    layers = quantizable_layers(base.qat_placement, cfg)
    table = [LayerSensitivity(n, p, pinned_bits=pin) for n, p, pin in layers]
    float_loss = None
    bar = tqdm(total=len(layers) * len(mp.weight_bits), desc="Sensitivity", unit="meas", disable=not progress,
               leave=False)
    try:
        for bits in sorted(mp.weight_bits):
            overrides = {n: {"weight_bits": bits} for n, _, pin in layers if pin is None}
            # the default placement already is this width when no layer differs: skip a second preparation
            same = all(l.weight_bits == bits for l in base.qat_placement.layers if l.name in overrides)
            model = base if same else _prepared(fp32_model, cfg, overrides, batches)
            model.args = hyp  # v8DetectionLoss reads its gains from model.args
            set_fake_quant(model, False)
            if float_loss is None:
                float_loss = _detection_loss(model, batches)
            convs = dict(model.named_modules())
            for entry in table:
                conv = convs[entry.name]
                assert isinstance(conv, QuantConv) and conv.weight_quant is not None, entry.name
                conv.weight_quant.enable_fake_quant(True)
                meter = _OutputSQNR(conv)
                try:
                    entry.loss[str(bits)] = _detection_loss(model, batches) - float_loss
                finally:
                    meter.handle.remove()
                    conv.weight_quant.enable_fake_quant(False)
                entry.sqnr_db[str(bits)] = meter.db()
                bar.update(1)
            assert not any(bool(q.fake_quant_enabled) for _, q in quantizers(model))
            del model
    finally:
        bar.close()
    n_img = sum(int(b["img"].shape[0]) for b in batches)
    return SensitivityTable(float(float_loss), n_img, table)


# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# The pipeline stage
# --------------------------------------------------------------------------------------------------------------------
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
                            "theoretical_weight_mb": round(a.weight_bytes() / 1e6, 6),
                            "map50_95": None if map50_95 is None else float(map50_95), "kind": kind})

    def to_dict(self) -> dict:
        return {"budget_type": self.budget_type, "budget": self.budget, "assignment": self.assignment.to_dict(),
                "bit_overrides": self.bit_overrides, "pareto": self.points, "sensitivity_cached": self.cached,
                "note": THEORETICAL_NOTE}

    def report(self) -> str:
        """Markdown: the choice, then the sensitivity table (most sensitive first)."""
        a = self.assignment
        lines = [f"# Mixed precision", "",
                 f"Budget: {self.budget_type} = {self.budget:g}; chosen average weight bits {a.avg_bits:.3f} "
                 f"({100 * a.weight_memory:.1f}% of uniform INT8 weight memory, theoretical*).",
                 f"Float-kept layers: {', '.join(a.to_dict()['float_layers']) or 'none'}.", "",
                 f"*{THEORETICAL_NOTE}.", "",
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
            lines += ["", "| configuration | kind | avg weight bits | weight MB (theoretical*) | mAP50-95 |",
                      "|---|---|---:|---:|---:|"]
            for p in self.points:
                m = "-" if p["map50_95"] is None else f"{p['map50_95']:.4f}"
                lines.append(f"| {p['label']} | {p['kind']} | {p['avg_bits']:.3f} | {p['theoretical_weight_mb']:.4f}"
                             f" | {m} |")
        return "\n".join(lines) + "\n"

    def write(self, run_dir: Path) -> Path:
        """sensitivity.json, assignment.json, report.md and pareto.png under ``run_dir/mixed_precision``."""
        from src.analysis.plots import pareto_plot

        out = Path(run_dir) / "mixed_precision"
        out.mkdir(parents=True, exist_ok=True)
        (out / "sensitivity.json").write_text(json.dumps(self.table.to_dict(), indent=1) + "\n")
        (out / "assignment.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        (out / "report.md").write_text(self.report())
        if any(p["map50_95"] is not None for p in self.points):
            pareto_plot(self.points, out / "pareto.png")
        return out


def _sensitivity_batches(cfg, data: dict, device: torch.device, stride: int) -> list[dict]:
    """``sensitivity_images`` training images without augmentation, preprocessed, kept in memory."""
    from src.training.data import build_loader, hyperparameters, preprocess_batch

    n = cfg.mixed_precision.sensitivity_images
    bs = min(cfg.qat_params.calibration_batch_size, n)
    loader = build_loader(hyperparameters(cfg, mode="val"), data, "train", bs, mode="val", stride=stride,
                          shuffle=True, seed=cfg.train_params.seed, workers=0)
    out, seen = [], 0
    for b in loader:
        b = preprocess_batch(b, device)
        take = min(int(b["img"].shape[0]), n - seen)
        if take < b["img"].shape[0]:
            keep = b["batch_idx"] < take
            b = {**b, "img": b["img"][:take], "batch_idx": b["batch_idx"][keep], "cls": b["cls"][keep],
                 "bboxes": b["bboxes"][keep]}
        out.append(b)
        seen += take
        if seen >= n:
            break
    return out


def mixed_precision_stage(fp32_model: nn.Module, cfg, data: dict, data_yaml: str, device: torch.device,
                          *, progress: bool = True) -> MixedPrecisionResult:
    """Sensitivity (cached), assignment under the budget, and PTQ Pareto points; before ``prepare_qat_model``.

    Args:
        fp32_model: The float model (not modified).
        cfg: Resolved QATConfig.
        data: Checked data dict.
        data_yaml: Data YAML path (the validator reads it).
        device: Where measurements run.
        progress: Progress bars.

    Returns:
        The result; pass ``result.bit_overrides`` to ``prepare_qat_model`` and set ``model.qat_bit_overrides``.
    """
    from src.models.yolov8_qat import prepare_qat_model
    from src.training.evaluate import evaluate

    mp, tp = cfg.mixed_precision, cfg.train_params
    model = copy.deepcopy(fp32_model).to(device)
    key = cache_key(model, cfg, data)
    cache = SensitivityCache(mp.cache_dir, key)
    table = cache.table()
    cached = table is not None
    batches = _sensitivity_batches(cfg, data, device, max(int(model.stride.max()), 32))
    if cached:
        LOGGER.info(f"Sensitivity loaded from {cache.path}")
    else:
        table = measure_sensitivity(model, cfg, batches, progress=progress)
        table.key = key
        cache.put_table(table)
        LOGGER.info(f"Measured sensitivity of {len(table.layers)} layers x {len(mp.weight_bits)} widths on "
                    f"{table.images} images" + (f"; cached in {cache.path}" if cache.path else ""))
    act_bits = mp.activation_bits[0] if mp.activation_bits[0] != cfg.quantization.activation.bit_width else None

    def overrides(a: Assignment) -> dict:
        # group keys depend on which convs stay float, so they come from a placement with those weight choices
        weights_only = a.bit_overrides()
        if a.activation_bits is None:
            return weights_only
        scratch = copy.deepcopy(fp32_model)
        return a.bit_overrides([g.key for g in prepare_qat_model(scratch, cfg, bit_overrides=weights_only).groups])

    def ptq_map(a: Assignment) -> float:
        hit = cache.ptq_map(a)
        if hit is None:
            m = _prepared(model, cfg, overrides(a), batches)
            hit = evaluate(m, data_yaml, imgsz=tp.img_size, batch=tp.batch_size, device=device)
            hit = {"map50": hit["map50"], "map50_95": hit["map50_95"]}
            cache.put_ptq_map(a, hit)
        return hit["map50_95"]

    hi, lo = max(mp.weight_bits), min(mp.weight_bits)
    points: list[tuple[str, Assignment, float | None]] = []
    if mp.budget_type == "max_map_drop":
        chosen, measured = search_max_map_drop(table, mp, ptq_map, act_bits)
        points = [(p["label"], p["assignment"], p["map50_95"]) for p in measured]
    else:
        chosen = assign_bits(table, mp, act_bits)
        if mp.measure_pareto:
            points = [(f"uniform W{hi}A{mp.activation_bits[0]}", uniform_assignment(table, hi, act_bits), None),
                      (f"uniform W{lo}A{mp.activation_bits[0]}", uniform_assignment(table, lo, act_bits), None)]
            points = [(lbl, a, ptq_map(a)) for lbl, a, _ in points]
    result = MixedPrecisionResult(table, chosen, overrides(chosen), mp.budget_type, mp.budget,
                                  cached=cached)
    for label, a, m in points:
        result.add_point(label, a, m, "ptq")
    if mp.measure_pareto or mp.budget_type == "max_map_drop":
        result.add_point("mixed (chosen)", chosen, ptq_map(chosen), "ptq")
    floats = chosen.to_dict()["float_layers"]
    LOGGER.info(f"Mixed precision ({mp.budget_type} {mp.budget:g}): average weight bits {chosen.avg_bits:.3f} "
                f"({100 * chosen.weight_memory:.1f}% of INT8 weight memory, theoretical below 8 bits); "
                + ", ".join(f"{sum(1 for b in chosen.weight_bits.values() if b == w)} layers W{w}"
                            for w in sorted(set(mp.weight_bits)))
                + (f"; kept float: {', '.join(floats)}" if floats else ""))
    return result
