"""linattn against the other libraries, same shapes, same run (``--suite peers``).

Peers come from the ``bench-peers`` extra: ``performer-pytorch`` (FastAttention,
bidirectional and causal) and ``linformer`` (LinformerSelfAttention, compared with
``linattn.LinformerAttention`` as whole layers). A missing peer is skipped with a note.
``flash-linear-attention`` (Triton kernels) is only reported as available or not: there
is no case for it (it needs a GPU). linattn and its peer are timed interleaved, with
median, spread and flags (:mod:`linattn.bench.checks`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from . import checks
from .results import TIMING_FIELDS, footnotes, machine_info, spread_and_mark, write_results
from .speed import run_cases

PRESETS = {"quick": [1024, 2048], "full": [1024, 2048, 4096]}


def available() -> dict[str, str | None]:
    """Peer name -> None if usable, else why it is skipped."""
    notes = {}
    for name, module, how in (
        ("performer-pytorch", "performer_pytorch", "pip install '.[bench-peers]'"),
        ("linformer", "linformer", "pip install '.[bench-peers]'"),
        (
            "flash-linear-attention",
            "fla",
            "needs Triton and a GPU: pip install flash-linear-attention on one",
        ),
    ):
        notes[name] = None if importlib.util.find_spec(module) else f"not installed ({how})"
    if notes["flash-linear-attention"] is None:
        import torch

        if not torch.cuda.is_available():
            notes["flash-linear-attention"] = "Triton kernels need a GPU; skipped on CPU"
    return notes


def run(
    out_dir,
    *,
    preset="quick",
    heads=8,
    head_dim=64,
    num_features=256,
    proj_dim=256,
    repeats=5,
    lengths=None,
    passes=("fwd", "fwd+bwd"),
    progress=True,
) -> dict:
    notes = available()
    base = {
        "batch": 1,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": "float32",
        "num_features": num_features,
        "proj_dim": proj_dim,
        "repeats": repeats,
    }
    groups = []
    for length in lengths or PRESETS[preset]:
        for p in passes:
            cases = []
            groups.append(cases)
            for causal in (False, True):
                cases.append(
                    {
                        **base,
                        "method": "favor",
                        "causal": causal,
                        "pass": p,
                        "length": length,
                        "error_vs_exact": True,
                    }
                )
                if notes["performer-pytorch"] is None:
                    cases.append(
                        {
                            **base,
                            "method": "performer_pytorch",
                            "causal": causal,
                            "pass": p,
                            "length": length,
                            "error_vs_exact": True,
                        }
                    )
            cases.append(
                {**base, "method": "linformer_module", "causal": False, "pass": p, "length": length}
            )
            if notes["linformer"] is None:
                cases.append(
                    {
                        **base,
                        "method": "linformer_pkg",
                        "causal": False,
                        "pass": p,
                        "length": length,
                    }
                )
    load_before = os.getloadavg()
    rows = run_cases(groups, repeats=repeats, progress=progress, desc="peers")
    index = {(r["method"], r["causal"], r["pass"], r["length"]): r for r in rows if "median_s" in r}
    for r in rows:
        peer = {"favor": "performer_pytorch", "linformer_module": "linformer_pkg"}.get(r["method"])
        other = index.get((peer, r["causal"], r["pass"], r["length"]))
        if "median_s" in r and other is not None:
            r["speedup_vs_peer"] = other["median_s"] / r["median_s"]
            r["memory_ratio_vs_peer"] = other["peak_added_bytes"] / max(r["peak_added_bytes"], 1)
    checks.flag_speed(rows)
    result = {
        "machine": machine_info(),
        "skipped": {k: v for k, v in notes.items() if v},
        "results": rows,
        "load": {"before": load_before, "after": os.getloadavg()},
    }
    write_results(
        Path(out_dir),
        "peers",
        result,
        [
            "method",
            "causal",
            "pass",
            "length",
            *TIMING_FIELDS,
            "rel_error_vs_exact",
            "speedup_vs_peer",
            "memory_ratio_vs_peer",
            "flags",
            "error",
        ],
    )
    return result


_NAMES = {
    "favor": "linattn FAVOR+",
    "performer_pytorch": "performer-pytorch",
    "linformer_module": "linattn Linformer",
    "linformer_pkg": "linformer (pkg)",
}


def _row_label(r: dict) -> str:
    return f"{r['pass']}, L={r['length']}, {_NAMES[r['method']]}" + (
        " causal" if r["causal"] else ""
    )


def format_table(result: dict) -> str:
    marks, notes = footnotes(result["results"], _row_label)
    lines = [
        f"{'pass':8} {'L':>5} {'method':24} {'median ms':>10} {'spread':>7} "
        f"{'peak MB':>9} {'rel. err':>9} {'faster':>7} {'less mem':>9}"
    ]
    for r in result["results"]:
        name = _NAMES[r["method"]] + (" causal" if r["causal"] else "")
        if "median_s" not in r:
            lines.append(f"{r['pass']:8} {r['length']:>5} {name:24} failed: {r.get('error')}")
            continue
        err = f"{r['rel_error_vs_exact']:.3f}" if "rel_error_vs_exact" in r else ""
        sp = f"{r['speedup_vs_peer']:.1f}x" if "speedup_vs_peer" in r else ""
        mem = f"{r['memory_ratio_vs_peer']:.1f}x" if "memory_ratio_vs_peer" in r else ""
        spread, mark = spread_and_mark(r, marks)
        lines.append(
            f"{r['pass']:8} {r['length']:>5} {name:24} {1e3 * r['median_s']:>10.1f} "
            f"{spread:>7} {r['peak_added_bytes'] / 2**20:>9.1f} {err:>9} {sp:>7} "
            f"{mem:>9}{mark}"
        )
    lines.append(
        "rel. err: mean((out - exact)^2) / mean(exact^2) on q, k ~ N(0, 0.35^2) "
        "(|q~|^2 ~ 1); faster / less mem: the peer's time / memory over linattn's"
    )
    for name, why in result["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    lines += notes or ["no cell flagged (spread, fwd <= fwd+bwd, growth within complexity)"]
    return "\n".join(lines)
