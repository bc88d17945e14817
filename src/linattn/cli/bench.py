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
    UsageError,
    add_size_flags,
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
    failed)`` runs it and returns its printed table and whether a case failed."""

    about: str
    options: tuple[str, ...]
    files: tuple[str, ...]
    run: Callable[[argparse.Namespace], tuple[str, bool]]


def _failed(result: dict) -> bool:
    return any("error" in r for r in result["results"])


def _favor(args: argparse.Namespace) -> tuple[str, bool]:
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
    return speed.format_table(result), _failed(result)


def _linformer(args: argparse.Namespace) -> tuple[str, bool]:
    from ..bench import linformer_table

    result = linformer_table.run(
        args.out,
        preset=preset(args),
        heads=args.heads,
        head_dim=args.head_dim,
        repeats=args.repeats or 5,
        lengths=args.lengths,
    )
    return linformer_table.format_table(result), _failed(result)


def _peers(args: argparse.Namespace) -> tuple[str, bool]:
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
    return peers.format_table(result), _failed(result)


def _generate(args: argparse.Namespace) -> tuple[str, bool]:
    from ..bench import generation

    result = generation.run(args.out, preset=preset(args), contexts=args.lengths)
    return generation.format_table(result), False


def _gpu(args: argparse.Namespace) -> tuple[str, bool]:
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
    return gpu.format_table(result), _failed(result)


SUITES: dict[str, Suite] = {
    "favor": Suite(
        "exact attention (scaled_dot_product_attention) against FAVOR+, bidirectional and "
        "causal (and the window hybrid with --windows)",
        ("lengths", "passes", "heads", "head_dim", "num_features", "repeats", "windows"),
        ("bench.json", "bench.csv", "bench.png"),
        _favor,
    ),
    "linformer": Suite(
        "the Linformer paper's Table 3 (Linformer against exact attention)",
        ("lengths", "heads", "head_dim", "repeats"),
        ("linformer.json", "linformer.csv", "linformer.png"),
        _linformer,
    ),
    "peers": Suite(
        "against performer-pytorch and linformer",
        ("lengths", "passes", "heads", "head_dim", "num_features", "repeats"),
        ("peers.json", "peers.csv"),
        _peers,
    ),
    "generate": Suite(
        "per-token decoding cost against context length",
        ("lengths",),
        ("generate.json", "generate.csv", "generate.png"),
        _generate,
    ),
    "gpu": Suite(
        "the Triton kernels against FlashAttention, flash-linear-attention and the eager "
        "path (CUDA; its own grid: bf16, 16 heads, head_dim 64/128, m 128/256, L 4k..128k "
        "with --full)",
        ("lengths", "passes", "repeats"),
        ("gpu.json", "gpu.csv", "gpu.png"),
        _gpu,
    ),
}
_OPTIONS = ("lengths", "passes", "heads", "head_dim", "num_features", "repeats", "windows")
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
        f"suites: {_suites_using('windows')})",
    )


def run(args: argparse.Namespace) -> int:
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
    for name, value in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_out(args.out)
    with own_out(args.out):
        table, failed = suite.run(args)
    print(table)
    print(f"\nwrote {args.out}/" + ", ".join(suite.files))
    return 1 if failed else 0


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
)
