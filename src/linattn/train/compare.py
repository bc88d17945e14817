"""Same task, same budget, every attention kind: quality, time per step, peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from .._io import save_figure, write_json, write_text
from .._plotting import pyplot
from .config import TrainConfig
from .loop import read_metrics


def default_attentions(task: str) -> tuple[str, ...]:
    """Exact, FAVOR+ softmax, FAVOR+ ReLU, and Linformer where the task is not causal."""
    base = ("softmax", "favor", "relu")
    return base if task == "bytes" else (*base, "linformer")


def compare(
    base: TrainConfig, out: str | Path, *, attentions: tuple[str, ...] | None = None,
    progress: bool = True,
) -> dict:
    """Train ``base`` once per attention kind into ``out/<attention>/``; write
    ``out/comparison.json``, ``out/comparison.md`` and ``out/comparison.png``.

    Each run is a fresh process (``python -m linattn train``), so that its peak memory
    is its own."""
    out = Path(out)
    for attention in attentions or default_attentions(base.task):
        cfg = replace(base, attention=attention)
        run_dir = out / attention
        run_dir.mkdir(parents=True, exist_ok=True)
        request = run_dir / "request.json"
        write_json(request, cfg.to_dict())
        subprocess.run([sys.executable, "-m", "linattn", "train", "--config", str(request),
                        "--out", str(run_dir)], check=True,
                       stderr=None if progress else subprocess.DEVNULL)
    return summarize(base, out, attentions or default_attentions(base.task))


def summarize(base: TrainConfig, out: str | Path, attentions: tuple[str, ...]) -> dict:
    """Collect ``out/<attention>/summary.json`` of finished runs (also runs made by
    separate ``--compare`` calls) into ``out/comparison.{json,md,png}``."""
    out = Path(out)
    rows = []
    for attention in attentions:
        s = json.loads((out / attention / "summary.json").read_text())
        rows.append({"attention": attention, "metric": s["metric"],
                     "val": s["val"][s["metric"]], "test": s["test"][s["metric"]],
                     "median_step_s": s["median_step_s"], "peak_memory_mb": s["peak_memory_mb"],
                     "parameters": s["parameters"], "device": s["device"]})
    result = {"config": base.to_dict(), "results": rows}
    write_json(out / "comparison.json", result)
    write_text(out / "comparison.md", format_markdown(result))
    plot_comparison(out, rows, base)
    return result


LABELS = {"softmax": "exact softmax", "favor": "FAVOR+ (softmax kernel)",
          "relu": "FAVOR+ ReLU", "linformer": "Linformer"}


def format_markdown(result: dict) -> str:
    cfg = result["config"]
    metric = result["results"][0]["metric"].replace("_", " ")
    lines = [
        f"Task `{cfg['task']}`: dim {cfg['dim']}, depth {cfg['depth']}, heads {cfg['heads']}, "
        f"seq_len {cfg['seq_len']}, batch {cfg['batch_size']}, {cfg['steps']} steps, lr "
        f"{cfg['lr']}, seed {cfg['seed']}; device {result['results'][0]['device']}.",
        "",
        f"| attention | val {metric} | test {metric} | median s/step | peak memory MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(f"| {LABELS.get(r['attention'], r['attention'])} | {r['val']:.4f} | "
                     f"{r['test']:.4f} | {r['median_step_s']:.3f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_comparison(out: Path, rows: list[dict], base: TrainConfig) -> None:
    try:
        plt = pyplot()
    except ImportError:  # pragma: no cover - matplotlib ships with [bench]/[dev]/[hf]
        return
    metric = rows[0]["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        m = read_metrics(out / r["attention"] / "metrics.jsonl")
        tr = [x for x in m if x["split"] == "train"]
        va = [x for x in m if x["split"] == "val"]
        label = LABELS.get(r["attention"], r["attention"])
        axes[0].plot([x["step"] for x in tr], [x["loss"] for x in tr], label=label, lw=1)
        axes[1].plot([x["step"] for x in va], [x[metric] for x in va], marker="o", label=label)
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel(f"validation {metric.replace('_', ' ')}")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{base.task}: same budget, every attention")
    fig.tight_layout()
    save_figure(fig, out / "comparison.png", dpi=120)
    plt.close(fig)
