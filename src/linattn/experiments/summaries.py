"""What :mod:`linattn.experiments.convert` prints and plots of its results: the
summaries of a ``distill`` or ``transfer`` run, the distillation curves and the sweep's
plot."""

from __future__ import annotations

from pathlib import Path

from .._plotting import curve, finish, optional_pyplot, pyplot


def _headline(metrics: dict) -> str:
    if "ppl_ratio" in metrics:
        return (
            f"ppl {metrics['ppl']:.2f} vs exact {metrics['ppl_exact']:.2f} "
            f"(ratio {metrics['ppl_ratio']:.3f}), top-1 agreement "
            f"{metrics['top1_agreement']:.3f}"
        )
    return (
        f"mean cosine {metrics['mean_cosine']:.4f} (min {metrics['min_cosine']:.4f}), "
        f"hidden rel. error {metrics['hidden_rel_error']:.3f}"
    )


def format_summary(summary: dict) -> str:
    lines = [
        f"{summary['model']} ({summary['architecture']}) -> {summary['method']} "
        f"{summary['options']}"
    ]
    for name in summary["before"]:
        lines.append(f"  {name:12} before: {_headline(summary['before'][name])}")
        if summary["distill"]["steps"]:
            lines.append(
                f"  {name:12} after {summary['distill']['steps']} steps "
                f"({summary['distill_seconds']:.0f} s): "
                f"{_headline(summary['after'][name])}"
            )
    return "\n".join(lines)


def format_transfer_summary(summary: dict) -> str:
    """The measurements of :func:`run_transfer` as text, one line per held-out set and
    stage."""
    lines = [f"{summary['model']} ({summary['architecture']}) -> favor {summary['options']}"]
    stages = [
        ("before", "converted"),
        ("after_transfer", "after attention transfer"),
        ("after", "after distillation"),
    ]
    for name in summary["before"]:
        for key, label in stages:
            lines.append(f"  {name:16} {label:26}: {_headline(summary[key][name])}")
    return "\n".join(lines)


def plot_log(log: list[dict], path: Path, *, title: str) -> None:
    """Agreement against distillation steps (cosine for encoders, perplexity ratio and
    top-1 agreement for decoders)."""
    plt = optional_pyplot()
    if plt is None:
        return
    steps = [r["step"] for r in log]
    keys = (
        ["ppl_ratio", "top1_agreement"]
        if "ppl_ratio" in log[0]
        else ["mean_cosine", "hidden_rel_error"]
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, keys):
        curve(
            ax,
            steps,
            [r[key] for r in log],
            xlabel="distillation step",
            ylabel=key.replace("_", " "),
            marker="o",
        )
    finish(fig, path, title=title)


def plot_sweep(result: dict, path: Path) -> None:
    plt = pyplot()

    rows = [r for r in result["results"] if r["method"] == "favor"]
    key = "ppl_ratio" if "ppl_ratio" in rows[0] else "mean_cosine"
    fig, ax = plt.subplots(figsize=(6, 4))
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        pts = [(r["num_features"], r[key]) for r in rows if r["kernel"] == kernel]
        ax.plot(*zip(*pts), marker="o", label=f"FAVOR {kernel}")
    for r in result["results"]:
        if r["method"] == "linformer":
            ax.axhline(r[key], ls="--", lw=1, color="gray")
            ax.annotate(
                f"Linformer k={r['proj_dim']} (untrained E/F)",
                (rows[0]["num_features"], r[key]),
                fontsize=7,
                va="bottom",
            )
    ax.set_xscale("log", base=2)
    if key == "ppl_ratio":
        ax.set_yscale("log")
    ax.set_xlabel("random features m")
    ax.set_ylabel(key.replace("_", " ") + " (before distillation)")
    ax.set_title(f"{result['model']}: conversion without training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    finish(fig, path)
