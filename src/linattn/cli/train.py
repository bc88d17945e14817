"""``linattn train``: train a model on a task (:mod:`linattn.train`), alone or under
torchrun; ``--compare`` trains once per attention kind."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from ._common import (
    Command,
    UsageError,
    add_overwrite_flag,
    check_fits,
    check_out,
    non_negative,
    own_out,
    positive,
    read_json,
    refuse_replacing,
)

_TRAIN_HELP = {
    "task": "bytes: next-byte prediction on GCIDE; listops: LRA ListOps; fortunes: topic "
    "of a quotation",
    "attention": "exact: scaled_dot_product_attention; favor: FAVOR+ with --kernel; linformer",
    "num_features": "FAVOR+ random features (default: d log d)",
    "kernel": "FAVOR+ feature map (hedgehog: learned, per head)",
    "window": "FAVOR+ sliding-window hybrid: the W nearest keys scored exactly (default: "
    "none, pure linear attention)",
    "sinks": "FAVOR+ attention sinks: the first S unpadded keys scored exactly by every "
    "query, with or without --window (default: 0, none)",
    "proj_dim": "Linformer k",
    "linformer_sharing": "Linformer sharing of E/F: none, headwise (one per layer), kv (E = "
    "F) or layerwise (one for the model)",
    "redraw_interval": "FAVOR+: redraw the projection every N steps (default: never)",
    "seq_len": "window for bytes, maximum tokens for the classification tasks",
    "batch_size": "global batch, split over torchrun's processes",
    "listops_train": "generated ListOps training examples (LRA: 96000)",
    "listops_eval": "generated validation and test examples each",
    "pack": "classification tasks: pack whole examples back to back into one row of "
    "batch-size x seq-len tokens (cu_seqlens) instead of padding each; evaluation stays "
    "padded on the same examples (--pack alone means true; default: false)",
    "warmup": "linear warm-up steps, then cosine decay",
    "min_lr_ratio": "the cosine decay ends at this fraction of --lr",
    "eval_every": "evaluate every N steps",
    "eval_batches": "batches per evaluation",
    "checkpoint_every": "write checkpoint.pt every N steps",
}


# Integer TrainConfig fields that may be 0 or negative (every other one must be >= 1).
_INT_FLAGS = {
    "seed": int,
    "warmup": non_negative,
    "listops_min_len": non_negative,
    "window": non_negative,
    "sinks": non_negative,
}


def _train_choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of TrainConfig's string fields, taken from the library."""
    from ..features import KERNELS
    from ..models.config import ATTENTIONS
    from ..nn.linformer import PROJ_KINDS, SHARING
    from ..train.tasks import TASKS

    return {
        "task": TASKS,
        "attention": ATTENTIONS,
        "kernel": tuple(KERNELS),
        "proj_kind": PROJ_KINDS,
        "linformer_sharing": SHARING,
    }


def _add_train_flags(t: argparse.ArgumentParser) -> None:
    from ..train import TrainConfig

    choices = _train_choices()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        text = _TRAIN_HELP.get(f.name, "")
        if "default" not in text:
            text = f"{text} (default: {default})".strip()
        kind = hints[f.name]
        if type(None) in typing.get_args(kind):  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if f.name == "betas":
            t.add_argument(flag, type=float, nargs=2, default=None, metavar=("B1", "B2"), help=text)
        elif kind is bool:
            # ``--pack`` alone means true; ``--pack false`` overrides a --config's true.
            t.add_argument(
                flag,
                type=lambda x: x.lower() in ("1", "true", "yes"),
                nargs="?",
                const=True,
                default=None,
                metavar="{true,false}",
                help=text,
            )
        elif f.name in choices:
            t.add_argument(flag, choices=choices[f.name], default=None, help=text)
        elif kind is int:
            t.add_argument(
                flag,
                type=_INT_FLAGS.get(f.name, positive),
                default=None,
                metavar=f.name.upper(),
                help=text,
            )
        else:
            t.add_argument(flag, type=kind, default=None, help=text)


# What an earlier run left in --out: a fresh run would replace it (config.json alone is
# no result: a --config may live there).
_RESULTS = ("summary.json", "checkpoint.pt", "metrics.jsonl", "model")


def configure(t: argparse.ArgumentParser) -> None:
    t.add_argument(
        "--config",
        help="JSON file with TrainConfig fields (default: none; with --resume, OUT/config.json)",
    )
    t.add_argument("--out", default="results/train", help="output folder")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt with the run's settings (only "
        "--eval-every, --eval-batches, --log-every, --checkpoint-every may change); "
        "a finished run is left as is",
    )
    t.add_argument(
        "--compare",
        action="store_true",
        help="train once per attention kind (same budget) into OUT/<spec>/ "
        "and write comparison.json/md/png",
    )
    t.add_argument(
        "--attentions",
        nargs="+",
        metavar="SPEC",
        help="with --compare: attention specs <attention>[-<kernel>][-m<features>]"
        "[-w<window>][-s<sinks>], "
        "e.g. exact favor favor-relu favor-hedgehog-w64 linformer (default: exact "
        "favor favor-relu, plus linformer for classification)",
    )
    add_overwrite_flag(t, "a training run")
    _add_train_flags(t)


def _check_sizes(cfg) -> None:
    """Refuse sizes whose single largest tensor cannot fit in memory, before any work
    (float32: a feed-forward weight, one batch's activations, FAVOR+'s features of one
    batch, Linformer's projection); sizes that pass may still run out, and then the
    command says so in one line."""
    d, b, length = cfg.dim, cfg.batch_size, cfg.seq_len
    check_fits(
        4.0 * d * cfg.ff_mult * d,
        f"--dim {d} (--ff-mult {cfg.ff_mult}): a {d} x {cfg.ff_mult * d} feed-forward weight",
    )
    check_fits(
        4.0 * b * length * d,
        f"--batch-size {b} x --seq-len {length} x --dim {d}: one batch's activations",
    )
    if cfg.attention == "favor" and cfg.num_features is not None:
        m = cfg.num_features
        check_fits(
            4.0 * b * length * m,
            f"--num-features {m} (--batch-size {b}, --seq-len {length}): one batch's "
            "FAVOR+ features",
        )
    if cfg.attention == "linformer":
        check_fits(
            4.0 * cfg.proj_dim * length,
            f"--proj-dim {cfg.proj_dim} x --seq-len {length}: a Linformer projection",
        )


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig

    if args.compare and any(
        getattr(args, n) is not None for n in ("attention", "kernel", "window", "sinks")
    ):
        raise UsageError(
            "with --compare, name the attention kinds with --attentions "
            "(specs such as exact favor favor-relu favor-hedgehog-w64-s1), not "
            "--attention/--kernel/--window/--sinks"
        )
    if not args.config and args.resume and (Path(args.out) / "config.json").is_file():
        args.config = str(Path(args.out) / "config.json")  # resume with the run's settings
    base = read_json(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = tuple(value) if f.name == "betas" else value
    try:
        cfg = TrainConfig.from_dict(base)
    except (ValueError, TypeError) as exc:
        where = f" (in --config {args.config} or the flags)" if args.config else ""
        raise UsageError(f"{exc}{where}") from exc
    _check_sizes(cfg)
    if args.overwrite and (args.resume or args.compare):
        raise UsageError(
            f"--overwrite replaces a single run; not with {'--resume' if args.resume else '--compare'}"
        )
    if not (args.resume or args.overwrite or args.compare):
        refuse_replacing(
            args.out,
            _RESULTS,
            "a training run",
            "--resume continues it, --overwrite replaces it, or give another --out",
        )
    check_out(args.out)
    with own_out(args.out):
        return _work(args, cfg)


def _work(args: argparse.Namespace, cfg) -> int:
    from ..train import train
    from ..train.compare import compare, format_markdown, spec_name

    if args.compare:
        result = compare(
            cfg, args.out, attentions=tuple(args.attentions) if args.attentions else None
        )
        print(format_markdown(result))
        print(f"wrote {args.out}/comparison.json, comparison.md, comparison.png")
        return 0
    summary = train(cfg, args.out, resume=args.resume)
    if summary.get("already_finished"):
        print(
            f"{args.out}: this run already finished ({cfg.steps} steps); nothing to do, "
            "files left as they are"
        )
        return 0
    if summary["finished"]:
        m = summary["metric"]
        print(
            f"{cfg.task}/{spec_name(cfg)}: val {m} {summary['val'][m]:.4f}, test {m} "
            f"{summary['test'][m]:.4f}, median {summary['median_step_s']:.3f} s/step, "
            f"peak {summary['peak_memory_mb']:.0f} MB"
        )
        print(f"wrote {args.out}/metrics.jsonl, summary.json, curves.png, checkpoint.pt, model/")
    return 0


COMMAND = Command(
    "train",
    help="train a model on a task (also under torchrun)",
    description="Train on byte-level language modelling (GCIDE), LRA ListOps or "
    "fortunes topic classification. Settings come from the defaults below, then "
    "--config (JSON of TrainConfig fields), then the flags (flags win). Runs as is, "
    "or under torchrun --nproc_per_node=N (DistributedDataParallel; --batch-size is "
    "the global batch). Writes metrics.jsonl, curves.png, summary.json, "
    "checkpoint.pt and model/ to --out; --resume continues from the checkpoint "
    "exactly.",
    configure=configure,
    run=run,
    sizes=(
        "--dim",
        "--depth",
        "--ff-mult",
        "--num-features",
        "--proj-dim",
        "--seq-len",
        "--batch-size",
        "--listops-train",
        "--listops-eval",
    ),
)
