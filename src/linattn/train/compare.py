"""Same task, same budget, every attention kind: quality, time per step, peak memory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from .._checks import check_choice
from .._io import write_json, write_text
from .._plotting import finish, optional_pyplot
from ..features import KERNELS
from ..models.config import ATTENTIONS
from .config import TrainConfig
from .loop import read_metrics

_SPEC = re.compile(
    r"(?P<attention>[a-z]+)(?:-(?P<kernel>[a-z_]+))?(?:-m(?P<m>\d+))?"
    r"(?:-w(?P<w>\d+))?(?:-s(?P<s>\d+))?"
)


def parse_spec(spec: str) -> dict:
    """An attention spec as :class:`TrainConfig` fields.

    A spec is ``<attention>[-<kernel>][-m<features>][-w<window>][-s<sinks>]``: ``"exact"``,
    ``"linformer"``, ``"favor"`` (softmax kernel, no window), ``"favor-relu"``,
    ``"favor-w16"`` (softmax kernel, window 16), ``"favor-m128"`` (128 random features),
    ``"favor-hedgehog-w64"``, ``"favor-hedgehog-w16-s1"`` (and one attention sink). It
    always sets ``attention``, ``kernel``, ``window`` and ``sinks`` (``"softmax"``, None
    and 0 when not written), and ``num_features`` when ``-m`` is
    written. Kernel names are those of :data:`linattn.KERNELS` (``_``, never ``-``)."""
    if not isinstance(spec, str):
        raise ValueError(f"attention spec must be a string, got {spec!r}")
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(
            f"attention spec {spec!r} must read <attention>[-<kernel>]"
            "[-m<features>][-w<window>][-s<sinks>], e.g. 'exact', "
            "'favor-relu', "
            "'favor-hedgehog-w64'"
        )
    attention, kernel, m, w, sinks = match.group("attention", "kernel", "m", "w", "s")
    check_choice("attention", attention, ATTENTIONS)
    if attention != "favor" and (kernel or m or w or sinks):
        raise ValueError(
            f"attention spec {spec!r}: a kernel, features, a window and sinks apply to 'favor' only"
        )
    fields: dict = {
        "attention": attention,
        "kernel": check_choice("kernel", kernel or "softmax", tuple(KERNELS)),
        "window": None if w is None else int(w),
        "sinks": 0 if sinks is None else int(sinks),
    }
    if m is not None:
        fields["num_features"] = int(m)
    return fields


def spec_name(cfg: TrainConfig) -> str:
    """The spec of ``cfg``'s attention (the inverse of :func:`parse_spec`)."""
    name = cfg.attention
    if cfg.attention == "favor" and cfg.kernel != "softmax":
        name += f"-{cfg.kernel}"
    if cfg.attention == "favor" and cfg.num_features is not None:
        name += f"-m{cfg.num_features}"
    if cfg.window is not None:
        name += f"-w{cfg.window}"
    if cfg.sinks:
        name += f"-s{cfg.sinks}"
    return name


def default_attentions(task: str) -> tuple[str, ...]:
    """Exact, FAVOR+ softmax, FAVOR+ ReLU, and Linformer where the task is not causal."""
    base = ("exact", "favor", "favor-relu")
    return base if task == "bytes" else (*base, "linformer")


def compare(
    base: TrainConfig,
    out: str | Path,
    *,
    attentions: tuple[str, ...] | None = None,
    progress: bool = True,
) -> dict:
    """Train ``base`` once per attention spec (:func:`parse_spec`; default
    :func:`default_attentions`) into ``out/<spec>/``; write ``out/comparison.json``,
    ``out/comparison.md`` and ``out/comparison.png``. The spec sets ``attention``,
    ``kernel``, ``window``, ``sinks`` (and ``num_features`` if written); every other field comes
    from ``base``.

    Each run is a fresh process (``python -m linattn train``), so that its peak memory
    is its own. Calling it again with the same ``out`` and settings skips the finished
    runs and resumes an interrupted one from its checkpoint; a run whose settings
    changed starts over."""
    out = Path(out)
    specs = tuple(attentions or default_attentions(base.task))
    # Every spec is checked before the first run starts.
    configs = [replace(base, **parse_spec(spec)) for spec in specs]
    for spec, cfg in zip(specs, configs):
        run_dir = out / spec
        run_dir.mkdir(parents=True, exist_ok=True)
        request = run_dir / "request.json"
        text = json.dumps(cfg.to_dict(), indent=2)
        same = request.exists() and request.read_text() == text
        summary = run_dir / "summary.json"
        if same and summary.exists() and json.loads(summary.read_text()).get("finished"):
            continue
        write_text(request, text)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "linattn",
                "train",
                "--config",
                str(request),
                "--out",
                str(run_dir),
                # Changed settings start over: the earlier run in run_dir is replaced.
                *(["--resume"] if same else ["--overwrite"]),
            ],
            check=True,
            stderr=None if progress else subprocess.DEVNULL,
        )
    return summarize(base, out, specs)


def summarize(base: TrainConfig, out: str | Path, attentions: tuple[str, ...]) -> dict:
    """Collect ``out/<spec>/summary.json`` of finished runs (also runs made by
    separate ``--compare`` calls) into ``out/comparison.{json,md,png}``."""
    out = Path(out)
    rows = []
    for attention in attentions:
        s = json.loads((out / attention / "summary.json").read_text())
        rows.append(
            {
                "attention": attention,
                "metric": s["metric"],
                "val": s["val"][s["metric"]],
                "test": s["test"][s["metric"]],
                "median_step_s": s["median_step_s"],
                "peak_memory_mb": s["peak_memory_mb"],
                "parameters": s["parameters"],
                "device": s["device"],
            }
        )
    result = {"config": base.to_dict(), "results": rows}
    write_json(out / "comparison.json", result)
    write_text(out / "comparison.md", format_markdown(result))
    plot_comparison(out, rows, base)
    return result


def spec_label(spec: str) -> str:
    """A readable name for an attention spec ("FAVOR+ (relu kernel, window 16)")."""
    f = parse_spec(spec)
    if f["attention"] == "exact":
        return "exact attention"
    if f["attention"] == "linformer":
        return "Linformer"
    m = "" if "num_features" not in f else f", m = {f['num_features']}"
    window = "" if f["window"] is None else f", window {f['window']}"
    sinks = "" if not f["sinks"] else f", {f['sinks']} sink{'s' if f['sinks'] > 1 else ''}"
    return f"FAVOR+ ({f['kernel']} kernel{m}{window}{sinks})"


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
        lines.append(
            f"| {spec_label(r['attention'])} | {r['val']:.4f} | "
            f"{r['test']:.4f} | {r['median_step_s']:.3f} | {r['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(out: Path, rows: list[dict], base: TrainConfig) -> None:
    plt = optional_pyplot()
    if plt is None:
        return
    metric = rows[0]["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        m = read_metrics(out / r["attention"] / "metrics.jsonl")
        tr = [x for x in m if x["split"] == "train"]
        va = [x for x in m if x["split"] == "val"]
        label = spec_label(r["attention"])
        axes[0].plot([x["step"] for x in tr], [x["loss"] for x in tr], label=label, lw=1)
        axes[1].plot([x["step"] for x in va], [x[metric] for x in va], marker="o", label=label)
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel(f"validation {metric.replace('_', ' ')}")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    finish(fig, out / "comparison.png", title=f"{base.task}: same budget, every attention")
