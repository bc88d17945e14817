"""``linattn report``: every benchmark, and ``OUT/index.md`` with their tables and plots
(:mod:`linattn.bench.report`)."""

from __future__ import annotations

import argparse

from ._common import (
    Command,
    add_overwrite_flag,
    add_size_flags,
    check_out,
    own_out,
    preset,
    refuse_replacing,
)

# What an earlier `linattn report` left in --out: a new one would replace it.
_RESULTS = (
    "index.md",
    "bench.json",
    "linformer.json",
    "generate.json",
    "approx.json",
    "peers.json",
)


def configure(r: argparse.ArgumentParser) -> None:
    add_size_flags(r, "the published sizes")
    r.add_argument("--out", default="report", help="output folder")
    add_overwrite_flag(r, "an earlier report")


def run(args: argparse.Namespace) -> int:
    from ..bench import report

    if not args.overwrite:
        refuse_replacing(
            args.out, _RESULTS, "a report", "--overwrite replaces it, or give another --out"
        )
    check_out(args.out)
    with own_out(args.out):
        path = report.run(args.out, preset=preset(args))
    print(path.read_text())
    print(f"\nwrote {path} and its plots")
    return 0


COMMAND = Command(
    "report",
    help="run every benchmark and write OUT/index.md with tables and plots",
    description="Run the speed (bench), Linformer, generation, approximation and peer "
    "benchmarks and write OUT/index.md with their tables and plots, and every "
    "benchmark's JSON/CSV beside it. --quick takes minutes on 2 CPU cores, --full "
    "hours.",
    configure=configure,
    run=run,
)
