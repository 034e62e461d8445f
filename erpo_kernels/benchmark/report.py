"""Outputs: a markdown table (stdout and results.md), JSON and CSV for machines, a PNG plot.

The plot has one row of panels per pass (train, stats), time and peak extra memory against N,
log-log, one line per contender (colour) and dtype (solid bf16, dashed fp32), at the largest
(H, V) of the run.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Optional

from erpo_kernels.benchmark.common import Row

COLUMNS = ["contender", "pass", "dtype", "N (BxT)", "H", "V", "median ms", "x floor", "est. ms (x floor)",
           "peak extra MiB", "check", "status"]


def _number(value: float, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if abs(value) >= 1 else f"{value:.{digits + 2}f}"


def _estimate(row: Row) -> str:
    """The traffic model's estimate beside the measured time: "ms (ratio x)", or the modeled floor alone."""
    if not math.isnan(row.est_ms):
        return f"{_number(row.est_ms, 2)} ({row.est_ratio_to_floor:.2f}x)"
    if not math.isnan(row.est_floor_ms):
        return f"- (floor {_number(row.est_floor_ms, 2)})"
    return "-"


def markdown_table(rows: List[Row], meta: Optional[dict] = None, unavailable: Optional[Dict[str, str]] = None
                   ) -> str:
    """One line per row, grouped by pass, dtype and shape as measured; notes below the table."""
    lines = []
    if meta:
        lines.append(f"Device: {meta.get('device')}; torch {meta.get('torch')}, triton {meta.get('triton')}; "
                     f"{meta.get('date_utc')} UTC; median of {meta.get('repeats')} after "
                     f"{meta.get('warmup')} warm-up; preset {meta.get('preset')}.")
        lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS) - 2)) + "|---|---|")
    for r in rows:
        lines.append("| " + " | ".join([
            r.contender, r.pass_name, r.dtype, f"{r.tokens} ({r.batch}x{r.length})", str(r.hidden),
            str(r.vocab), _number(r.median_ms, 2), _number(r.ratio_to_floor, 2), _estimate(r), _number(r.peak_mib, 1),
            r.check, r.status]) + " |")
    notes = []
    if unavailable:
        notes.append("Not run here: " + "; ".join(f"{name}: {why}" for name, why in unavailable.items()) + ".")
    if meta and meta.get("memory_method"):
        notes.append(f"Peak extra memory: {meta['memory_method']}.")
    notes.append("x floor: median time / the GEMMs alone (3 x 2NHV train, 1 x 2NHV stats) in the same run.")
    if meta and meta.get("estimate_gpu"):
        notes.append(f"est.: the traffic model's roofline estimate (an estimate, not a measurement; bench/README.md, "
                     f"\"Traffic model\") for an {meta['estimate_gpu']} ({meta.get('estimate_basis')}), as ms and "
                     f"x the modeled floor; contenders whose data flow is not modeled show the modeled floor only.")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def to_json(rows: List[Row], meta: dict, unavailable: Dict[str, str], checks: Dict[str, str]) -> dict:
    return {"meta": meta, "rows": [r.to_dict() for r in rows], "unavailable": unavailable, "checks": checks}


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: List[Row]) -> None:
    names = [f.name for f in fields(Row) if f.name != "times_ms"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r.to_dict() for r in rows)


def _headline_shape(rows: List[Row]):
    sizes = sorted({(r.hidden * r.vocab, r.hidden, r.vocab) for r in rows})
    return sizes[-1][1:] if sizes else (None, None)


def plot(rows: List[Row], path: Path, title: str = "") -> Path:
    """PNG of time and memory vs N at the largest (H, V), one line per contender and dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    hidden, vocab = _headline_shape(rows)
    passes = [p for p in ("train", "stats") if any(r.pass_name == p for r in rows)] or ["train"]
    contenders = list(dict.fromkeys(r.contender for r in rows))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(contenders)}
    styles = {"bf16": "-", "fp32": "--"}
    fig, axes = plt.subplots(len(passes), 2, figsize=(12, 4.2 * len(passes)), squeeze=False)
    for i, pass_name in enumerate(passes):
        for name in contenders:
            for dtype in sorted({r.dtype for r in rows}):
                points = sorted((r.tokens, r.median_ms, r.peak_mib) for r in rows
                                if r.contender == name and r.pass_name == pass_name and r.dtype == dtype
                                and r.hidden == hidden and r.vocab == vocab and r.status == "ok")
                if not points:
                    continue
                n, ms, mib = zip(*points)
                kwargs = dict(color=colours[name], linestyle=styles.get(dtype, ":"), marker="o", markersize=4,
                              label=f"{name} {dtype}")
                axes[i][0].plot(n, ms, **kwargs)
                axes[i][1].plot(n, [max(m, 1e-3) for m in mib], **kwargs)
        for j, (quantity, unit) in enumerate([("time", "median ms"), ("peak extra memory", "MiB")]):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ticks = sorted({r.tokens for r in rows if r.hidden == hidden and r.vocab == vocab})
            ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("N tokens")
            ax.set_ylabel(unit)
            ax.set_title(f"{pass_name}: {quantity} (H={hidden}, V={vocab})")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.84, 0.96 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
