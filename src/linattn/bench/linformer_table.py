"""The Linformer paper's inference-efficiency table (its Table 3) on this machine.

For each sequence length ``n`` and projected length ``k < n``: forward time and peak
memory of Linformer attention against exact attention, both against
``scaled_dot_product_attention`` (today's real baseline, which no longer stores the
``n x n`` matrix) and against attention that materializes it (the paper's baseline).
Ratios are "saved" factors: baseline / Linformer. One fresh process per case; the cases
of one length are timed interleaved, and every cell has its median, spread and flags
(:mod:`linattn.bench.checks`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .._plotting import finish, log_axes, pyplot
from . import checks
from .results import TIMING_FIELDS, footnotes, machine_info, write_results
from .speed import run_cases

PRESETS = {
    "quick": {"lengths": [512, 1024, 2048, 4096], "dims": [128, 256, 512]},
    "full": {"lengths": [512, 1024, 2048, 4096, 8192, 16384], "dims": [128, 256, 512, 1024, 2048]},
}
# The paper's time savings on a V100 (Table 3), for the cells it reports here.
PAPER_TIME_SAVED = {(8192, 128): 5.5, (16384, 128): 8.6}
# Materializing n x n stops here (16384: 8.6 GB in float32 for 8 heads).
MATERIALIZED_MAX = 16384


def run(
    out_dir, *, preset="quick", heads=8, head_dim=64, repeats=5, lengths=None, progress=True
) -> dict:
    conf = dict(PRESETS[preset])
    if lengths:
        conf["lengths"] = sorted(lengths)
    base = {
        "pass": "fwd",
        "batch": 1,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": "float32",
        "repeats": repeats,
        "causal": False,
        "num_features": 0,
    }
    groups = []
    for n in conf["lengths"]:
        cases = [{**base, "method": "exact", "length": n}]
        if n <= MATERIALIZED_MAX:
            cases.append({**base, "method": "materialized", "length": n})
        cases += [
            {**base, "method": "linformer", "length": n, "proj_dim": k}
            for k in conf["dims"]
            if k < n
        ]
        groups.append(cases)
    load_before = os.getloadavg()
    rows = run_cases(groups, repeats=repeats, progress=progress, desc="linformer table")
    index = {(r["method"], r["length"]): r for r in rows if "median_s" in r}
    for r in rows:
        if r["method"] != "linformer" or "median_s" not in r:
            continue
        for ref in ("exact", "materialized"):
            b = index.get((ref, r["length"]))
            if b is not None:
                r[f"time_saved_vs_{ref}"] = b["median_s"] / r["median_s"]
                r[f"memory_saved_vs_{ref}"] = b["peak_added_bytes"] / max(r["peak_added_bytes"], 1)
        paper = PAPER_TIME_SAVED.get((r["length"], r["proj_dim"]))
        if paper is not None:
            r["paper_time_saved"] = paper
    checks.flag_linformer(rows)
    result = {
        "machine": machine_info(),
        "config": base,
        "results": rows,
        "lengths": conf["lengths"],
        "dims": conf["dims"],
        "load": {"before": load_before, "after": os.getloadavg()},
    }
    out = Path(out_dir)
    write_results(
        out,
        "linformer",
        result,
        [
            "method",
            "length",
            "proj_dim",
            *TIMING_FIELDS,
            "time_saved_vs_exact",
            "time_saved_vs_materialized",
            "memory_saved_vs_exact",
            "memory_saved_vs_materialized",
            "paper_time_saved",
            "flags",
            "error",
        ],
    )
    plot(result, out / "linformer.png")
    return result


def format_table(result: dict) -> str:
    """The paper's layout: rows n, columns k; cells 'time saved / memory saved'."""
    dims = result["dims"]
    cells = {
        (r["length"], r["proj_dim"]): r
        for r in result["results"]
        if r["method"] == "linformer" and "median_s" in r
    }
    refs = {
        (r["method"], r["length"]): r
        for r in result["results"]
        if r["method"] != "linformer" and "median_s" in r
    }
    marks, notes = footnotes(result["results"], _row_label)
    m = result["machine"]
    lines = [
        f"Linformer forward, batch 1, {result['config']['heads']} heads, head_dim "
        f"{result['config']['head_dim']}, float32; {m['processor']}, {m['cpu_count']} "
        f"cores, torch {m['torch']}"
    ]
    for ref, title in (
        ("materialized", "vs attention that materializes n x n (the paper's baseline)"),
        ("exact", "vs scaled_dot_product_attention"),
    ):
        lines += [
            "",
            f"time saved / memory saved, {title}",
            f"{'n':>7} | " + " | ".join(f"k={k:<11}" for k in dims),
        ]
        for n in result["lengths"]:
            row = []
            for k in dims:
                r = cells.get((n, k))
                if r is None or f"time_saved_vs_{ref}" not in r:
                    row.append(f"{'-':<13}")
                    continue
                bad = [marks[id(x)] for x in (r, refs.get((ref, n))) if x and id(x) in marks]
                mark = (checks.WARN + ",".join(map(str, bad))) if bad else ""
                row.append(
                    f"{r[f'time_saved_vs_{ref}']:5.1f}x/{r[f'memory_saved_vs_{ref}']:5.1f}x{mark}"
                )
            lines.append(f"{n:>7} | " + " | ".join(row))
    paper = [
        f"n={n}, k={k}: paper {v}x (V100), here "
        f"{cells[(n, k)].get('time_saved_vs_materialized', float('nan')):.1f}x"
        for (n, k), v in PAPER_TIME_SAVED.items()
        if (n, k) in cells
    ]
    if paper:
        lines += ["", "time saved vs the paper's baseline: " + "; ".join(paper)]
    lines += [""] + (notes or ["no cell flagged (spread, growth within complexity)"])
    return "\n".join(lines)


def _row_label(r: dict) -> str:
    name = f"Linformer k={r['proj_dim']}" if r["method"] == "linformer" else r["method"]
    return f"n={r['length']}, {name}"


def plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in result["results"] if r["method"] == "linformer" and "median_s" in r]
    for ax, ref in zip(axes, ("materialized", "exact")):
        for k in result["dims"]:
            pts = sorted(
                (r["length"], r[f"time_saved_vs_{ref}"])
                for r in rows
                if r["proj_dim"] == k and f"time_saved_vs_{ref}" in r
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=f"k = {k}")
        if ref == "materialized":
            # The paper measured against materialized attention only.
            for (n, k), v in PAPER_TIME_SAVED.items():
                ax.scatter(
                    [n],
                    [v],
                    marker="*",
                    s=120,
                    color="black",
                    zorder=5,
                    label=f"paper, V100, k = {k}" if n == 8192 else None,
                )
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        log_axes(
            ax,
            xlabel="sequence length n (tokens)",
            ylabel="time saved (baseline time / Linformer time)",
            title="vs attention materializing n x n (the paper's baseline)"
            if ref == "materialized"
            else "vs scaled_dot_product_attention",
        )
        ax.legend(fontsize=8)
    finish(
        fig,
        path,
        dpi=110,
        title="Linformer forward time saved (the paper's Table 3 on this CPU)",
        fontsize=11,
    )
