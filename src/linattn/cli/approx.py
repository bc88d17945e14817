"""``linattn approx``: the Performer paper's approximation experiment
(:mod:`linattn.bench.approx`)."""

from __future__ import annotations

import argparse

from ._common import Command, add_size_flags, check_out, own_out, preset


def configure(a: argparse.ArgumentParser) -> None:
    add_size_flags(a, "the paper's sizes")
    a.add_argument("--out", default="results/approx", help="output folder")


def run(args: argparse.Namespace) -> int:
    from ..bench import approx

    check_out(args.out)
    with own_out(args.out):
        result = approx.run(args.out, preset=preset(args))
    print(approx.format_table(result))
    print(f"\nwrote {args.out}/approx.json, approx.csv, approx_mse.png, approx_variance.png")
    return 0


COMMAND = Command(
    "approx",
    help="the Performer paper's approximation experiment (Figure 4)",
    description="Attention-output MSE against the number of random features (L=4096, "
    "d=16 with --full) for positive, trigonometric, hyperbolic and FAVOR++ features, "
    "orthogonal and iid; kernel-estimate MSE against the closed forms of Lemma 2. "
    "Writes approx.json, approx.csv, approx_mse.png and approx_variance.png.",
    configure=configure,
    run=run,
)
