"""``linattn report``: run every benchmark suite and write ``OUT/index.md`` with tables
and plots (and the training results of ``docs/results.md`` when present).

The page opens with what can be trusted: the machine load (``os.getloadavg``) before
and after, and every flagged cell (:mod:`linattn.bench.checks`) with its reason, or a
line saying that none was flagged."""

from __future__ import annotations

import os
from pathlib import Path

from .._io import write_text
from . import approx, checks, generation, linformer_table, peers, speed


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ms(r: dict | None) -> str:
    if r is None:
        return ""
    return f"{1e3 * r['median_s']:.1f} ±{100 * r.get('spread', 0):.0f}%"


def _speed_section(res: dict) -> str:
    rows = []
    idx = {
        (r["method"], r["causal"], r["pass"], r["length"]): r
        for r in res["results"]
        if "median_s" in r and r.get("kernel", "softmax") == "softmax"
    }
    marks, notes = speed.footnotes(res["results"], speed._row_label)

    def mark(*cells) -> str:
        nums = [str(marks[id(c)]) for c in cells if c is not None and id(c) in marks]
        return f" {checks.WARN}{','.join(nums)}" if nums else ""

    for (method, causal, p, length), r in sorted(idx.items(), key=lambda kv: kv[0][3]):
        if method != "favor":
            continue
        ex = idx.get(("exact", causal, p, length))
        rows.append(
            [
                p,
                str(length),
                "causal" if causal else "bidirectional",
                _ms(ex) + mark(ex),
                _ms(r) + mark(r),
                f"{r.get('speedup_vs_exact', 0):.1f}x" + mark(r, ex),
                f"{r['peak_added_bytes'] / 2**20:.0f}",
                f"{ex['peak_added_bytes'] / 2**20:.0f}" if ex else "",
            ]
        )
    text = (
        f"Float32 matmul in the same run: {res['matmul_gflops']:.0f} GFLOP/s. Times are "
        "medians ± the interquartile range over the median; the cases of one length and "
        "pass were timed in turn, one repeat of each per round.\n\n"
        + _md_table(
            [
                "pass",
                "L",
                "FAVOR+",
                "exact ms",
                "FAVOR+ ms",
                "speed-up",
                "FAVOR+ peak MB",
                "exact peak MB",
            ],
            rows,
        )
    )
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text + "\n\n![speed and memory](bench.png)\n"


def _summary(suites: list[tuple[str, list[dict], object]], load: dict) -> str:
    """The head of the page: machine load and every flagged cell."""
    lines = [
        "## Can these numbers be trusted?",
        "",
        "Machine load (1/5/15-minute averages): "
        + "; ".join(f"{name} {speed._fmt_load(v)}" for name, v in load.items())
        + ".",
        "",
    ]
    flagged = [
        (suite, label(r), "; ".join(r["flags"]))
        for suite, rows, label in suites
        for r in rows
        if r.get("flags")
    ]
    if not flagged:
        lines.append(
            "No cell was flagged: every spread is within "
            f"{100 * checks.SPREAD_LIMIT:.0f}% and every curve within its "
            "complexity (forward below forward+backward, time growing no faster "
            "than L for linear methods and L² for exact attention)."
        )
    else:
        lines.append(
            f"{len(flagged)} cell(s) flagged ({checks.WARN} in the tables, hollow "
            "points in the plots); do not trust these numbers:"
        )
        lines.append("")
        lines += [f"- {suite}, {cell}: {reason}" for suite, cell, reason in flagged]
    return "\n".join(lines) + "\n"


def run(out_dir: str | Path = "report", *, preset: str = "quick", progress: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    load = {"start": os.getloadavg()}
    res = speed.run(out, preset=preset, progress=progress)
    m = res["machine"]
    sections.append(("Speed and memory: FAVOR+ against exact attention", _speed_section(res)))
    lin = linformer_table.run(out, preset=preset, progress=progress)
    sections.append(
        (
            "Linformer: the paper's Table 3",
            "```\n" + linformer_table.format_table(lin) + "\n```\n\n"
            "![Linformer time saved](linformer.png)\n",
        )
    )
    gen = generation.run(out, preset=preset, progress=progress)
    sections.append(
        (
            "Generation: recurrent state against key/value cache",
            "```\n" + generation.format_table(gen) + "\n```\n\n![generation](generate.png)\n",
        )
    )
    apx = approx.run(out, preset=preset, progress=progress)
    sections.append(
        (
            "Approximation error (the Performer paper's Figure 4)",
            "```\n" + approx.format_table(apx) + "\n```\n\n"
            "![MSE against features](approx_mse.png)\n\n"
            "![kernel-estimate MSE against Lemma 2](approx_variance.png)\n",
        )
    )
    peer = peers.run(out, preset=preset, progress=progress)
    sections.append(("Against the other libraries", "```\n" + peers.format_table(peer) + "\n```\n"))
    load["end"] = os.getloadavg()
    training = Path("docs/results.md")
    if training.exists():
        # Its links point into docs/; from OUT they go through the repository root.
        text = training.read_text().replace("](results/", "](../docs/results/")
        (out / "training.md").write_text(text)
        sections.append(("Training", "See [training.md](training.md).\n"))
    else:
        sections.append(("Training", "No training results yet (`docs/results.md`).\n"))
    head = (
        f"# linattn report ({preset})\n\nMachine: {m['processor']}, {m['cpu_count']} "
        f"cores, {m['threads']} threads, torch {m['torch']}, Python {m['python']}. "
        "Every timing is a median in a fresh process (generation: in one process), the "
        "compared cases timed in turn; ratios come from the same run.\n"
    )
    summary = _summary(
        [
            ("speed", res["results"], speed._row_label),
            ("Linformer", lin["results"], linformer_table._row_label),
            ("generation", gen["results"], generation._row_label),
            ("peers", peer["results"], peers._row_label),
        ],
        load,
    )
    body = "\n".join(f"## {title}\n\n{text}" for title, text in sections)
    write_text(out / "index.md", head + "\n" + summary + "\n" + body)
    return out / "index.md"
