"""``linattn eval``: a converted model against its original at long inputs (quality by
length and position, long-range recall, encoder retrieval, speed and memory), with the
hybrid / window-only / linear-only ablations. The work lives in
:mod:`linattn.experiments.long_context`; this module only registers the command."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import Command


def configure(parser: argparse.ArgumentParser) -> None:
    from ..experiments import long_context

    long_context.configure_parser(parser)


def run(args: argparse.Namespace) -> int:
    from ..experiments import long_context

    result = long_context.run_from_args(args)
    print((Path(args.out) / "summary.md").read_text())
    print(f"wrote {args.out}/" + ", ".join(result["files"]))
    return 0


COMMAND = Command(
    "eval",
    "a converted model against its original at long inputs, with ablations and speed",
    "Long-context evaluation of a converted checkpoint (--checkpoint DIR) or a zero-shot "
    "conversion (--model): perplexity, KL and top-1 agreement by length and position, "
    "long-range recall tasks beyond the window, encoder cosine and retrieval, prefill "
    "and decoding speed and memory against the exact model; every table with the "
    "hybrid, window-only and linear-only ablations.",
    configure,
    run,
    sizes=("--lengths", "--speed-lengths", "--distances", "--docs"),
)
