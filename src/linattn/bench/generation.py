"""Per-token generation cost against context length: FAVOR+'s recurrent state against
exact attention's growing key/value cache (``linattn bench --suite generate``)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .._plotting import pyplot
from .speed import machine_info, write_results

PRESETS = {"quick": [256, 1024, 4096], "full": [1024, 4096, 16384]}


def _cache_bytes(caches) -> int:
    total = 0
    for c in caches:
        for t in (c if isinstance(c, tuple) else (c,)):
            # A FAVOR+ state without a window has None in its window fields.
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def run(out_dir, *, preset="quick", dim=256, depth=4, heads=4, steps=32, progress=True):
    from tqdm import tqdm

    from ..models import CausalLM, ModelConfig

    contexts = PRESETS[preset]
    rows = []
    for attention in ("favor", "exact"):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=256, dim=dim, depth=depth, heads=heads, causal=True,
                          attention=attention, max_seq_len=max(contexts) + steps + 1)
        model = CausalLM(cfg).eval()
        for ctx in tqdm(contexts, desc=f"generate {attention}", disable=not progress):
            ids = torch.randint(0, 256, (1, ctx), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                logits, caches = model.step_logits(ids, None, 0)
                tok = logits[:, -1:].argmax(-1)
                times = []
                for i in range(steps):
                    t0 = time.perf_counter()
                    logits, caches = model.step_logits(tok, caches, ctx + i)
                    times.append(time.perf_counter() - t0)
                    tok = logits[:, -1:].argmax(-1)
            rows.append({"attention": attention, "context": ctx,
                         "ms_per_token": 1e3 * statistics.median(times[2:]),
                         "cache_bytes": _cache_bytes(caches)})
    result = {"machine": machine_info(), "config": {"dim": dim, "depth": depth,
              "heads": heads, "steps": steps}, "results": rows}
    out = Path(out_dir)
    write_results(out, "generate", result, ["attention", "context", "ms_per_token",
                                            "cache_bytes"])
    _plot(result, out / "generate.png")
    return result


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"generation: {c['depth']} layers, dim {c['dim']}, {c['heads']} heads, batch 1, "
             f"median over {c['steps']} new tokens",
             f"{'attention':10} {'context':>8} {'ms/token':>9} {'cache MB':>9}"]
    for r in result["results"]:
        lines.append(f"{r['attention']:10} {r['context']:>8} {r['ms_per_token']:>9.2f} "
                     f"{r['cache_bytes'] / 2**20:>9.2f}")
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for attention, label in (("favor", "FAVOR+ (recurrent state)"),
                             ("exact", "exact (key/value cache)")):
        pts = sorted((r["context"], r["ms_per_token"], r["cache_bytes"] / 2**20)
                     for r in result["results"] if r["attention"] == attention)
        xs, ts, ms = zip(*pts)
        axes[0].plot(xs, ts, marker="o", label=label)
        axes[1].plot(xs, ms, marker="o", label=label)
    for ax, ylabel in zip(axes, ("time per new token (ms)", "cache size (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_yscale("log")
    fig.suptitle("Generation cost against context length", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
