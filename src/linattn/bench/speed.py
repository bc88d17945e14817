"""Speed and memory of FAVOR+ against exact attention, one fresh process per case.

``linattn bench`` runs this; results go to ``OUT/bench.json``, ``OUT/bench.csv`` and
``OUT/bench.png`` and a table is printed. Ratios are taken within one run, on the same
machine, beside the matmul rate measured in the same run.

The cases compared with each other (every method at one length and pass) are timed
interleaved: one live worker process per case, one repeat of each in turn
(:func:`run_cases`), so that a neighbouring load slows them alike. Every cell reports its
median and spread; unstable cells get extra repeats, and cells that stay unstable or fail
a consistency check are flagged (:mod:`linattn.bench.checks`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .._plotting import finish, log_axes, pyplot
from . import checks
from .results import (
    footnotes,
    machine_info,
    plot_rows,
    spread_and_mark,
    write_results,
)

PRESETS = {
    "quick": {"lengths": [1024, 2048, 4096], "repeats": 5, "kernels": ["softmax"]},
    "full": {
        "lengths": [1024, 2048, 4096, 8192, 16384],
        "repeats": 5,
        "kernels": ["softmax", "softmax_hyp", "softmax_opt", "relu"],
    },
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


def _label(method: str, causal: bool, kernel: str = "softmax", window: int | None = None) -> str:
    name = {"exact": "exact (SDPA)", "materialized": "exact (n x n)"}.get(method)
    if name is None:
        name = "FAVOR+" if kernel == "softmax" else f"FAVOR {kernel}"
        if window is not None:
            name += f" w{window}"
    return f"{name}{' causal' if causal else ''}"


def _row_name(r: dict) -> str:
    return _label(r["method"], r["causal"], r.get("kernel", "softmax"), r.get("window"))


def _cases(lengths, passes, kernels, base, windows=()):
    for length in lengths:
        for p in passes:
            for method, causal in METHODS:
                if method == "materialized" and length > MATERIALIZED_MAX:
                    continue
                for kernel in kernels if method == "favor" else ["softmax"]:
                    if causal and kernel == "softmax_opt":
                        continue
                    yield {
                        **base,
                        "method": method,
                        "causal": causal,
                        "pass": p,
                        "length": length,
                        "kernel": kernel,
                    }
                # The window hybrid (exact band + FAVOR+ beyond), softmax features.
                for window in windows if method == "favor" else ():
                    yield {
                        **base,
                        "method": method,
                        "causal": causal,
                        "pass": p,
                        "length": length,
                        "kernel": "softmax",
                        "window": window,
                    }


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


def flops(case: dict) -> float:
    """Forward FLOPs: 8 L m d per head for FAVOR+ (plus 4 L b d for a window's exact band
    of b = 2w + 1 keys, w causal), 4 L^2 d for exact (half if causal)."""
    length, d, heads = case["length"], case["head_dim"], case["heads"] * case["batch"]
    if case["method"] == "favor":
        window = case.get("window")
        band = 0 if window is None else (window if case.get("causal") else 2 * window + 1)
        return (8.0 * case["num_features"] + 4.0 * band) * length * d * heads
    full = 4.0 * length * length * d * heads
    return full / 2 if case.get("causal") else full


def run_case(case: dict) -> dict:
    """One case alone in a fresh process (no interleaving): :func:`worker.measure`."""
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "linattn.bench.worker", json.dumps(case)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _Worker:
    """A ``worker --serve`` process holding one case."""

    def __init__(self, case: dict):
        self.case = case
        self.err = tempfile.TemporaryFile(mode="w+")  # never a full pipe
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "linattn.bench.worker", "--serve", json.dumps(case)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            env=dict(os.environ),
        )
        self.ready = self._read()
        self.times: list[float] = []

    def _read(self) -> dict | None:
        """The next protocol message (lines that are not JSON objects are skipped)."""
        for line in self.proc.stdout:
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        return None

    def time_once(self) -> bool:
        try:
            self.proc.stdin.write("time\n")
            self.proc.stdin.flush()
        except OSError:
            return False
        msg = self._read()
        if msg is None:
            return False
        self.times.append(msg["t"])
        return True

    def finish(self) -> dict:
        """The case's row (and the process's end)."""
        done = None
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                done = self._read()
            except OSError:
                pass
        self.proc.communicate()
        self.err.seek(0)
        err = self.err.read()
        self.err.close()
        if self.ready is None or (not self.times and done is None):
            tail = err.strip().splitlines()[-1:] or ["failed"]
            return {**self.case, "error": tail}
        times = self.times or [self.ready["first_s"]]
        row = {
            **self.case,
            **checks.summarize(times),
            "times_s": times,
            "first_s": self.ready["first_s"],
            "peak_added_bytes": self.ready["peak_added_bytes"],
            "peak_exact": self.ready["peak_exact"],
        }
        if done:
            row.update({k: v for k, v in done.items() if k != "done"})
        return row


def interleave(
    timers: list,
    repeats: int,
    *,
    budget_s: float | None = None,
    limit: float = checks.SPREAD_LIMIT,
    extra: int = checks.EXTRA_ROUNDS,
) -> None:
    """Round-robin repeats: ``repeats`` rounds of one ``time_once()`` per timer, then up
    to ``extra`` more rounds over the timers whose spread is above ``limit``. A timer
    whose repeats already took ``budget_s`` gets no more (the slowest cells).

    ``timers``: objects with ``times`` (a list the calls append to) and ``time_once()``
    (returns False when it failed; that timer is dropped)."""
    live = list(timers)

    def spent(t) -> bool:
        return budget_s is not None and len(t.times) >= 1 and sum(t.times) > budget_s

    for _ in range(repeats):
        live = [t for t in live if spent(t) or t.time_once()]
    for _ in range(extra):
        shaky = [t for t in live if not spent(t) and checks.unstable(t.times, limit)]
        if not shaky:
            break
        for t in shaky:
            if not t.time_once():
                live.remove(t)


def run_cases(
    groups: list[list[dict]],
    *,
    repeats: int,
    budget_s: float = 20.0,
    progress: bool = True,
    desc: str = "bench",
) -> list[dict]:
    """Time every case of ``groups``, each group interleaved (:func:`interleave`) with one
    fresh ``worker --serve`` process per case (started one after the other, so that the
    first call, which measures the peak memory, runs alone). Rows as :func:`run_case`
    gives, plus the spread statistics of :func:`checks.summarize`."""
    from tqdm import tqdm

    rows = []
    bar = tqdm(total=sum(len(g) for g in groups), desc=desc, unit="case", disable=not progress)
    for group in groups:
        workers = [_Worker(case) for case in group]
        interleave([w for w in workers if w.ready is not None], repeats, budget_s=budget_s)
        for w in workers:
            rows.append(w.finish())
            bar.update(1)
    bar.close()
    return rows


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
    windows: tuple[int, ...] = (),
    progress: bool = True,
) -> dict:
    """Run the benchmark and write its files; returns the results dict. ``windows``: also
    time the window hybrid (``favor_attention(..., window=w)``, softmax features) for each
    ``w``, interleaved with the rest, with its time over pure FAVOR+'s (``over_favor``)."""

    conf = PRESETS[preset]
    lengths = lengths or conf["lengths"]
    repeats = repeats or conf["repeats"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = {
        "batch": 1,
        "heads": heads,
        "head_dim": head_dim,
        "num_features": num_features,
        "dtype": "float32",
        "repeats": repeats,
    }
    cases = list(_cases(lengths, passes, conf["kernels"], base, windows))
    groups: dict = {}
    for case in cases:  # every method at one length and pass: timed interleaved
        groups.setdefault((case["length"], case["pass"]), []).append(case)
    load_before = os.getloadavg()
    rate = matmul_rate()
    rows = run_cases(list(groups.values()), repeats=repeats, progress=progress)
    for res in rows:
        if "median_s" in res and res["pass"] == "fwd":
            res["gflops"] = flops(res) / res["median_s"] / 1e9
            res["pct_matmul"] = 100.0 * res["gflops"] / rate
    _add_ratios(rows)
    checks.flag_speed(rows)
    result = {
        "machine": machine_info(),
        "matmul_gflops": rate,
        "results": rows,
        "load": {"before": load_before, "after": os.getloadavg()},
    }
    write_results(out, "bench", result, _CSV_FIELDS)
    plot(result, out / "bench.png")
    return result


def _add_ratios(rows: list[dict]) -> None:
    """speedup = exact time / FAVOR+ time for the same length, pass and causality."""
    index = {
        (r["method"], r["causal"], r["pass"], r["length"], r.get("kernel", "softmax")): r
        for r in rows
        if "median_s" in r and r.get("window") is None
    }
    for r in rows:
        if r["method"] != "favor" or "median_s" not in r:
            continue
        kernel = r.get("kernel", "softmax")
        if r.get("window") is not None:
            pure = index.get(("favor", r["causal"], r["pass"], r["length"], kernel))
            if pure is not None:
                r["over_favor"] = r["median_s"] / pure["median_s"]
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
    "method",
    "kernel",
    "causal",
    "pass",
    "length",
    "heads",
    "head_dim",
    "num_features",
    "dtype",
    "median_s",
    "q1_s",
    "q3_s",
    "min_s",
    "max_s",
    "spread",
    "n",
    "peak_added_bytes",
    "gflops",
    "pct_matmul",
    "speedup_vs_exact",
    "speedup_vs_materialized",
    "causal_over_bidirectional",
    "window",
    "over_favor",
    "flags",
    "error",
]


def _load_line(result: dict) -> str:
    load = result.get("load")
    if not load:
        return ""
    return (
        f"machine load (1/5/15-min averages) before {_fmt_load(load['before'])}, "
        f"after {_fmt_load(load['after'])}"
    )


def _fmt_load(avg) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def _row_label(r: dict) -> str:
    return f"{r['pass']}, L={r['length']}, {_row_name(r)}"


def format_table(result: dict) -> str:
    """A plain-text table of the results (times in ms, memory in MB); ``spread`` is the
    interquartile range over the median (the range below 4 repeats), ``⚠n`` a flagged
    cell, explained below the table; ``/FAVOR+``: a window hybrid's time over pure
    FAVOR+'s."""
    marks, notes = footnotes(result["results"], _row_label)
    lines = [
        f"machine: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, "
        f"torch {result['machine']['torch']}, {result['machine']['threads']} threads; "
        f"float32 matmul {result['matmul_gflops']:.0f} GFLOP/s",
        f"{'pass':8} {'L':>6} {'method':26} {'median ms':>10} {'spread':>7} {'n':>3} "
        f"{'peak MB':>9} {'speed-up':>9} {'GFLOP/s':>8} {'% mm':>5}"
        + (f" {'/FAVOR+':>7}" if any("window" in r for r in result["results"]) else ""),
    ]
    if result.get("load"):
        lines.insert(1, _load_line(result))
    for r in result["results"]:
        if "median_s" not in r:
            lines.append(
                f"{r['pass']:8} {r['length']:>6} {_row_name(r):26} failed: {r.get('error')}"
            )
            continue
        sp = f"{r['speedup_vs_exact']:.1f}x" if "speedup_vs_exact" in r else ""
        gf = f"{r['gflops']:.0f}" if "gflops" in r else ""
        pct = f"{r['pct_matmul']:.0f}" if "pct_matmul" in r else ""
        spread, mark = spread_and_mark(r, marks)
        over = f" {r['over_favor']:>6.2f}x" if "over_favor" in r else ""
        lines.append(
            f"{r['pass']:8} {r['length']:>6} {_row_name(r):26} "
            f"{1e3 * r['median_s']:>10.1f} {spread:>7} {r.get('n', ''):>3} "
            f"{r['peak_added_bytes'] / 2**20:>9.1f} {sp:>9} {gf:>8} {pct:>5}{over}{mark}"
        )
    lines += notes or ["no cell flagged (spread, fwd <= fwd+bwd, growth within complexity)"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Time and peak memory against length, log-log, with O(L) and O(L^2) guides; no
    figure when no case succeeded (the table says why)."""
    rows = [r for r in result["results"] if "median_s" in r]
    if not rows:
        return
    plt = pyplot()
    passes = sorted({r["pass"] for r in rows}, key=["fwd", "fwd+bwd"].index)
    fig, axes = plt.subplots(2, len(passes), figsize=(max(9, 6 * len(passes)), 8.5), squeeze=False)
    styles = {
        ("exact", False): ("C0", "-"),
        ("exact", True): ("C0", "--"),
        ("materialized", False): ("C2", ":"),
        ("favor", False): ("C3", "-"),
        ("favor", True): ("C3", "--"),
    }
    rows = [r for r in rows if r.get("kernel", "softmax") == "softmax"]
    windows = sorted({r["window"] for r in rows if r.get("window") is not None})
    for col, p in enumerate(passes):
        for row, (key, unit, scale, title) in enumerate(
            [
                ("median_s", "time (s)", 1.0, "time"),
                ("peak_added_bytes", "peak memory added (MB)", 2**-20, "peak memory"),
            ]
        ):
            ax = axes[row][col]
            for (method, causal), (color, ls) in styles.items():
                sel = [
                    r
                    for r in rows
                    if r["pass"] == p
                    and r["method"] == method
                    and r["causal"] == causal
                    and r.get("window") is None
                ]
                _length_curve(ax, sel, key, scale, color, ls, _label(method, causal))
            for i, window in enumerate(windows):
                for causal in (False, True):
                    sel = [
                        r
                        for r in rows
                        if r["pass"] == p and r["causal"] == causal and r.get("window") == window
                    ]
                    label = _label("favor", causal, window=window)
                    _length_curve(ax, sel, key, scale, f"C{4 + i}", "--" if causal else "-", label)
            _guides(ax, [r["length"] for r in rows if r["pass"] == p])
            log_axes(ax, xlabel="sequence length L (tokens)", ylabel=unit, title=f"{title}, {p}")
            ax.legend(fontsize=8, loc="upper left")
    m = result["machine"]
    rs = rows[0] if rows else {}
    flagged = sum(bool(r.get("flags")) for r in rows)
    finish(
        fig,
        path,
        dpi=110,
        title=f"linattn FAVOR+ vs exact attention: batch 1, {rs.get('heads')} heads, head_dim "
        f"{rs.get('head_dim')}, {rs.get('num_features')} features, float32\n"
        f"{m['processor']}, {m['cpu_count']} cores, {m['threads']} threads, torch {m['torch']}"
        f"; medians, bars: interquartile range"
        + (f"; hollow {checks.WARN}: {flagged} flagged (see the table)" if flagged else ""),
        fontsize=10,
    )


def _length_curve(ax, rows: list[dict], key: str, scale: float, color, ls, label: str) -> None:
    """:func:`~linattn.bench.results.plot_rows` of ``rows`` (any order) against length, error bars on times;
    nothing when ``rows`` is empty."""
    if rows:
        rows = sorted(rows, key=lambda r: r["length"])
        plot_rows(ax, rows, key, scale, color, ls, label, errors=key == "median_s")


def _guides(ax, lengths: list[int]) -> None:
    # Dotted slope guides: O(L) and O(L^2), anchored at the axes' lower-left data.
    if not lengths:
        return
    lo, hi = min(lengths), max(lengths)
    ymin = min(line.get_ydata().min() for line in ax.get_lines()) if ax.get_lines() else 1
    for power, label in ((1, "O(L)"), (2, "O(L²)")):
        ax.plot([lo, hi], [ymin, ymin * (hi / lo) ** power], color="gray", ls=":", lw=1)
        ax.annotate(
            label,
            (hi, ymin * (hi / lo) ** power),
            fontsize=8,
            color="gray",
            ha="right",
            va="bottom",
        )
