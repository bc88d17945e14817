"""``linattn report``: run every benchmark suite and write ``OUT/index.md`` with tables
and plots (and the training results of ``docs/results.md`` when present)."""

from __future__ import annotations

from pathlib import Path

from . import approx, generation, linformer_table, peers, speed


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _speed_section(res: dict) -> str:
    rows = []
    idx = {(r["method"], r["causal"], r["pass"], r["length"]): r for r in res["results"]
           if "median_s" in r and r.get("kernel", "softmax") == "softmax"}
    for (method, causal, p, length), r in sorted(idx.items(), key=lambda kv: kv[0][3]):
        if method != "favor":
            continue
        ex = idx.get(("exact", causal, p, length))
        rows.append([p, str(length), "causal" if causal else "bidirectional",
                     f"{1e3 * ex['median_s']:.1f}" if ex else "",
                     f"{1e3 * r['median_s']:.1f}", f"{r.get('speedup_vs_exact', 0):.1f}x",
                     f"{r['peak_added_bytes'] / 2**20:.0f}",
                     f"{ex['peak_added_bytes'] / 2**20:.0f}" if ex else ""])
    return (f"Float32 matmul in the same run: {res['matmul_gflops']:.0f} GFLOP/s.\n\n"
            + _md_table(["pass", "L", "FAVOR+", "exact ms", "FAVOR+ ms", "speed-up",
                         "FAVOR+ peak MB", "exact peak MB"], rows)
            + "\n\n![speed and memory](bench.png)\n")


def run(out_dir: str | Path = "report", *, preset: str = "quick", progress: bool = True) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    res = speed.run(out, preset=preset, progress=progress)
    m = res["machine"]
    sections.append(("Speed and memory: FAVOR+ against exact attention", _speed_section(res)))
    lin = linformer_table.run(out, preset=preset, progress=progress)
    sections.append(("Linformer: the paper's Table 3",
                     "```\n" + linformer_table.format_table(lin) + "\n```\n\n"
                     "![Linformer time saved](linformer.png)\n"))
    gen = generation.run(out, preset=preset, progress=progress)
    sections.append(("Generation: recurrent state against key/value cache",
                     "```\n" + generation.format_table(gen) + "\n```\n\n"
                     "![generation](generate.png)\n"))
    apx = approx.run(out, preset=preset, progress=progress)
    sections.append(("Approximation error (the Performer paper's Figure 4)",
                     "```\n" + approx.format_table(apx) + "\n```\n\n"
                     "![MSE against features](approx_mse.png)\n\n"
                     "![kernel-estimate MSE against Lemma 2](approx_variance.png)\n"))
    peer = peers.run(out, preset=preset, progress=progress)
    sections.append(("Against the other libraries",
                     "```\n" + peers.format_table(peer) + "\n```\n"))
    training = Path("docs/results.md")
    if training.exists():
        # Its links point into docs/; from OUT they go through the repository root.
        text = training.read_text().replace("](results/", "](../docs/results/")
        (out / "training.md").write_text(text)
        sections.append(("Training", "See [training.md](training.md).\n"))
    else:
        sections.append(("Training", "No training results yet (`docs/results.md`).\n"))
    head = (f"# linattn report ({preset})\n\nMachine: {m['processor']}, {m['cpu_count']} "
            f"cores, {m['threads']} threads, torch {m['torch']}, Python {m['python']}. "
            "Every timing is a median in a fresh process; ratios come from the same run.\n")
    body = "\n".join(f"## {title}\n\n{text}" for title, text in sections)
    (out / "index.md").write_text(head + "\n" + body)
    return out / "index.md"
