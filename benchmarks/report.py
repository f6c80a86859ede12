"""The comparison's outputs: per-seed results folded into one row per contender, results.json, results.md, the plot.

Everything here is a pure function of the per-seed result dicts the contender runs write (``run_contender.py``), so
it is tested without training anything.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

# Columns of results.json's contender rows that the issue fixes; more keys may follow them.
REQUIRED_KEYS = ("name", "map50", "map50_95", "export_map50", "export_map50_95", "latency_ms", "latency_f32_ms",
                 "int8_convs", "float_convs", "size_mb", "step_time_ratio", "wall_s", "seeds")

# Accuracy and timing vary from seed to seed: averaged, with the sample standard deviation beside them.
SEEDED_KEYS = ("map50", "map50_95", "export_map50", "export_map50_95", "step_time_s", "wall_s")
# Properties of the exported graph: they do not depend on the training seed, so the first good seed's value is kept.
STRUCTURAL_KEYS = ("int8_convs", "float_convs", "size_mb", "export_path")

STATUS_OK, STATUS_FAILED, STATUS_SKIPPED, STATUS_PARTIAL = "ok", "failed", "skipped", "partial"


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n-1) of the non-None values; std is None below two values."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def aggregate(name: str, runs: list[dict], description: str = "") -> dict:
    """One contender row from its per-seed results (each with ``status`` and, when it failed, ``error``).

    Status: ``ok`` when every seed succeeded, ``partial`` when some did, else ``skipped`` (a capability that is not
    available, e.g. a flag not implemented yet) or ``failed``. Failed seeds are kept under ``seeds`` with their error
    and never enter the means.
    """
    good = [r for r in runs if r.get("status") == STATUS_OK]
    row: dict = {"name": name, "description": description}
    if good and len(good) == len(runs):
        row["status"] = STATUS_OK
    elif good:
        row["status"] = STATUS_PARTIAL
    elif runs and all(r.get("status") == STATUS_SKIPPED for r in runs):
        row["status"] = STATUS_SKIPPED
    else:
        row["status"] = STATUS_FAILED
    for key in SEEDED_KEYS:
        row[key], row[f"{key}_std"] = mean_std([r.get(key) for r in good])
    for key in STRUCTURAL_KEYS:
        row[key] = next((r[key] for r in good if r.get(key) is not None), None)
    row["int8_total"] = None if row["int8_convs"] is None or row["float_convs"] is None else \
        row["int8_convs"] + row["float_convs"]
    errors = [f"seed {r.get('seed')}: {r['error']}" for r in runs if r.get("status") != STATUS_OK and r.get("error")]
    row["error"] = " | ".join(errors) or None
    notes = sorted({r["note"] for r in runs if r.get("note")})
    row["note"] = " | ".join(notes) or None
    row["seeds"] = [dict(r) for r in runs]
    # filled in by attach_latency / attach_step_ratio once every contender has run
    row.setdefault("latency_ms", None)
    row.setdefault("latency_iqr_ms", None)
    row.setdefault("latency_f32_ms", None)
    row.setdefault("step_time_ratio", None)
    row.setdefault("vs_start_points", None)
    return row


def attach_latency(rows: list[dict], latency: dict[str, dict]) -> None:
    """Copy the interleaved latency pass's numbers (keyed by contender name) into the rows."""
    for row in rows:
        lat = latency.get(row["name"]) or {}
        for key in ("latency_ms", "latency_iqr_ms", "latency_f32_ms"):
            row[key] = lat.get(key)
        if lat.get("error"):
            row["note"] = "; ".join(x for x in (row.get("note"), f"latency: {lat['error']}") if x)


def attach_step_ratio(rows: list[dict], reference: str) -> None:
    """``step_time_ratio`` = a contender's median training-step time / the reference contender's (FP32 training).

    Contenders that do not train (PTQ) keep None; so does every row when the reference has no step time.
    """
    ref = next((r.get("step_time_s") for r in rows if r["name"] == reference), None)
    for row in rows:
        t = row.get("step_time_s")
        row["step_time_ratio"] = None if (t is None or not ref) else t / ref


def attach_vs_start(rows: list[dict], reference: str) -> None:
    """``vs_start_points`` = (a contender's export mAP50-95, else its PyTorch one) - the start model's PyTorch
    mAP50-95, in points: what the user loses against the FP32 model they brought."""
    ref = next((r.get("map50_95") for r in rows if r["name"] == reference), None)
    for row in rows:
        value = row.get("export_map50_95") if row.get("export_map50_95") is not None else row.get("map50_95")
        row["vs_start_points"] = None if (value is None or ref is None) else 100.0 * (value - ref)


def results_doc(rows: list[dict], *, machine: dict, date: str, command: str, settings: dict,
                fp32: dict | None = None) -> dict:
    """The results.json document; every row carries at least :data:`REQUIRED_KEYS`."""
    for row in rows:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"contender row {row.get('name')!r} lacks {missing}; build rows with aggregate()")
    return {"machine": machine, "date": date, "command": command, "settings": settings, "fp32_model": fp32 or {},
            "contenders": rows}


def read_spec(argv: list[str], usage: str) -> dict | None:
    """The JSON spec of a benchmark subprocess (its one argument), or None after printing ``usage``."""
    if len(argv) != 1:
        print(usage, file=sys.stderr)
        return None
    return json.loads(Path(argv[0]).read_text())


def write_json(doc: dict, path: str | Path) -> Path:
    """Write via a temporary file and rename, so an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def _num(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _with_std(v, std, spec: str) -> str:
    s = _num(v, spec)
    return s if std is None or v is None else f"{s} ± {format(std, spec)}"


def _coverage(row: dict) -> str:
    if row.get("int8_convs") is None:
        return "–"
    return f"{row['int8_convs']}/{row['int8_total']}"


def markdown_table(doc: dict) -> str:
    """results.md: the settings, one table row per contender, then every failure and note verbatim."""
    s, m = doc.get("settings", {}), doc.get("machine", {})
    lines = [
        "# Quantization comparison",
        "",
        f"- date: {doc.get('date')}",
        f"- machine: {m.get('summary', m)}",
        f"- command: `{doc.get('command')}`",
        f"- model: {s.get('model')} · data: {s.get('data')} · epochs: {s.get('epochs')} · imgsz: {s.get('imgsz')} · "
        f"batch: {s.get('batch')} · lr: {s.get('lr')} · seeds: {s.get('seeds')}"
        + (" · quick" if s.get("quick") else ""),
    ]
    fp32 = doc.get("fp32_model") or {}
    if fp32.get("message"):
        lines.append(f"- FP32 start model: {fp32['message']}")
    for w in s.get("warnings", []):
        lines.append(f"- **warning:** {w}")
    lines += [
        "",
        "mAP: PyTorch model (fake-quant for ours and ModelOpt) on the val split; export mAP: the OpenVINO IR through "
        "Ultralytics' validator. Latency: OpenVINO CPU, batch 1, median of interleaved runs over all contenders; "
        "f32 = the same IR with INFERENCE_PRECISION_HINT=f32. INT8 convs: convolutions that run u8/i8 in the compiled "
        "OpenVINO graph / all convolutions. Step ratio: median training-step time / fp32_finetuned's. vs start: "
        "export mAP50-95 (PyTorch where there is no export) minus fp32_start's PyTorch mAP50-95, in points. ± = "
        "sample standard deviation over seeds.",
        "",
        "| contender | status | mAP50 | mAP50-95 | export mAP50 | export mAP50-95 | vs start | latency ms | f32 ms "
        "| INT8 convs | size MB | step ratio | wall s | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["contenders"]:
        n_ok = sum(1 for x in r["seeds"] if x.get("status") == STATUS_OK)
        lines.append(
            f"| {r['name']} | {r['status']} | {_with_std(r['map50'], r.get('map50_std'), '.4f')} | "
            f"{_with_std(r['map50_95'], r.get('map50_95_std'), '.4f')} | "
            f"{_with_std(r['export_map50'], r.get('export_map50_std'), '.4f')} | "
            f"{_with_std(r['export_map50_95'], r.get('export_map50_95_std'), '.4f')} | "
            f"{_num(r.get('vs_start_points'), '+.2f')} | {_num(r['latency_ms'], '.2f')} | {_num(r['latency_f32_ms'], '.2f')} | {_coverage(r)} | "
            f"{_num(r['size_mb'], '.2f')} | {_num(r['step_time_ratio'], '.2f')} | {_num(r['wall_s'], '.0f')} | "
            f"{n_ok}/{len(r['seeds'])} |"
        )
    problems = [r for r in doc["contenders"] if r.get("error") or r.get("note")]
    if problems:
        lines += ["", "## Failures and notes", ""]
        for r in problems:
            if r.get("error"):
                first, *rest = r["error"].splitlines()
                lines.append(f"- **{r['name']}** ({r['status']}): {first}")
                if rest:  # a crashed process's log tail, kept verbatim
                    lines += ["", "  ```", *(f"  {ln}" for ln in rest), "  ```", ""]
            if r.get("note"):
                lines.append(f"- {r['name']}: {r['note']}")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str | Path) -> Path:
    """Export mAP50-95 against OpenVINO latency and against artifact size, one labelled point per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    markers = "osD^vP*Xh<>p"
    # one colour and marker per contender in both panels, named in a shared legend: labels next to the points
    # would overlap where contenders land close together
    handles = {}
    for ax, key, label in ((axes[0], "latency_ms", "OpenVINO latency, batch 1 (ms)"),
                           (axes[1], "size_mb", "artifact size (MB)")):
        plotted = 0
        for i, r in enumerate(doc["contenders"]):
            x, y = r.get(key), r.get("export_map50_95")
            if x is None or y is None:
                continue
            h = ax.errorbar(x, y, yerr=r.get("export_map50_95_std") or 0.0, fmt=markers[i % len(markers)],
                            color=plt.cm.tab20(i % 20), capsize=3, markersize=7, label=r["name"])
            handles.setdefault(r["name"], h)
            plotted += 1
        if not plotted:
            ax.text(0.5, 0.5, "no contender has both values", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(label)
        ax.set_ylabel("export mAP50-95")
        ax.grid(alpha=0.3)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), fontsize=8,
                   frameon=False)
    s = doc.get("settings", {})
    fig.suptitle(f"{Path(str(s.get('model', ''))).name} on {Path(str(s.get('data', ''))).name}: "
                 f"{s.get('epochs')} epochs, {s.get('imgsz')} px ({doc.get('date', '')[:10]})")
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(handles) - 1) // 6), 1, 1))
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
