"""The command line of ``linattn eval`` (:mod:`linattn.cli.evaluate` registers it): its
flags (:func:`configure_parser`) and their checks before any model loads
(:func:`run_from_args`, which then calls :func:`~linattn.experiments.long_context.run`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import DEFAULTS, PARTS, QUICK, run

_CONVERSION_FLAGS = ("kernel", "num_features", "window", "sinks", "far_rope")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add every option of ``linattn eval`` to ``parser``."""
    from ...cli._common import add_overwrite_flag
    from ...cli._common import non_negative as _non_negative
    from ...cli._common import positive as _positive
    from ...features import KERNELS
    from .tasks import TASKS

    parser.description = (
        "Long-context evaluation of a FAVOR+-converted model against its original "
        "(SDPA): decoders by length and position on held-out long text, long-range recall "
        "tasks (passkey, key-value, copying), encoders by embedding cosine and retrieval; "
        "every table with the ablations hybrid / window-only / linear-only (and with "
        "--slots: no-slots / no-far); speed and "
        "memory (prefill, generate(), a hand-written cache loop). Offline: "
        "HF_HUB_OFFLINE=1. Writes results.json, CSVs, PNGs and summary.md to --out."
    )
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        help="the original model: 'minilm', 'smollm2' or a local model folder; without "
        "--checkpoint it is converted zero-shot (default with --checkpoint: the 'model' of "
        "the summary.json beside it, as linattn convert writes it)",
    )
    g.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a converted model folder (linattn convert's OUT/checkpoint)",
    )
    g.add_argument(
        "--kernel",
        choices=tuple(KERNELS),
        help="zero-shot conversion: FAVOR+ kernel (default: the transfer recipe's, hedgehog)",
    )
    g.add_argument(
        "--num-features",
        type=_positive,
        help="zero-shot conversion: features per head (default: the transfer recipe's, 64)",
    )
    g.add_argument(
        "--window",
        type=int,
        help="zero-shot conversion: exact window (-1: none; default: the transfer recipe's, "
        "64 for decoders, 16 for encoders)",
    )
    g.add_argument(
        "--sinks",
        type=_non_negative,
        help="zero-shot conversion: exact sink tokens (default: the transfer recipe's, 1)",
    )
    g.add_argument(
        "--slots",
        type=_non_negative,
        help="exact key-value slots per head kept by --slot-rule (decoders with a window; "
        "also on a --checkpoint: they need no training; default: the conversion's, 0)",
    )
    g.add_argument(
        "--slot-rule",
        choices=("error", "mass", "union"),
        help="which keys the slots keep: error (LoLA: those the linear state reads back "
        "worst; default), mass (the most attended) or union (those either ranks high)",
    )
    g.add_argument(
        "--slot-interval",
        type=_positive,
        help="keys decided on at a time (default: the window)",
    )
    g.add_argument(
        "--no-far-rope",
        dest="far_rope",
        action="store_false",
        default=None,
        help="zero-shot conversion: the far part scores the queries and keys with the "
        "rotary embedding undone (convert(..., far_rope=False); default: rotated, as the "
        "exact parts)",
    )
    g.add_argument(
        "--far-decay",
        type=float,
        metavar="T",
        help="weigh the far scores by exp(-(i - j) / T) (decoders; also on a --checkpoint: "
        "the decay holds no parameters; 0: none; default: the conversion's)",
    )
    g.add_argument(
        "--compile-step",
        action="store_true",
        help="decoders: decode through torch.compile'd one-token steps of the window "
        "hybrid, and with --slots take the slot decisions compiled (set_compiled_decoding; "
        "the first use compiles, seconds; default: eager)",
    )
    g.add_argument("--seed", type=int, default=0, help="conversion, texts and task examples")
    w = parser.add_argument_group("what to measure")
    w.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="quality: by length and position (encoders: embeddings and retrieval); "
        "recall: long-range tasks (decoders); speed: time and memory",
    )
    w.add_argument(
        "--variants",
        nargs="+",
        choices=("hybrid", "no-slots", "no-far", "window-only", "linear-only"),
        help="the converted model's ablations to compare with exact (default: every one "
        "that exists for it; no-slots and no-far need slots)",
    )
    w.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()),
    )
    w.add_argument(
        "--corpus",
        choices=["python-docs", "gcide"],
        default="python-docs",
        help="held-out text (joined passages)",
    )
    w.add_argument(
        "--lengths",
        type=_positive,
        nargs="+",
        help=f"decoder text lengths in tokens (default: {DEFAULTS['lengths']})",
    )
    w.add_argument(
        "--buckets",
        type=_non_negative,
        nargs="+",
        help=f"position bucket edges (default: {DEFAULTS['buckets']})",
    )
    w.add_argument(
        "--texts",
        type=_positive,
        help=f"held-out texts per length (default: {DEFAULTS['texts']})",
    )
    w.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="recall tasks")
    w.add_argument(
        "--distances",
        type=_positive,
        nargs="+",
        help=f"recall distances in tokens (default: {DEFAULTS['distances']})",
    )
    w.add_argument(
        "--examples",
        type=_positive,
        help=f"recall examples per task and distance (default: {DEFAULTS['examples']})",
    )
    w.add_argument(
        "--docs",
        type=_positive,
        help=f"encoder documents at the full length (default: {DEFAULTS['docs']})",
    )
    w.add_argument(
        "--speed-lengths",
        type=_positive,
        nargs="+",
        help=f"prompt / context lengths timed (default: {DEFAULTS['speed_lengths']})",
    )
    w.add_argument(
        "--new-tokens",
        type=_int_two,
        help=f"tokens decoded per timing (default: {DEFAULTS['new_tokens']})",
    )
    w.add_argument(
        "--repeats",
        type=_positive,
        help=f"prefill timings per length, median reported (default: {DEFAULTS['repeats']})",
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--out", default="results/eval", help="output folder")
    add_overwrite_flag(parser, "an earlier evaluation's results")


def _int_two(text: str) -> int:
    from ...cli._common import int_at_least

    return int_at_least(2)(text)


def _summary_model(checkpoint: Path) -> str | None:
    """The original model named by ``linattn convert``'s summary.json beside (or in) a
    checkpoint folder."""
    import json

    for path in (checkpoint.parent / "summary.json", checkpoint / "summary.json"):
        if path.is_file():
            try:
                return json.loads(path.read_text()).get("model")
            except (OSError, ValueError):
                return None
    return None


def run_from_args(args: argparse.Namespace) -> dict:
    """Check the flags of :func:`configure_parser` (a :class:`linattn.cli.UsageError`
    before any model loads), run :func:`run` and return its result (``linattn eval``,
    :mod:`linattn.cli.evaluate`, prints the summary)."""
    from ...cli._common import UsageError, own_out, refuse_replacing
    from ...cli._common import check_out as _check_out
    from ...cli.convert import _check_model

    if args.checkpoint is not None:
        ckpt = Path(args.checkpoint)
        if not (ckpt / "config.json").is_file():
            raise UsageError(
                f"--checkpoint {args.checkpoint}: expected a folder holding config.json "
                "(linattn convert's OUT/checkpoint)"
            )
        given = [
            "--no-far-rope" if n == "far_rope" else "--" + n.replace("_", "-")
            for n in _CONVERSION_FLAGS
            if getattr(args, n) is not None
        ]
        if given:
            raise UsageError(
                f"{', '.join(given)}: conversion flags are for a zero-shot conversion of "
                "--model; a --checkpoint keeps the conversion it was saved with"
            )
        if args.model is None:
            args.model = _summary_model(ckpt)
            if args.model is None:
                raise UsageError(
                    f"--checkpoint {args.checkpoint}: no summary.json beside it names the "
                    "original model; pass --model"
                )
    elif args.model is None:
        raise UsageError("give --model (zero-shot conversion) or --checkpoint DIR")
    decoder = _check_model(args.model)
    if args.window is not None and args.window < -1:
        raise UsageError(
            f"--window: expected -1 (none) or a number of keys >= 0, got {args.window}"
        )
    if args.slots and not decoder:
        raise UsageError("--slots: exact key-value slots are for decoders (causal LMs)")
    if args.slots and args.window == -1:
        raise UsageError("--slots: the slots hold keys that leave the window; give a --window")
    if not decoder and args.parts == ["recall"]:
        raise UsageError("--parts recall: the recall tasks need a decoder (a causal LM)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    sizes = QUICK if args.quick else DEFAULTS
    for name, value in sizes.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if decoder and "quality" in args.parts and min(args.lengths) < 2:
        raise UsageError(f"--lengths: each at least 2 tokens, got {args.lengths}")
    if args.slots is None and (args.slot_rule is not None or args.slot_interval is not None):
        raise UsageError("--slot-rule / --slot-interval: give --slots too")
    if args.far_decay is not None and (not 0 <= args.far_decay < float("inf") or not decoder):
        raise UsageError(
            f"--far-decay: a number of tokens > 0 (0: none) for a decoder, got {args.far_decay}"
        )
    if args.compile_step and not decoder:
        raise UsageError("--compile-step: for decoders (encoders do not decode)")
    if args.far_rope is False and not decoder:
        raise UsageError("--no-far-rope: for decoders with a rotary embedding")
    options = {"seed": args.seed}
    for name in _CONVERSION_FLAGS:
        value = getattr(args, name)
        if value is not None:
            options[name] = (None if value == -1 else value) if name == "window" else value
    _check_out(args.out)
    if not args.overwrite:
        refuse_replacing(
            args.out,
            ("results.json", "summary.md"),
            "an earlier evaluation",
            "--overwrite replaces it, or give another --out",
        )
    with own_out(args.out):
        return _run_checked(args, options)


def _run_checked(args: argparse.Namespace, options: dict) -> dict:
    """:func:`run` with the checked flags of :func:`run_from_args` (``options``: the
    zero-shot conversion's)."""
    return run(
        args.model,
        checkpoint=args.checkpoint,
        options={} if args.checkpoint else options,
        variants=None if args.variants is None else tuple(dict.fromkeys(args.variants)),
        far_decay=args.far_decay,
        compile_step=args.compile_step,
        slots=None
        if args.slots is None
        else {
            "slots": args.slots,
            "rule": args.slot_rule or "error",
            "interval": args.slot_interval,
        },
        parts=tuple(dict.fromkeys(args.parts)),
        lengths=tuple(sorted(set(args.lengths))),
        buckets=tuple(sorted(set(args.buckets))),
        corpus=args.corpus,
        texts=args.texts,
        tasks=tuple(dict.fromkeys(args.tasks)),
        distances=tuple(sorted(set(args.distances))),
        examples=args.examples,
        docs=args.docs,
        speed_lengths=tuple(sorted(set(args.speed_lengths))),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        device=args.device,
        seed=args.seed,
        out=args.out,
    )
