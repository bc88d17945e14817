"""What every benchmark and experiment writes beside its numbers: the machine
(:func:`machine_info`), the JSON and CSV of its rows (:func:`write_results`), and a
plotted line of result rows with their spread and flags (:func:`plot_rows`)."""

from __future__ import annotations

import csv
import os
import platform
from pathlib import Path

import torch

from .._io import atomic_open, write_json
from . import checks

#: The timing columns of a benchmark table's rows, in CSV order (min/max left out).
TIMING_FIELDS = ["median_s", "q1_s", "q3_s", "spread", "n", "peak_added_bytes"]


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def write_results(out: Path, stem: str, result: dict, fields: list[str]) -> None:
    """``OUT/stem.json`` (everything) and ``OUT/stem.csv`` (``result["results"]`` rows)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result)
    with atomic_open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows({**r, "flags": "; ".join(r.get("flags", []))} for r in result["results"])


def plot_rows(
    ax,
    rows: list[dict],
    key: str,
    scale: float,
    color,
    ls,
    label: str,
    *,
    errors: bool,
    x: str = "length",
) -> None:
    """A line through ``rows``; interquartile error bars when ``errors``; flagged points
    hollow, with a ⚠ beside them."""
    xs = [r[x] for r in rows]
    ys = [r[key] * scale for r in rows]
    ax.plot(xs, ys, color=color, ls=ls, label=label)
    if errors and all("q1_s" in r for r in rows):
        lo = [max(y - r["q1_s"] * scale, 0) for y, r in zip(ys, rows)]
        hi = [max(r["q3_s"] * scale - y, 0) for y, r in zip(ys, rows)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=color, capsize=3, lw=1)
    for xv, yv, r in zip(xs, ys, rows):
        bad = bool(r.get("flags")) and errors
        ax.plot([xv], [yv], marker="o", color=color, mfc="white" if bad else color, ms=6)
        if bad:
            ax.annotate(
                checks.WARN,
                (xv, yv),
                xytext=(4, 4),
                textcoords="offset points",
                color="red",
                fontsize=10,
            )


def footnotes(rows: list[dict], label) -> tuple[dict[int, int], list[str]]:
    """Footnote numbers for the flagged rows (by ``id``) and the footnote lines."""
    marks, lines = {}, []
    for r in rows:
        if r.get("flags"):
            marks[id(r)] = len(lines) + 1
            lines.append(f"{checks.WARN}{len(lines) + 1} {label(r)}: " + "; ".join(r["flags"]))
    return marks, lines


def spread_and_mark(row: dict, marks: dict[int, int]) -> tuple[str, str]:
    """A table row's spread cell (``"12%"``; empty when not measured) and its footnote
    mark (``" ⚠2"``, from :func:`footnotes`' ``marks``; empty when not flagged)."""
    spread = f"{100 * row['spread']:.0f}%" if "spread" in row else ""
    mark = f" {checks.WARN}{marks[id(row)]}" if id(row) in marks else ""
    return spread, mark
