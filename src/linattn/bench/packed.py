"""Packed sequences against the same sequences padded: ``linattn bench --suite pack``.

N sequences of varying length (default: 16, lengths drawn log-uniformly from 64..4096
with a fixed seed, :func:`draw_lengths`) go through :func:`linattn.favor_attention`
twice: packed back to back in one row with ``cu_seqlens`` (``(1, H, T, d)``, T the sum
of the lengths) and as a padded batch with ``key_padding_mask`` (``(N, H, L_max, d)``),
for the bidirectional, causal and window forms, forward and forward+backward. The two of
each form and pass are timed interleaved, one fresh worker process each
(:func:`linattn.bench.speed.run_cases`); ``padded_over_packed`` is the padded time over
the packed one (above 1: packing is faster), ``memory_padded_over_packed`` the same for
the peak memory added. Results go to ``OUT/pack.json``, ``OUT/pack.csv`` and
``OUT/pack.png``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .._plotting import finish, pyplot
from . import checks
from .results import TIMING_FIELDS, footnotes, machine_info, spread_and_mark, write_results

PRESETS = {
    "quick": {"count": 16, "repeats": 5},
    "full": {"count": 64, "repeats": 5},
}
#: The default range of the drawn lengths (tokens), and the window of the window form.
LENGTHS = (64, 4096)
WINDOW = 64
SEED = 0


def draw_lengths(count: int, low: int, high: int, seed: int = SEED) -> list[int]:
    """``count`` lengths drawn log-uniformly from ``low..high`` (inclusive), the same
    for the same arguments."""
    if not 1 <= low <= high:
        raise ValueError(f"pack lengths must satisfy 1 <= low <= high, got {low}..{high}")
    u = torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    drawn = torch.exp(math.log(low) + u * (math.log(high + 1) - math.log(low))).floor()
    return [int(n) for n in drawn.clamp(low, high)]


def forms(windows: tuple[int, ...]) -> list[tuple[str, bool, int | None]]:
    """``(form, causal, window)`` of every timed form."""
    out = [("bidirectional", False, None), ("causal", True, None)]
    for w in windows:
        out += [("window", False, w), ("window causal", True, w)]
    return out


def cases(lengths: list[int], passes, windows, base: dict) -> list[list[dict]]:
    """The timed cases, grouped (packed and padded of one form and pass together)."""
    total, longest = sum(lengths), max(lengths)
    common = {
        **base,
        "seq_lengths": lengths,
        "count": len(lengths),
        "tokens": total,
        "padded_tokens": len(lengths) * longest,
        "fill": total / (len(lengths) * longest),
    }
    groups = []
    for form, causal, window in forms(windows):
        for p in passes:
            kw = {**common, "form": form, "causal": causal, "window": window, "pass": p}
            groups.append(
                [
                    {**kw, "method": "packed", "batch": 1, "length": total},
                    {**kw, "method": "padded", "batch": len(lengths), "length": longest},
                ]
            )
    return groups


def run(
    out_dir: str | Path,
    *,
    preset: str = "quick",
    count: int | None = None,
    low: int = LENGTHS[0],
    high: int = LENGTHS[1],
    heads: int = 8,
    head_dim: int = 64,
    num_features: int = 256,
    passes: tuple[str, ...] = ("fwd", "fwd+bwd"),
    repeats: int | None = None,
    windows: tuple[int, ...] = (WINDOW,),
    progress: bool = True,
) -> dict:
    """Run the suite and write its files; returns the results dict (``lengths``: the
    drawn lengths)."""
    from .speed import run_cases

    conf = PRESETS[preset]
    lengths = draw_lengths(count or conf["count"], low, high)
    repeats = repeats or conf["repeats"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = {
        "heads": heads,
        "head_dim": head_dim,
        "num_features": num_features,
        "dtype": "float32",
        "repeats": repeats,
    }
    load_before = os.getloadavg()
    rows = run_cases(
        cases(lengths, passes, windows, base), repeats=repeats, progress=progress, desc="pack"
    )
    _add_ratios(rows)
    checks.flag_speed(rows)
    result = {
        "machine": machine_info(),
        "lengths": lengths,
        "length_range": [low, high],
        "seed": SEED,
        "results": rows,
        "load": {"before": load_before, "after": os.getloadavg()},
    }
    write_results(out, "pack", result, _CSV_FIELDS)
    plot(result, out / "pack.png")
    return result


def _key(r: dict) -> tuple:
    return (r["form"], r.get("window"), r["pass"])


def _add_ratios(rows: list[dict]) -> None:
    """On each packed row: the padded time (and peak memory) over the packed one."""
    padded = {_key(r): r for r in rows if r["method"] == "padded" and "median_s" in r}
    for r in rows:
        other = padded.get(_key(r))
        if r["method"] != "packed" or "median_s" not in r or other is None:
            continue
        r["padded_over_packed"] = other["median_s"] / r["median_s"]
        if r["peak_added_bytes"] > 0 and other["peak_added_bytes"] > 0:
            r["memory_padded_over_packed"] = other["peak_added_bytes"] / r["peak_added_bytes"]


_CSV_FIELDS = [
    "method",
    "form",
    "window",
    "causal",
    "pass",
    "count",
    "tokens",
    "padded_tokens",
    "fill",
    "batch",
    "length",
    "heads",
    "head_dim",
    "num_features",
    "dtype",
    *TIMING_FIELDS,
    "padded_over_packed",
    "memory_padded_over_packed",
    "flags",
    "error",
]


def _label(r: dict) -> str:
    window = f" w{r['window']}" if r.get("window") is not None else ""
    return f"{r['pass']}, {r['form']}{window}, {r['method']}"


def format_table(result: dict) -> str:
    """A plain-text table (times in ms, memory in MB); ``padded/packed``: the padded
    batch's time over the packed row's."""
    rows = result["results"]
    marks, notes = footnotes(rows, _label)
    m = result["machine"]
    lengths = result["lengths"]
    first = rows[0] if rows else {}
    lines = [
        f"machine: {m['processor']}, {m['cpu_count']} cores, torch {m['torch']}, "
        f"{m['threads']} threads",
        f"{len(lengths)} sequences, lengths log-uniform in {result['length_range'][0]}.."
        f"{result['length_range'][1]} (seed {result['seed']}): {sum(lengths)} tokens packed, "
        f"{len(lengths) * max(lengths)} padded ({100 * first.get('fill', 0):.0f}% real); "
        f"{first.get('heads')} heads, head_dim {first.get('head_dim')}, "
        f"{first.get('num_features')} features, float32",
        f"{'pass':8} {'form':18} {'method':7} {'median ms':>10} {'spread':>7} {'n':>3} "
        f"{'peak MB':>9} {'padded/packed':>13}",
    ]
    for r in rows:
        form = r["form"] + (f" w{r['window']}" if r.get("window") is not None else "")
        if "median_s" not in r:
            lines.append(f"{r['pass']:8} {form:18} {r['method']:7} failed: {r.get('error')}")
            continue
        spread, mark = spread_and_mark(r, marks)
        ratio = f"{r['padded_over_packed']:.2f}x" if "padded_over_packed" in r else ""
        lines.append(
            f"{r['pass']:8} {form:18} {r['method']:7} {1e3 * r['median_s']:>10.1f} "
            f"{spread:>7} {r.get('n', ''):>3} {r['peak_added_bytes'] / 2**20:>9.1f} "
            f"{ratio:>13}{mark}"
        )
    lines += notes or ["no cell flagged (spread, fwd <= fwd+bwd)"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bars of the packed and padded times per form, one panel per pass, each pair
    labelled with its ratio; no figure when no case succeeded."""
    rows = [r for r in result["results"] if "median_s" in r]
    if not rows:
        return
    plt = pyplot()
    passes = sorted({r["pass"] for r in rows}, key=["fwd", "fwd+bwd"].index)
    fig, axes = plt.subplots(1, len(passes), figsize=(max(9, 6 * len(passes)), 4.2), squeeze=False)
    for ax, p in zip(axes[0], passes):
        keys = list(dict.fromkeys(_key(r) for r in rows if r["pass"] == p))
        names = [f"{f}{'' if w is None else f' w{w}'}" for f, w, _ in keys]
        for i, (method, color) in enumerate((("packed", "C3"), ("padded", "C0"))):
            by = {_key(r): r for r in rows if r["method"] == method}
            ys = [1e3 * by[k]["median_s"] if k in by else 0.0 for k in keys]
            xs = [j + (i - 0.5) * 0.4 for j in range(len(keys))]
            ax.bar(xs, ys, width=0.4, color=color, label=method)
        for j, k in enumerate(keys):
            packed = next((r for r in rows if r["method"] == "packed" and _key(r) == k), None)
            if packed is not None and "padded_over_packed" in packed:
                top = max(1e3 * r["median_s"] for r in rows if _key(r) == k)
                ax.annotate(
                    f"{packed['padded_over_packed']:.2f}x",
                    (j, top),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_xticks(range(len(keys)), names, rotation=15, fontsize=8)
        ax.set_ylabel("median time (ms)")
        ax.set_title(p)
        ax.legend(fontsize=8)
    m = result["machine"]
    lengths = result["lengths"]
    finish(
        fig,
        path,
        dpi=110,
        title=f"FAVOR+ on {len(lengths)} packed sequences (cu_seqlens) vs the same padded "
        f"(key_padding_mask): {sum(lengths)} vs {len(lengths) * max(lengths)} tokens\n"
        f"{m['processor']}, {m['cpu_count']} cores, {m['threads']} threads, torch "
        f"{m['torch']}; labels: padded time / packed time",
        fontsize=10,
    )
