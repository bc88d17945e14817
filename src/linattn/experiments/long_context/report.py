"""What ``linattn eval`` writes: ``results.json`` (everything), one CSV per table,
PNG plots and ``summary.md`` (the tables in markdown)."""

from __future__ import annotations

from pathlib import Path

from ..._io import atomic_open, write_json, write_text
from ..._plotting import finish, log_axes, optional_pyplot

#: CSV columns of each table of ``results.json``.
FIELDS = {
    "by_length": [
        "length",
        "model",
        "texts",
        "tokens",
        "ppl",
        "ppl_exact",
        "ppl_ratio",
        "kl",
        "top1_agreement",
    ],
    "by_position": ["length", "model", "from", "to", "tokens", "ppl_ratio", "kl", "top1_agreement"],
    "recall": [
        "task",
        "distance",
        "model",
        "accuracy",
        "logprob",
        "examples",
        "chance",
        "length",
        "beyond_window",
        "beyond_receptive_field",
    ],
    "encoder": [
        "model",
        "max_length",
        "mean_cosine",
        "min_cosine",
        "recall@1",
        "recall@5",
        "mrr",
        "documents",
    ],
    "speed": [
        "length",
        "model",
        "kind",
        "median_s",
        "q1_s",
        "q3_s",
        "n",
        "peak_bytes",
        "first_token_s",
        "ms_per_token",
        "cache_bytes",
        "cache",
        "speedup",
        "first_token_speedup",
        "cache_share",
        "past_context",
        "skipped",
    ],
}
COLORS = {
    "exact": "k",
    "hybrid": "C3",
    "no-slots": "C1",
    "no-far": "C4",
    "window-only": "C0",
    "linear-only": "C2",
}


def _csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    import csv

    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def write(out: Path, result: dict) -> list[str]:
    """Write ``result`` (:func:`~linattn.experiments.long_context.run`'s) into ``out``;
    returns the names of the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = ["results.json"]
    write_json(out / "results.json", result)
    for table, fields in FIELDS.items():
        if result.get(table):
            _csv(out / f"{table}.csv", result[table], fields)
            written.append(f"{table}.csv")
    written += plot(out, result)
    write_text(out / "summary.md", markdown(result))
    written.append("summary.md")
    return written


def _fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        # Chance levels and other tiny numbers: in scientific notation.
        if 0 < abs(value) < 10**-digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(rows: list[dict], columns: list[tuple[str, str]], digits: int = 3) -> list[str]:
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), digits) for k, _ in columns) + " |")
    return lines


def markdown(result: dict) -> str:
    """The results as a readable markdown page."""
    s = result["settings"]
    lines = [
        f"# linattn eval: {s['model']}",
        "",
        f"Converted model: {s['source']}; conversion {s['conversion']}.",
        "Compared: exact (the original model) and the converted model's ablations: "
        "hybrid (as converted), window-only (far part and slots off: exact over the "
        "window and sinks), linear-only (no window, no sinks, no slots)"
        + (
            "; with slots also no-slots (the plain window hybrid) and no-far (window, "
            "sinks and slots exact, the evicted keys dropped)"
            if result.get("conversion", {}).get("slots")
            else ""
        )
        + f". Device {s['device']}, "
        f"{s['threads']} threads; {s['seconds']:.0f} s in all.",
    ]
    for name, why in result.get("skipped_variants", {}).items():
        lines.append(f"Left out: {name} ({why}).")
    for note in result.get("notes", []):
        lines.append(f"Note: {note}.")
    if result.get("by_length"):
        lines += ["", f"## Agreement by length ({s['corpus']}, held-out texts)", ""]
        lines += _table(
            result["by_length"],
            [
                ("length", "tokens"),
                ("model", "model"),
                ("texts", "texts"),
                ("ppl", "ppl"),
                ("ppl_exact", "ppl exact"),
                ("ppl_ratio", "ppl ratio"),
                ("kl", "KL"),
                ("top1_agreement", "top-1 agreement"),
            ],
        )
        lines += ["", "## By position within the texts", ""]
        lines += _table(
            result["by_position"],
            [
                ("length", "text tokens"),
                ("model", "model"),
                ("from", "from"),
                ("to", "to"),
                ("ppl_ratio", "ppl ratio"),
                ("kl", "KL"),
                ("top1_agreement", "top-1"),
            ],
        )
    if result.get("recall"):
        c = result["conversion"]
        lines += [
            "",
            "## Long-range recall (teacher-forced; accuracy = every answer token top-1)",
            "",
            f"Distance: answer start - source start (tokens). Window {c['window']}, "
            f"sinks {c['sinks']}, slots {c.get('slots', 0)} ({c.get('slot_rule', '-')} rule), "
            f"{c['layers']} layers: a window-only model can relay "
            "information (window - 1) positions per layer; 'beyond field' marks distances "
            "where the source lies beyond that too (there it cannot score above chance).",
            "",
        ]
        lines += _table(
            result["recall"],
            [
                ("task", "task"),
                ("distance", "distance"),
                ("model", "model"),
                ("accuracy", "accuracy"),
                ("logprob", "mean log-prob"),
                ("examples", "n"),
                ("chance", "chance"),
                ("beyond_window", "beyond window"),
                ("beyond_receptive_field", "beyond field"),
            ],
        )
    if result.get("encoder"):
        lines += ["", "## Encoder: embeddings and retrieval at the full length", ""]
        lines += _table(
            result["encoder"],
            [
                ("model", "model"),
                ("max_length", "tokens"),
                ("mean_cosine", "mean cosine"),
                ("min_cosine", "min cosine"),
                ("recall@1", "recall@1"),
                ("recall@5", "recall@5"),
                ("mrr", "MRR"),
                ("documents", "documents"),
            ],
            digits=4,
        )
    if result.get("speed"):
        lines += [
            "",
            "## Speed and memory",
            "",
            "prefill: median seconds of a forward over the prompt (last-position logits), "
            "peak memory added (" + result["memory_note"] + "); generate / loop: "
            "ms per new token (median) after a prompt of that length and the cache size. "
            "Rows marked past context exceed the model's trained context: speed only.",
            "",
        ]
        rows = []
        for r in result["speed"]:
            row = dict(r)
            if r.get("peak_bytes") is not None:
                row["peak_mb"] = r["peak_bytes"] / 2**20
            if r.get("cache_bytes") is not None:
                row["cache_mb"] = r["cache_bytes"] / 2**20
            rows.append(row)
        lines += _table(
            rows,
            [
                ("length", "tokens"),
                ("model", "model"),
                ("kind", "kind"),
                ("median_s", "prefill s"),
                ("peak_mb", "peak MB"),
                ("first_token_s", "first token s"),
                ("ms_per_token", "ms/token"),
                ("cache_mb", "cache MB"),
                ("cache", "cache class"),
                ("speedup", "speed-up"),
                ("cache_share", "cache share"),
                ("past_context", "past context"),
                ("skipped", "skipped"),
            ],
            digits=2,
        )
    return "\n".join(lines) + "\n"


def plot(out: Path, result: dict) -> list[str]:
    """``quality.png`` (decoders: ratio by length and by position), ``recall.png`` and
    ``speed.png``, where there are rows for them."""
    plt = optional_pyplot()
    if plt is None:
        return []
    written = []
    if result.get("by_length"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(r["model"] for r in result["by_length"]):
            rows = [r for r in result["by_length"] if r["model"] == name]
            axes[0].plot(
                [r["length"] for r in rows],
                [r["ppl_ratio"] for r in rows],
                marker="o",
                color=COLORS.get(name),
                label=name,
            )
            longest = max(r["length"] for r in result["by_position"])
            pos = [
                r
                for r in result["by_position"]
                if r["model"] == name and r["length"] == longest and r["tokens"]
            ]
            axes[1].plot(
                [(r["from"] + r["to"]) / 2 for r in pos],
                [r["ppl_ratio"] for r in pos],
                marker="o",
                color=COLORS.get(name),
                label=name,
            )
        log_axes(axes[0], xlabel="text length (tokens)", ylabel="perplexity ratio to exact")
        log_axes(
            axes[1],
            xlabel="position in the longest texts (bucket middle)",
            ylabel="perplexity ratio to exact",
        )
        for ax in axes:
            ax.legend(fontsize=8)
        finish(fig, out / "quality.png", title=result["settings"]["model"])
        written.append("quality.png")
    if result.get("recall"):
        tasks = list(dict.fromkeys(r["task"] for r in result["recall"]))
        fig, axes = plt.subplots(
            2, len(tasks), figsize=(4.5 * len(tasks), 7), squeeze=False, sharex="col"
        )
        c = result["conversion"]
        for col, task in enumerate(tasks):
            rows = [r for r in result["recall"] if r["task"] == task]
            for row, (key, label) in enumerate(
                [("accuracy", "accuracy (exact answers)"), ("logprob", "mean log-prob / token")]
            ):
                ax = axes[row][col]
                for name in dict.fromkeys(r["model"] for r in rows):
                    pts = sorted((r["distance"], r[key]) for r in rows if r["model"] == name)
                    ax.plot(*zip(*pts), marker="o", color=COLORS.get(name), label=name)
                if key == "accuracy":
                    ax.axhline(rows[0]["chance"], ls=":", color="gray", label="chance")
                    ax.set_ylim(-0.05, 1.05)
                if c["window"]:
                    # The window, and how far back the stacked windows can relay.
                    ax.axvline(c["window"], ls="--", lw=1, color="gray")
                    ax.axvline(c["layers"] * max(c["window"] - 1, 0), ls="-.", lw=1, color="gray")
                log_axes(ax, xlabel="distance (tokens)", ylabel=label, logy=False)
                ax.set_title(task if row == 0 else "")
                ax.legend(fontsize=7)
        finish(
            fig,
            out / "recall.png",
            title="long-range recall (dashed: window; dash-dot: layers x (window - 1))",
        )
        written.append("recall.png")
    timed = [r for r in result.get("speed", []) if "skipped" not in r]
    if timed:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        panels = [
            ("prefill", "median_s", "prefill time (s)"),
            ("generate", "ms_per_token", "generate(): ms per token"),
            ("loop", "ms_per_token", "forward(use_cache=True) loop: ms per token"),
        ]
        for ax, (kind, key, label) in zip(axes, panels):
            for name in dict.fromkeys(r["model"] for r in timed):
                pts = sorted(
                    (r["length"], r[key])
                    for r in timed
                    if r["model"] == name and r["kind"] == kind and r.get(key)
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=COLORS.get(name), label=name)
            log_axes(ax, xlabel="prompt / context length (tokens)", ylabel=label)
            ax.legend(fontsize=8)
        finish(fig, out / "speed.png", title="speed against the exact model (SDPA)")
        written.append("speed.png")
    return written
