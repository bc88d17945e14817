"""Per-token generation cost against context length: FAVOR+'s recurrent state against
exact attention's growing key/value cache (``linattn bench --suite generate``).

Both models decode in the same process, one token each in turn, so that a neighbouring
load slows both alike; every cell has its median, spread and flags
(:mod:`linattn.bench.checks`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .._plotting import finish, log_axes, pyplot
from . import checks
from .results import footnotes, machine_info, plot_rows, spread_and_mark, write_results

PRESETS = {"quick": [256, 1024, 4096], "full": [1024, 4096, 16384]}


def _cache_bytes(caches) -> int:
    total = 0
    for c in caches:
        for t in c if isinstance(c, tuple) else (c,):
            # A FAVOR+ state without a window has None in its window fields.
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def run(
    out_dir, *, preset="quick", dim=256, depth=4, heads=4, steps=32, contexts=None, progress=True
):
    from tqdm import tqdm

    from ..models import CausalLM, ModelConfig

    contexts = sorted(contexts) if contexts else PRESETS[preset]
    models = {}
    for attention in ("favor", "exact"):
        torch.manual_seed(0)
        cfg = ModelConfig(
            vocab_size=256,
            dim=dim,
            depth=depth,
            heads=heads,
            causal=True,
            attention=attention,
            max_seq_len=max(contexts) + 2 * steps + 1,
        )
        models[attention] = CausalLM(cfg).eval()
    load_before = os.getloadavg()
    rows = []
    for ctx in tqdm(contexts, desc="generate", disable=not progress):
        ids = torch.randint(0, 256, (1, ctx), generator=torch.Generator().manual_seed(0))
        state, times = {}, {a: [] for a in models}
        with torch.no_grad():
            for attention, model in models.items():
                logits, caches = model.step_logits(ids, None, 0)
                state[attention] = [logits[:, -1:].argmax(-1), caches, ctx]

            for _ in range(steps):  # interleaved: one token of each model in turn
                for attention in models:
                    _step(models[attention], state[attention], times[attention])
            for _ in range(steps // 4):  # a few more where the spread is too high
                shaky = [a for a in models if checks.unstable(times[a][2:])]
                if not shaky:
                    break
                for _ in range(4):
                    for attention in shaky:
                        _step(models[attention], state[attention], times[attention])
        for attention in models:
            stats = checks.summarize([1e3 * t for t in times[attention][2:]])
            rows.append(
                {
                    "attention": attention,
                    "context": ctx,
                    "ms_per_token": stats["median_s"],
                    "q1_ms": stats["q1_s"],
                    "q3_ms": stats["q3_s"],
                    "spread": stats["spread"],
                    "n": stats["n"],
                    "cache_bytes": _cache_bytes(state[attention][1]),
                }
            )
    checks.flag_generation(rows)
    result = {
        "machine": machine_info(),
        "config": {"dim": dim, "depth": depth, "heads": heads, "steps": steps},
        "results": rows,
        "load": {"before": load_before, "after": os.getloadavg()},
    }
    out = Path(out_dir)
    write_results(
        out,
        "generate",
        result,
        [
            "attention",
            "context",
            "ms_per_token",
            "q1_ms",
            "q3_ms",
            "spread",
            "n",
            "cache_bytes",
            "flags",
        ],
    )
    _plot(result, out / "generate.png")
    return result


def _step(model, state: list, times: list[float]) -> None:
    """Decode one token; ``state = [token, caches, position]`` is updated in place."""
    tok, caches, pos = state
    t0 = time.perf_counter()
    logits, caches = model.step_logits(tok, caches, pos)
    times.append(time.perf_counter() - t0)
    state[:] = [logits[:, -1:].argmax(-1), caches, pos + 1]


def _row_label(r: dict) -> str:
    return f"context {r['context']}, {r['attention']}"


def format_table(result: dict) -> str:
    c = result["config"]
    marks, notes = footnotes(result["results"], _row_label)
    lines = [
        f"generation: {c['depth']} layers, dim {c['dim']}, {c['heads']} heads, batch 1, "
        f"median over about {c['steps']} new tokens (the two models in turn)",
        f"{'attention':10} {'context':>8} {'ms/token':>9} {'spread':>7} {'cache MB':>9}",
    ]
    for r in result["results"]:
        spread, mark = spread_and_mark(r, marks)
        lines.append(
            f"{r['attention']:10} {r['context']:>8} {r['ms_per_token']:>9.2f} "
            f"{spread:>7} {r['cache_bytes'] / 2**20:>9.2f}{mark}"
        )
    lines += notes or ["no cell flagged (spread, growth with the context)"]
    return "\n".join(lines)


def _plot(result: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for attention, label in (
        ("favor", "FAVOR+ (recurrent state)"),
        ("exact", "exact (key/value cache)"),
    ):
        rows = sorted(
            (r for r in result["results"] if r["attention"] == attention),
            key=lambda r: r["context"],
        )
        color = "C3" if attention == "favor" else "C0"
        # plot_rows reads q1_s / q3_s: per-token times are in ms.
        timed = [
            dict(r, q1_s=r.get("q1_ms", r["ms_per_token"]), q3_s=r.get("q3_ms", r["ms_per_token"]))
            for r in rows
        ]
        plot_rows(axes[0], timed, "ms_per_token", 1.0, color, "-", label, errors=True, x="context")
        axes[1].plot(
            [r["context"] for r in rows],
            [r["cache_bytes"] / 2**20 for r in rows],
            marker="o",
            color=color,
            label=label,
        )
    for ax, ylabel, logy in zip(
        axes, ("time per new token (ms)", "cache size (MB)"), (False, True)
    ):
        log_axes(ax, xlabel="context length (tokens)", ylabel=ylabel, logy=logy)
        ax.legend(fontsize=8)
    finish(fig, path, dpi=110, title="Generation cost against context length", fontsize=11)
