"""Speed and memory of FAVOR+ against exact attention, one fresh process per case.

``linattn bench`` runs this; results go to ``OUT/bench.json``, ``OUT/bench.csv`` and
``OUT/bench.png`` and a table is printed. Ratios are taken within one run, on the same
machine, beside the matmul rate measured in the same run.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .._io import atomic_open, write_json
from .._plotting import pyplot

PRESETS = {
    "quick": {"lengths": [1024, 2048, 4096], "repeats": 3, "kernels": ["softmax"]},
    "full": {"lengths": [1024, 2048, 4096, 8192, 16384], "repeats": 5,
             "kernels": ["softmax", "softmax_hyp", "softmax_opt", "relu"]},
}

METHODS = [
    ("exact", False),
    ("exact", True),
    ("materialized", False),
    ("favor", False),
    ("favor", True),
]
# The n x n matrix (and its gradient) of 8 heads at 16384 tokens needs ~26 GB.
MATERIALIZED_MAX = 8192


def _label(method: str, causal: bool, kernel: str = "softmax") -> str:
    name = {"exact": "exact (SDPA)", "materialized": "exact (n x n)"}.get(method)
    if name is None:
        name = "FAVOR+" if kernel == "softmax" else f"FAVOR {kernel}"
    return f"{name}{' causal' if causal else ''}"


def _cases(lengths, passes, kernels, base):
    for length in lengths:
        for p in passes:
            for method, causal in METHODS:
                if method == "materialized" and length > MATERIALIZED_MAX:
                    continue
                for kernel in kernels if method == "favor" else ["softmax"]:
                    if causal and kernel == "softmax_opt":
                        continue
                    yield {**base, "method": method, "causal": causal, "pass": p,
                           "length": length, "kernel": kernel}


def matmul_rate(n: int = 4096, repeats: int = 5) -> float:
    """float32 GFLOP/s of an ``n x n`` matmul on this machine, median of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def flops(case: dict) -> float:
    """Forward FLOPs: 8 L m d per head for FAVOR+, 4 L^2 d for exact (half if causal)."""
    length, d, heads = case["length"], case["head_dim"], case["heads"] * case["batch"]
    if case["method"] == "favor":
        return 8.0 * length * case["num_features"] * d * heads
    full = 4.0 * length * length * d * heads
    return full / 2 if case.get("causal") else full


def run_case(case: dict) -> dict:
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "linattn.bench.worker", json.dumps(case)],
        capture_output=True, text=True, env=env, check=False,
    )
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(
    out_dir: str | Path,
    *,
    preset: str = "quick",
    lengths: list[int] | None = None,
    heads: int = 8,
    head_dim: int = 64,
    num_features: int = 256,
    passes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    repeats: int | None = None,
    progress: bool = True,
) -> dict:
    """Run the benchmark and write its files; returns the results dict."""
    from tqdm import tqdm

    conf = PRESETS[preset]
    lengths = lengths or conf["lengths"]
    repeats = repeats or conf["repeats"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = {"batch": 1, "heads": heads, "head_dim": head_dim, "num_features": num_features,
            "dtype": "float32", "repeats": repeats}
    cases = list(_cases(lengths, passes, conf["kernels"], base))
    rate = matmul_rate()
    rows = []
    for case in tqdm(cases, desc="bench", disable=not progress, unit="case"):
        res = run_case(case)
        if "median_s" in res and res["pass"] == "fwd":
            res["gflops"] = flops(res) / res["median_s"] / 1e9
            res["pct_matmul"] = 100.0 * res["gflops"] / rate
        rows.append(res)
    _add_ratios(rows)
    result = {"machine": machine_info(), "matmul_gflops": rate, "results": rows}
    write_results(out, "bench", result, _CSV_FIELDS)
    plot(result, out / "bench.png")
    return result


def _add_ratios(rows: list[dict]) -> None:
    """speedup = exact time / FAVOR+ time for the same length, pass and causality."""
    index = {
        (r["method"], r["causal"], r["pass"], r["length"], r.get("kernel", "softmax")): r
        for r in rows if "median_s" in r
    }
    for r in rows:
        if r["method"] != "favor" or "median_s" not in r:
            continue
        kernel = r.get("kernel", "softmax")
        ref = index.get(("exact", r["causal"], r["pass"], r["length"], "softmax"))
        if ref is not None:
            r["speedup_vs_exact"] = ref["median_s"] / r["median_s"]
        mat = index.get(("materialized", False, r["pass"], r["length"], "softmax"))
        if mat is not None and not r["causal"]:
            r["speedup_vs_materialized"] = mat["median_s"] / r["median_s"]
        bi = index.get(("favor", False, r["pass"], r["length"], kernel))
        if r["causal"] and bi is not None:
            r["causal_over_bidirectional"] = r["median_s"] / bi["median_s"]


_CSV_FIELDS = [
    "method", "kernel", "causal", "pass", "length", "heads", "head_dim", "num_features",
    "dtype", "median_s", "peak_added_bytes", "gflops", "pct_matmul", "speedup_vs_exact",
    "speedup_vs_materialized",
    "causal_over_bidirectional", "error",
]


def write_results(out: Path, stem: str, result: dict, fields: list[str]) -> None:
    """``OUT/stem.json`` (everything) and ``OUT/stem.csv`` (``result["results"]`` rows)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", result)
    with atomic_open(out / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(result["results"])


def format_table(result: dict) -> str:
    """A plain-text table of the results (times in ms, memory in MB)."""
    lines = [
        f"machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, "
        f"torch {result['machine']['torch']}, {result['machine']['threads']} threads; "
        f"float32 matmul {result['matmul_gflops']:.0f} GFLOP/s",
        f"{'pass':8} {'L':>6} {'method':26} {'median ms':>10} {'peak MB':>9} "
        f"{'speed-up':>9} {'GFLOP/s':>8} {'% mm':>5}",
    ]
    for r in result["results"]:
        if "median_s" not in r:
            lines.append(f"{r['pass']:8} {r['length']:>6} "
                         f"{_label(r['method'], r['causal'], r.get('kernel', 'softmax')):26}"
                         f" failed: {r.get('error')}")
            continue
        sp = f"{r['speedup_vs_exact']:.1f}x" if "speedup_vs_exact" in r else ""
        gf = f"{r['gflops']:.0f}" if "gflops" in r else ""
        pct = f"{r['pct_matmul']:.0f}" if "pct_matmul" in r else ""
        lines.append(
            f"{r['pass']:8} {r['length']:>6} "
            f"{_label(r['method'], r['causal'], r.get('kernel', 'softmax')):26} "
            f"{1e3 * r['median_s']:>10.1f} {r['peak_added_bytes'] / 2**20:>9.1f} {sp:>9} "
            f"{gf:>8} {pct:>5}"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Time and peak memory against length, log-log, with O(L) and O(L^2) guides."""
    plt = pyplot()

    rows = [r for r in result["results"] if "median_s" in r]
    passes = sorted({r["pass"] for r in rows}, key=["fwd", "fwd+bwd"].index)
    fig, axes = plt.subplots(2, len(passes), figsize=(6 * len(passes), 8.5), squeeze=False)
    styles = {("exact", False): ("C0", "-"), ("exact", True): ("C0", "--"),
              ("materialized", False): ("C2", ":"),
              ("favor", False): ("C3", "-"), ("favor", True): ("C3", "--")}
    rows = [r for r in rows if r.get("kernel", "softmax") == "softmax"]
    for col, p in enumerate(passes):
        for row, (key, unit, scale, title) in enumerate(
            [("median_s", "time (s)", 1.0, "time"),
             ("peak_added_bytes", "peak memory added (MB)", 2**-20, "peak memory")]
        ):
            ax = axes[row][col]
            for (method, causal), (color, ls) in styles.items():
                pts = sorted((r["length"], r[key] * scale) for r in rows
                             if r["pass"] == p and r["method"] == method
                             and r["causal"] == causal)
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", color=color, ls=ls,
                            label=_label(method, causal))
            _guides(ax, [r["length"] for r in rows if r["pass"] == p])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length L (tokens)")
            ax.set_ylabel(unit)
            ax.set_title(f"{title}, {p}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper left")
    m = result["machine"]
    rs = rows[0] if rows else {}
    fig.suptitle(
        f"linattn FAVOR+ vs exact attention: batch 1, {rs.get('heads')} heads, head_dim "
        f"{rs.get('head_dim')}, {rs.get('num_features')} features, float32\n"
        f"{m['processor']}, {m['cpu_count']} cores, {m['threads']} threads, torch {m['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _guides(ax, lengths: list[int]) -> None:
    # Dotted slope guides: O(L) and O(L^2), anchored at the axes' lower-left data.
    if not lengths:
        return
    lo, hi = min(lengths), max(lengths)
    ymin = min(line.get_ydata().min() for line in ax.get_lines()) if ax.get_lines() else 1
    for power, label in ((1, "O(L)"), (2, "O(L²)")):
        ax.plot([lo, hi], [ymin, ymin * (hi / lo) ** power], color="gray", ls=":", lw=1)
        ax.annotate(label, (hi, ymin * (hi / lo) ** power), fontsize=8, color="gray",
                    ha="right", va="bottom")
