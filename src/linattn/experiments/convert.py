"""``linattn convert``: convert a pretrained model, measure its agreement with the
original on real text, train it back (recipe ``distill``: end-to-end distillation;
recipe ``transfer``: attention transfer, then distillation), and write the numbers and
curves.

Outputs in ``out``: ``summary.json`` (settings, agreement before and after, timings,
machine), ``log.jsonl`` (agreement during distillation), ``distill.png`` (curves),
``checkpoint/`` (the trained model, loadable with
:func:`~linattn.integrations.hf.load_converted`);
recipe ``transfer`` adds ``transfer/`` (its ``log.jsonl``, ``transfer.png``,
``checkpoint/`` and resume state); with ``--sweep``: ``sweep.json``, ``sweep.csv``,
``sweep.png`` (agreement before distillation for each kernel and number of features).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .._io import read_json, write_json
from ..bench.results import machine_info, write_results
from ..data import gcide_passages, python_doc_passages, text_split
from ..integrations.hf.convert import convert, load_converted, save_converted
from ..integrations.hf.distill import DistillConfig, agreement, distill, is_causal_lm
from ..integrations.hf.transfer import TransferConfig, transfer
from .pretrained import load_pretrained

# The recipes live in .recipes; their names stay importable from here.
from .recipes import DECODER_RECIPES, RECIPES, Recipe, recipe_for  # noqa: F401

# The CLI prints these as experiment.format_summary (tests replace them there).
from .summaries import format_summary, format_transfer_summary, plot_log, plot_sweep  # noqa: F401

CORPORA = {"gcide": gcide_passages, "python-docs": python_doc_passages}


def corpus_texts(corpus: str, *, train: int, test: int, seed: int = 0):
    """Disjoint train / held-out passages of ``corpus`` ("gcide" or "python-docs")."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {sorted(CORPORA)}, got {corpus!r}")
    return text_split(CORPORA[corpus](), train=train, test=test, seed=seed)


def run(
    model_name: str,
    *,
    method: str = "favor",
    options: dict | None = None,
    corpus: str = "gcide",
    eval_corpora: tuple[str, ...] = ("gcide", "python-docs"),
    train_texts: int = 20000,
    eval_texts: int = 128,
    config: DistillConfig | None = None,
    out: str | Path = "results/convert",
    progress: bool = True,
) -> dict:
    """Convert ``model_name``, measure, distill on ``corpus`` (``config.steps`` steps; 0
    skips distillation) and measure again on held-out text of every ``eval_corpora``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config or dataclasses.replace(RECIPES["distill"].distill)
    options = dict(options or {})
    teacher, tok = load_pretrained(model_name)
    student = convert(copy.deepcopy(teacher), method, **options)
    train, held_out = corpus_texts(corpus, train=train_texts, test=eval_texts, seed=cfg.seed)
    evals = {corpus: held_out}
    for name in eval_corpora:
        if name != corpus:
            evals[name] = corpus_texts(name, train=0, test=eval_texts, seed=cfg.seed + 1)[1]

    def measure() -> dict:
        return {
            name: agreement(
                teacher,
                student,
                tok,
                texts,
                max_length=cfg.max_length,
                batch_size=cfg.eval_batch_size,
                progress=progress,
                desc=f"measure {name}",
            )
            for name, texts in evals.items()
        }

    started = time.perf_counter()
    before = measure()
    log: list[dict] = []
    t0 = time.perf_counter()
    if cfg.steps:
        # The checkpoint (with its tokenizer) loads with load_converted.
        log = distill(student, teacher, tok, train, held_out, cfg, out_dir=out, progress=progress)
    else:
        # No distillation: the converted model is saved as it is.
        save_converted(student, out / "checkpoint", tokenizer=tok)
    distill_s = time.perf_counter() - t0
    after = measure() if cfg.steps else before
    summary = {
        "model": model_name,
        "architecture": type(teacher).__name__,
        "kind": "decoder" if is_causal_lm(teacher) else "encoder",
        "method": method,
        "options": student.config.linattn_conversion["options"],
        "corpus": corpus,
        "train_texts": len(train),
        "eval_texts": eval_texts,
        "distill": cfg.__dict__,
        "distill_seconds": round(distill_s, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "before": before,
        "after": after,
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out / "summary.json", summary)
    if log:
        plot_log(log, out / "distill.png", title=f"{model_name} -> {method}")
    return summary


def sweep(
    model_name: str,
    *,
    features: tuple[int, ...] = (64, 128, 256, 512),
    kernels: tuple[str, ...] = ("softmax", "softmax_hyp", "softmax_opt", "relu"),
    linformer_dims: tuple[int, ...] = (64, 128),
    corpus: str = "gcide",
    eval_texts: int = 128,
    max_length: int = 128,
    batch_size: int = 32,
    seeds: int = 1,
    out: str | Path = "results/convert",
    progress: bool = True,
) -> dict:
    """Agreement before any distillation, for each kernel x number of features (and
    Linformer sizes on encoders), averaged over ``seeds`` projection draws."""
    from tqdm.auto import tqdm

    out = Path(out)
    teacher, tok = load_pretrained(model_name)
    texts = corpus_texts(corpus, train=0, test=eval_texts)[1]
    decoder = is_causal_lm(teacher)
    cases = [
        ("favor", {"kernel": k, "num_features": m})
        for k in kernels
        for m in features
        if not (decoder and k == "softmax_opt")
    ]
    if not decoder:
        cases += [("linformer", {"proj_dim": k}) for k in linformer_dims]
    rows = []
    for method, opts in tqdm(cases, desc="sweep", disable=not progress):
        runs = []
        for seed in range(seeds):
            student = convert(copy.deepcopy(teacher), method, seed=seed, **opts)
            runs.append(
                agreement(
                    teacher, student, tok, texts, max_length=max_length, batch_size=batch_size
                )
            )
        row = {
            "method": method,
            "kernel": opts.get("kernel", ""),
            "num_features": opts.get("num_features", ""),
            "proj_dim": opts.get("proj_dim", ""),
        }
        for key in runs[0]:
            row[key] = sum(r[key] for r in runs) / len(runs)
        rows.append(row)
    result = {
        "model": model_name,
        "corpus": corpus,
        "eval_texts": eval_texts,
        "max_length": max_length,
        "seeds": seeds,
        "machine": machine_info(),
        "results": rows,
    }
    fields = [
        "method",
        "kernel",
        "num_features",
        "proj_dim",
        *[k for k in rows[0] if k not in ("method", "kernel", "num_features", "proj_dim")],
    ]
    write_results(out, "sweep", result, fields)
    plot_sweep(result, out / "sweep.png")
    return result


def pack_texts(
    tokenizer, passages: list[str], min_tokens: int, count: int | None = None
) -> list[str]:
    """Join consecutive ``passages`` (with a space) into texts of at least ``min_tokens``
    tokens (at most ``count`` texts; an unfinished last text is dropped)."""
    out: list[str] = []
    parts: list[str] = []
    tokens = 0
    for p in passages:
        parts.append(p)
        tokens += len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1
        if tokens >= min_tokens:
            out.append(" ".join(parts))
            parts, tokens = [], 0
            if count is not None and len(out) == count:
                break
    return out


def eval_sets(
    tokenizer,
    corpora: tuple[str, ...],
    *,
    train_corpus: str,
    train_texts: int,
    eval_texts: int,
    lengths: tuple[int, ...],
    long_eval_texts: int | None = None,
    seed: int = 0,
) -> dict[str, tuple[list[str], int]]:
    """Held-out texts per corpus and length: ``{"gcide@128": (texts, 128), ...}``. At the
    shortest length, ``eval_texts`` held-out passages as :func:`run` measures them (the
    same texts for the same seed); at longer lengths, ``long_eval_texts`` (default
    ``eval_texts``) texts of that many tokens made by joining further held-out passages
    (never the training ones)."""
    sets = {}
    for name in corpora:
        train = train_texts if name == train_corpus else 0
        s = seed if name == train_corpus else seed + 1
        for length in lengths:
            if length == min(lengths):
                texts = corpus_texts(name, train=train, test=eval_texts, seed=s)[1]
            else:
                pool = len(CORPORA[name]()) - train
                # About 40 passages or more per 512 tokens of dictionary text: draw enough.
                count = long_eval_texts or eval_texts
                need = min(pool, count * max(8, length // 8))
                held = corpus_texts(name, train=train, test=need, seed=s)[1]
                texts = pack_texts(tokenizer, held, length, count)
            sets[f"{name}@{length}"] = (texts, length)
    return sets


def heldout_reserve(
    name: str, *, eval_texts: int, lengths: tuple[int, ...], long_eval_texts: int | None = None
) -> int:
    """How many passages of ``name``'s seeded order :func:`eval_sets` may draw as held-out
    text when ``name`` is not the training corpus (its first ones)."""
    pool = len(CORPORA[name]())
    count = long_eval_texts or eval_texts
    need = [eval_texts] + [min(pool, count * max(8, n // 8)) for n in lengths if n != min(lengths)]
    return max(need)


def mixed_training_texts(
    tokenizer,
    corpora: tuple[str, ...],
    *,
    train_texts: int,
    max_length: int,
    eval_texts: int,
    lengths: tuple[int, ...],
    long_eval_texts: int | None = None,
    seed: int = 0,
) -> list[str]:
    """Training texts of ``max_length`` tokens from every corpus of ``corpora``, equally
    many from each, alternating. The first corpus gives ``train_texts`` passages drawn as
    :func:`eval_sets` draws its training passages; each further corpus gives up to
    ``train_texts`` passages taken after all the passages :func:`eval_sets` may hold out
    from it (:func:`heldout_reserve`), so every held-out set stays the one measured when
    training on the first corpus alone and never meets a training text."""
    packed = []
    for i, name in enumerate(corpora):
        if i == 0:
            passages = corpus_texts(name, train=train_texts, test=0, seed=seed)[0]
        else:
            reserve = heldout_reserve(
                name, eval_texts=eval_texts, lengths=lengths, long_eval_texts=long_eval_texts
            )
            take = min(train_texts, len(CORPORA[name]()) - reserve)
            passages = corpus_texts(name, train=reserve, test=take, seed=seed + 1)[1]
        packed.append(pack_texts(tokenizer, passages, max_length))
    count = min(len(p) for p in packed)
    return [p[j] for j in range(count) for p in packed]


# Settings a resumed run may change: when and how much it measures and saves.
_RESUMABLE = {"eval_every", "checkpoint_every", "eval_batch_size"}


def _refuse_changed_settings(old: dict, new: dict) -> None:
    """``--resume`` continues the saved run: a changed setting (other than
    :data:`_RESUMABLE`) is an error naming each one, old -> new."""
    changes = []
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            for field in sorted(set(value) | set(before)):
                if field not in _RESUMABLE and before.get(field) != value.get(field):
                    changes.append(f"{key}.{field}: {before.get(field)!r} -> {value.get(field)!r}")
        elif before != value:
            changes.append(f"{key}: {before!r} -> {value!r}")
    if changes:
        raise ValueError(
            "resume: the run in this folder was made with other settings ("
            + "; ".join(changes)
            + "); resume with the same flags, or use "
            "another --out"
        )


def corpus_names(corpus: str | tuple[str, ...]) -> tuple[str, ...]:
    """``corpus`` (one name or several) as a tuple of distinct names of :data:`CORPORA`;
    ``ValueError`` otherwise."""
    corpora = (corpus,) if isinstance(corpus, str) else tuple(corpus)
    if not corpora or len(set(corpora)) != len(corpora):
        raise ValueError(f"corpus: expected distinct corpus names, got {corpus!r}")
    for name in corpora:
        if name not in CORPORA:
            raise ValueError(f"corpus must be among {sorted(CORPORA)}, got {name!r}")
    return corpora


def run_transfer(
    model_name: str,
    *,
    options: dict | None = None,
    corpus: str | tuple[str, ...] | None = None,
    eval_corpora: tuple[str, ...] = ("gcide", "python-docs"),
    eval_lengths: tuple[int, ...] = (128, 512),
    train_texts: int = 20000,
    eval_texts: int = 128,
    long_eval_texts: int = 32,
    curve_texts: int = 16,
    transfer_config: TransferConfig | None = None,
    config: DistillConfig | None = None,
    out: str | Path = "results/convert",
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Recipe ``transfer``: convert ``model_name`` (``options`` for ``convert(...,
    "favor")`` over the recipe's, ``kernel="hedgehog", window=16``, a decoder's
    ``window=64``), measure, run attention transfer
    (``transfer_config``; default: the recipe's, :func:`recipe_for` a decoder where
    ``model_name`` is one; its texts are training passages joined to
    ``transfer_config.max_length`` tokens; ``corpus`` names one corpus or several, mixed
    by :func:`mixed_training_texts`; default: the recipe's), measure, distill end to end (``config``,
    on training passages joined to ``config.max_length`` tokens), measure. Measurements:
    :func:`~.distill.agreement` on held-out text of every ``eval_corpora`` at every
    ``eval_lengths`` (:func:`eval_sets`: ``eval_texts`` passages at the shortest length,
    ``long_eval_texts`` joined texts at the others); the curves during training use the
    first ``curve_texts`` of the longest held-out set. Either stage is skipped with 0
    steps.

    ``resume``: a stage whose results are in ``out`` is not run again, an interrupted
    attention transfer continues from its last checkpoint, an interrupted distillation
    restarts from the transferred model. Writes ``summary.json``, ``transfer/``,
    ``log.jsonl``, ``distill.png`` and ``checkpoint/`` (the final model)."""
    # The corpora are checked before the model loads (a typo fails at once).
    if corpus is not None:
        corpus = corpus_names(corpus)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tok = load_pretrained(model_name)
    recipe = recipe_for("transfer", decoder=is_causal_lm(teacher))
    tcfg = transfer_config or dataclasses.replace(recipe.transfer)
    cfg = config or dataclasses.replace(recipe.distill)
    options = {**recipe.favor_options(), **(options or {})}
    corpora = corpus_names(recipe.corpora) if corpus is None else corpus
    corpus = corpora[0]
    student = convert(copy.deepcopy(teacher), "favor", **options)

    def training(max_length: int) -> list[str]:
        return mixed_training_texts(
            tok,
            corpora,
            train_texts=train_texts,
            max_length=max_length,
            eval_texts=eval_texts,
            lengths=eval_lengths,
            long_eval_texts=long_eval_texts,
            seed=tcfg.seed,
        )

    train, _ = corpus_texts(corpus, train=train_texts, test=0, seed=tcfg.seed)
    sets = eval_sets(
        tok,
        eval_corpora,
        train_corpus=corpus,
        train_texts=train_texts,
        eval_texts=eval_texts,
        lengths=eval_lengths,
        long_eval_texts=long_eval_texts,
        seed=tcfg.seed,
    )
    # Held-out texts for the curves during training: the first of the longest set.
    curve = sets[f"{corpus}@{max(eval_lengths)}"][0][:curve_texts]
    # The original model's outputs are the same at every measurement: computed once.
    reference = teacher if is_causal_lm(teacher) else _Memo(teacher)
    partial = out / "summary.partial.json"
    summary = read_json(partial) if resume and partial.exists() else {}
    settings = {
        "model": model_name,
        "options": student.config.linattn_conversion["options"],
        "corpus": corpus if len(corpora) == 1 else list(corpora),
        "train_texts": len(train),
        "transfer": asdict(tcfg),
        "distill": asdict(cfg),
    }
    if summary:
        # As the saved file has them (tuples are lists in JSON).
        _refuse_changed_settings(summary, json.loads(json.dumps(settings)))
    summary.update(
        {
            "model": model_name,
            "architecture": type(teacher).__name__,
            "kind": "decoder" if is_causal_lm(teacher) else "encoder",
            "recipe": "transfer",
            "method": "favor",
            "options": student.config.linattn_conversion["options"],
            "corpus": corpus if len(corpora) == 1 else list(corpora),
            "train_texts": len(train),
            "eval_texts": eval_texts,
            "eval_sets": {k: {"texts": len(v[0]), "max_length": v[1]} for k, v in sets.items()},
            "transfer": asdict(tcfg),
            "distill": asdict(cfg),
            "machine": machine_info(),
            "torch_threads": torch.get_num_threads(),
        }
    )

    def measure(model) -> dict:
        return {
            name: agreement(
                reference,
                model,
                tok,
                texts,
                max_length=length,
                batch_size=cfg.eval_batch_size,
                progress=progress,
                desc=f"measure {name}",
            )
            for name, (texts, length) in sets.items()
        }

    def save_partial() -> None:
        write_json(partial, summary)

    started = time.perf_counter()
    if "before" not in summary:
        summary["before"] = measure(student)
        save_partial()
    tdir = out / "transfer"
    if "after_transfer" in summary:
        student = load_converted(tdir / "checkpoint").eval()
    else:
        t0 = time.perf_counter()
        if tcfg.steps:
            long_train = training(tcfg.max_length)
            transfer(
                student,
                tok,
                long_train,
                curve,
                tcfg,
                teacher=reference,
                out_dir=tdir,
                resume=resume,
                progress=progress,
            )
        summary["transfer_seconds"] = round(time.perf_counter() - t0, 1)
        summary["after_transfer"] = measure(student) if tcfg.steps else summary["before"]
        save_partial()
    if "after" not in summary:
        t0 = time.perf_counter()
        log: list[dict] = []
        if cfg.steps:
            long_train = training(cfg.max_length)
            log = distill(
                student, teacher, tok, long_train, curve, cfg, out_dir=out, progress=progress
            )
            plot_log(log, out / "distill.png", title=f"{model_name} -> {options}")
        else:
            save_converted(student, out / "checkpoint")
        summary["distill_seconds"] = round(time.perf_counter() - t0, 1)
        summary["after"] = measure(student) if cfg.steps else summary["after_transfer"]
        save_partial()
    # The checkpoint loads with load_converted; its tokenizer goes beside it.
    tok.save_pretrained(out / "checkpoint")
    summary["total_seconds"] = round(
        summary.get("total_seconds", 0.0) + time.perf_counter() - started, 1
    )
    write_json(out / "summary.json", summary)
    return summary


class _Memo(torch.nn.Module):
    """An encoder whose outputs are remembered per input batch (evaluation only)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.memo: dict = {}

    def forward(self, **batch):
        key = tuple((k, v.shape, v.cpu().numpy().tobytes()) for k, v in sorted(batch.items()))
        if key not in self.memo:
            self.memo[key] = self.model(**batch)
        return self.memo[key]
