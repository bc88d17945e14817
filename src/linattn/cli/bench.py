"""``linattn bench``: one benchmark suite of :mod:`linattn.bench` per ``--suite``.

Each suite is a :class:`Suite` in :data:`SUITES`: the options it reads (any other is
refused), what it measures (for ``--help``) and a function that runs it and returns
the printed table and whether a case failed. A new suite is one more entry."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from ._common import (
    Command,
    CommandFailed,
    UsageError,
    add_size_flags,
    allocation_failure,
    check_fits,
    check_out,
    non_negative,
    own_out,
    positive,
    preset,
)


@dataclasses.dataclass(frozen=True)
class Suite:
    """A ``--suite``: ``about`` says what it times (``--help``), ``options`` the bench
    options it reads, ``files`` what it writes to ``--out``; ``run(args) -> (table,
    rows)`` runs it and returns its printed table and its result rows (a failed case
    has an ``"error"``); ``footprint(args, length)``: bytes one case of that length
    needs at least (its inputs), checked against the machine's memory before any
    case runs."""

    about: str
    options: tuple[str, ...]
    files: tuple[str, ...]
    run: Callable[[argparse.Namespace], tuple[str, list[dict]]]
    footprint: Callable[[argparse.Namespace, int], float]
    #: the shortest length its presets run (what is checked without --lengths).
    shortest: int


def _qkv_bytes(args: argparse.Namespace, length: int) -> float:
    # float32 q, k, v of batch 1, plus FAVOR+'s query and key features where it has them.
    features = 2 * args.num_features if "num_features" in SUITES[args.suite].options else 0
    return 4.0 * args.heads * length * (3 * args.head_dim + features)


def _favor(args: argparse.Namespace) -> tuple[str, list[dict]]:
    from ..bench import speed

    result = speed.run(
        args.out,
        preset=preset(args),
        lengths=args.lengths,
        heads=args.heads,
        head_dim=args.head_dim,
        num_features=args.num_features,
        repeats=args.repeats,
        passes=tuple(args.passes or ("fwd", "fwd+bwd")),
        windows=tuple(args.windows or ()),
    )
    return speed.format_table(result), result["results"]


def _pack(args: argparse.Namespace) -> tuple[str, list[dict]]:
    from ..bench import packed

    low, high = args.pack_lengths or packed.LENGTHS
    result = packed.run(
        args.out,
        preset=preset(args),
        count=args.pack_count,
        low=low,
        high=high,
        heads=args.heads,
        head_dim=args.head_dim,
        num_features=args.num_features,
        repeats=args.repeats,
        passes=tuple(args.passes or ("fwd", "fwd+bwd")),
        windows=tuple(args.windows if args.windows is not None else (packed.WINDOW,)),
    )
    return packed.format_table(result), result["results"]


def _pack_bytes(args: argparse.Namespace, length: int) -> float:
    # The padded batch's float32 q, k, v and features: count x the longest length.
    from ..bench import packed

    count = args.pack_count or packed.PRESETS[preset(args)]["count"]
    high = args.pack_lengths[1] if args.pack_lengths else packed.LENGTHS[1]
    return count * _qkv_bytes(args, high)


def _linformer(args: argparse.Namespace) -> tuple[str, list[dict]]:
    from ..bench import linformer_table

    result = linformer_table.run(
        args.out,
        preset=preset(args),
        heads=args.heads,
        head_dim=args.head_dim,
        repeats=args.repeats or 5,
        lengths=args.lengths,
    )
    return linformer_table.format_table(result), result["results"]


def _peers(args: argparse.Namespace) -> tuple[str, list[dict]]:
    from ..bench import peers

    result = peers.run(
        args.out,
        preset=preset(args),
        heads=args.heads,
        head_dim=args.head_dim,
        num_features=args.num_features,
        repeats=args.repeats or 5,
        lengths=args.lengths,
        passes=tuple(args.passes or ("fwd", "fwd+bwd")),
    )
    return peers.format_table(result), result["results"]


def _generate(args: argparse.Namespace) -> tuple[str, list[dict]]:
    from ..bench import generation

    result = generation.run(args.out, preset=preset(args), contexts=args.lengths)
    return generation.format_table(result), result["results"]


def _gpu(args: argparse.Namespace) -> tuple[str, list[dict]]:
    from ..bench import gpu

    try:
        result = gpu.run(
            args.out,
            preset=preset(args),
            lengths=args.lengths,
            passes=tuple(args.passes),
            repeats=args.repeats,
        )
    except gpu.GpuBenchError as exc:  # no CUDA device, or a grid it cannot run
        raise UsageError(str(exc)) from exc
    return gpu.format_table(result), result["results"]


SUITES: dict[str, Suite] = {
    "favor": Suite(
        "exact attention (scaled_dot_product_attention) against FAVOR+, bidirectional and "
        "causal (and the window hybrid with --windows)",
        ("lengths", "passes", "heads", "head_dim", "num_features", "repeats", "windows"),
        ("bench.json", "bench.csv", "bench.png"),
        _favor,
        _qkv_bytes,
        1024,
    ),
    "pack": Suite(
        "FAVOR+ on N packed sequences (cu_seqlens) against the same sequences as a padded "
        "batch (key_padding_mask), bidirectional, causal and window (also --suite favor "
        "--pack)",
        (
            "passes",
            "heads",
            "head_dim",
            "num_features",
            "repeats",
            "windows",
            "pack_lengths",
            "pack_count",
        ),
        ("pack.json", "pack.csv", "pack.png"),
        _pack,
        _pack_bytes,
        4096,
    ),
    "linformer": Suite(
        "the Linformer paper's Table 3 (Linformer against exact attention)",
        ("lengths", "heads", "head_dim", "repeats"),
        ("linformer.json", "linformer.csv", "linformer.png"),
        _linformer,
        _qkv_bytes,
        512,
    ),
    "peers": Suite(
        "against performer-pytorch and linformer",
        ("lengths", "passes", "heads", "head_dim", "num_features", "repeats"),
        ("peers.json", "peers.csv"),
        _peers,
        _qkv_bytes,
        1024,
    ),
    "generate": Suite(
        "per-token decoding cost against context length",
        ("lengths",),
        ("generate.json", "generate.csv", "generate.png"),
        _generate,
        # The exact model's key/value cache: 4 layers x (k, v) x dim 256, float32.
        lambda args, length: 4.0 * 4 * 2 * 256 * length,
        256,
    ),
    "gpu": Suite(
        "the Triton kernels against FlashAttention, flash-linear-attention and the eager "
        "path (CUDA; its own grid: bf16, 16 heads, head_dim 64/128, m 128/256, L 4k..128k "
        "with --full)",
        ("lengths", "passes", "repeats"),
        ("gpu.json", "gpu.csv", "gpu.png"),
        _gpu,
        # bf16 q, k, v at the grid's smallest: 16 heads, head_dim 64.
        lambda args, length: 2.0 * 16 * length * 3 * 64,
        4096,
    ),
}
_OPTIONS = (
    "lengths",
    "passes",
    "heads",
    "head_dim",
    "num_features",
    "repeats",
    "windows",
    "pack_lengths",
    "pack_count",
)
_DEFAULTS = {"heads": 8, "head_dim": 64, "num_features": 256, "passes": ["fwd", "fwd+bwd"]}


def _suites_using(option: str) -> str:
    return ", ".join(name for name, suite in SUITES.items() if option in suite.options)


def configure(b: argparse.ArgumentParser) -> None:
    add_size_flags(b, "the published sizes (L up to 16k; gpu: up to 128k)")
    b.add_argument("--suite", choices=list(SUITES), default="favor", help="which benchmark")
    b.add_argument("--out", default="results/bench", help="output folder")
    b.add_argument(
        "--lengths",
        type=positive,
        nargs="+",
        help=f"sequence lengths (default: the preset's; suites: {_suites_using('lengths')})",
    )
    b.add_argument(
        "--passes",
        nargs="+",
        choices=["fwd", "fwd+bwd"],
        help=f"timed passes (default: fwd fwd+bwd; suites: {_suites_using('passes')})",
    )
    b.add_argument("--heads", type=positive, help=f"default: 8 (suites: {_suites_using('heads')})")
    b.add_argument(
        "--head-dim", type=positive, help=f"default: 64 (suites: {_suites_using('head_dim')})"
    )
    b.add_argument(
        "--num-features",
        type=positive,
        help=f"FAVOR+ random features m (default: 256; suites: {_suites_using('num_features')})",
    )
    b.add_argument(
        "--repeats",
        type=positive,
        help=f"timed repeats per case, median reported (default: the preset's; "
        f"suites: {_suites_using('repeats')})",
    )
    b.add_argument(
        "--windows",
        type=non_negative,
        nargs="+",
        help=f"also time the window hybrid (exact band |i - j| <= W, i - W < j <= i "
        f"causal, + FAVOR+ beyond) for each W, with its time over pure FAVOR+'s (default: none; "
        f"suites: {_suites_using('windows')}; pack: default 64)",
    )
    b.add_argument(
        "--pack",
        action="store_true",
        help="with --suite favor: run the pack suite (packed sequences against padded)",
    )
    b.add_argument(
        "--pack-lengths",
        type=positive,
        nargs=2,
        metavar=("MIN", "MAX"),
        help="the range the packed sequences' lengths are drawn from, log-uniformly with a "
        f"fixed seed (default: 64 4096; suites: {_suites_using('pack_lengths')})",
    )
    b.add_argument(
        "--pack-count",
        type=positive,
        help="how many sequences are packed (default: 16, --full 64; suites: "
        f"{_suites_using('pack_count')})",
    )


def run(args: argparse.Namespace) -> int:
    if args.pack:
        if args.suite not in ("favor", "pack"):
            raise UsageError(
                f"--pack goes with --suite favor (it runs --suite pack), not --suite {args.suite}"
            )
        args.suite = "pack"
    try:
        from ..bench import speed  # noqa: F401  (every suite needs the [bench] extra)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"linattn bench needs the [bench] extra: pip install 'linattn[bench]' ({exc})"
        ) from exc
    suite = SUITES[args.suite]
    for name in _OPTIONS:
        if getattr(args, name) is not None and name not in suite.options:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"--suite {args.suite} does not use {flag} (used by: {_suites_using(name)})"
            )
    if args.pack_lengths and args.pack_lengths[0] > args.pack_lengths[1]:
        raise UsageError(
            f"--pack-lengths MIN MAX needs MIN <= MAX, got {args.pack_lengths[0]} "
            f"{args.pack_lengths[1]}"
        )
    for name, value in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    length = max(args.lengths) if args.lengths else suite.shortest
    sizes = ", ".join(
        f"--{name.replace('_', '-')} {getattr(args, name)}"
        for name in ("heads", "head_dim", "num_features")
        if name in suite.options
    )
    check_fits(
        suite.footprint(args, length),
        (f"--lengths {length}" if args.lengths else f"the preset's length {length}")
        + (f" with {sizes}" if sizes else "")
        + ": one case's inputs",
    )
    check_out(args.out)
    with own_out(args.out):
        table, rows = suite.run(args)
    print(table)
    print(f"\nwrote {args.out}/" + ", ".join(suite.files))
    failed = [r for r in rows if "error" in r]
    if failed:
        raise CommandFailed(
            f"{len(failed)} of {len(rows)} cases failed, e.g. {_case(failed[0])}: "
            f"{_error_text(failed[0]['error'])} (see the table above)"
        )
    return 0


def _case(row: dict) -> str:
    """A failed case in a few words: its pass, length and method (what it has)."""
    parts = [str(row[k]) for k in ("pass", "method", "kernel", "attention") if row.get(k)]
    for key, flag in (("length", "L"), ("context", "context"), ("window", "window")):
        if row.get(key) is not None:
            parts.append(f"{flag}={row[key]}")
    if row.get("causal"):
        parts.append("causal")
    return " ".join(parts)


def _error_text(error) -> str:
    text = "; ".join(error) if isinstance(error, list) else str(error)
    what = allocation_failure(text)
    if what is not None:
        return f"out of memory ({what} failed)"
    return text.strip()[:200] or "failed"


COMMAND = Command(
    "bench",
    help="time and memory of linattn against exact attention and other libraries "
    "(one suite per --suite)",
    description="Time (forward, forward+backward) and peak memory, one fresh process per "
    "case, one suite per --suite: "
    + "; ".join(
        f"{name}{' (default)' if name == 'favor' else ''}: {s.about}" for name, s in SUITES.items()
    )
    + ". Each writes its JSON/CSV (and plot) to --out. An option a suite does not use is "
    "refused.",
    configure=configure,
    run=run,
    sizes=(
        "--lengths",
        "--heads",
        "--head-dim",
        "--num-features",
        "--windows",
        "--pack-lengths",
        "--pack-count",
    ),
)
