"""PNG plots of the analysis report and the mixed-precision Pareto front (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import math
from pathlib import Path


def _plt():
    # deferred: matplotlib is heavy and only the report and Pareto plots need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: after choosing the Agg backend

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def pareto_plot(points: list[dict], path: Path) -> Path:
    """Average weight bits (bottom axis) vs mAP50-95 for every measured configuration.

    Args:
        points: {"label", "avg_bits", "weight_mb", "map50_95", "kind"}; points without mAP are skipped.
        path: PNG to write.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"ptq": "o", "qat": "*"}
    for p in points:
        if p.get("map50_95") is None:
            continue
        ax.scatter(p["avg_bits"], 100 * p["map50_95"], marker=markers.get(p["kind"], "s"), s=90 if p["kind"] == "qat"
                   else 45, label=f"{p['label']} ({p['kind'].upper()}, {p['weight_mb']:.3f} MB)")
    ax.set_xlabel("average weight bits (labels: weight MB as the QDQ ONNX stores them, <= 4 bits packed INT4)")
    ax.set_ylabel("mAP50-95 (%)")
    ax.set_title("Mixed precision: weight bits vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def ratio_plot(ratio_layers: float, ratio_params: float, path: Path) -> Path:
    """Quantized share of conv/linear layers, by count and by parameters."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    vals = [100 * ratio_layers, 100 * ratio_params]
    bars = ax.bar(["by layers", "by parameters"], vals, color=["tab:blue", "tab:orange"])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.1f}%", ha="center")
    ax.set_ylim(0, 110)
    ax.set_ylabel("quantized (%)")
    ax.set_title("Quantization ratio")
    return _save(fig, path)


def size_plot(sizes: dict[str, float], path: Path) -> Path:
    """Bar chart of model sizes in MB."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(sizes)
    bars = ax.bar(names, [sizes[n] for n in names], color="tab:green")
    for b, n in zip(bars, names):
        ax.text(b.get_x() + b.get_width() / 2, sizes[n], f"{sizes[n]:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("MB")
    ax.set_title("Model size (weights + biases)")
    ax.tick_params(axis="x", labelsize=7)
    return _save(fig, path)


def layer_error_plot(rows: list[dict], path: Path) -> Path:
    """SQNR and MSE per layer, isolated and cumulative, in the given order (worst first)."""
    plt = _plt()
    n = len(rows)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.18 * n + 2), 7), sharex=True)
    x = list(range(n))
    cap = lambda v: 100.0 if v is None or math.isinf(v) else v  # noqa: E731  exact layers plotted at 100 dB
    a1.bar([i - 0.2 for i in x], [cap(r["sqnr_isolated_db"]) for r in rows], width=0.4, label="isolated")
    a1.bar([i + 0.2 for i in x], [cap(r["sqnr_cumulative_db"]) for r in rows], width=0.4, label="cumulative")
    a1.set_ylabel("SQNR (dB)")
    a1.legend(fontsize=8)
    a1.set_title("Layer-wise quantization error (worst cumulative SQNR first)")
    a2.bar([i - 0.2 for i in x], [r["mse_isolated"] for r in rows], width=0.4, label="isolated")
    a2.bar([i + 0.2 for i in x], [r["mse_cumulative"] for r in rows], width=0.4, label="cumulative")
    a2.set_yscale("log")
    a2.set_ylabel("MSE")
    a2.set_xticks(x)
    a2.set_xticklabels([r["name"] for r in rows], rotation=90, fontsize=6)
    return _save(fig, path)


def map_plot(perf: dict[str, dict], path: Path) -> Path:
    """mAP50 and mAP50-95 per model (fp32, ptq, qat, ...)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(perf)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [100 * perf[n]["map50"] for n in names], width=0.4, label="mAP50")
    ax.bar([i + 0.2 for i in x], [100 * perf[n]["map50_95"] for n in names], width=0.4, label="mAP50-95")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    ax.set_title("Accuracy")
    return _save(fig, path)
