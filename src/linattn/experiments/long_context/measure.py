"""The accuracy measurements of ``linattn eval``: a converted model and its ablations
against the original, by length, by position, on recall tasks, and (encoders) on
embeddings and retrieval.

Models are compared as ``"exact"`` (the original), ``"hybrid"`` (the converted model as
it is), ``"window-only"`` (its far part and its slots off: exact over the window and the
sinks) and ``"linear-only"`` (no window, no sinks, no slots: the feature map alone); a
model converted with exact key-value slots adds ``"no-slots"`` (the plain window hybrid:
what the slots add) and ``"no-far"`` (window, sinks and slots, the evicted keys dropped:
what the feature-map part adds beside the slots). Switched with
:func:`linattn.integrations.hf.attention_parts`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...integrations.hf.distill import _pool, tokenize
from ...integrations.hf.state import converted_layers
from . import metrics
from .tasks import RecallExample, check_example, placement

#: The converted model's ablations, in table order.
VARIANTS = ("hybrid", "window-only", "linear-only")
#: The ablations that exist only for a model converted with slots (after the hybrid).
SLOT_VARIANTS = ("no-slots", "no-far")
#: Each ablation's :func:`~linattn.integrations.hf.attention_parts` switches, in table
#: order.
PARTS_OF = {
    "hybrid": {},
    "no-slots": {"slots": False},
    "no-far": {"far": False},
    "window-only": {"far": False, "slots": False},
    "linear-only": {"near": False},
}
#: Every compared model: the original, then the ablations.
MODELS = ("exact", *VARIANTS)


def conversion(model: nn.Module) -> dict:
    """``{"window", "sinks", "slots", "slot_rule", "layers"}`` of a FAVOR+-converted
    model (its first layer's settings; ``layers``: how many converted attention layers)."""
    layers = list(converted_layers(model))
    if not layers or layers[0].linattn.method != "favor":
        raise ValueError("linattn eval needs a model converted with method='favor'")
    first = layers[0].linattn
    return {
        "window": first.window,
        "sinks": first.sinks,
        "slots": first.slots,
        "slot_rule": first.slot_rule,
        "layers": len(layers),
    }


def variants_of(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The ablations that exist for ``model`` and, for each one left out, why (e.g.
    ``window-only`` without a window or sinks: no key would be left), as
    :func:`~linattn.integrations.hf.attention_parts` refuses it."""
    from ...integrations.hf import attention_parts

    slots = conversion(model)["slots"]
    names, skipped = [], {}
    for name in PARTS_OF:
        if name in SLOT_VARIANTS and not slots:
            continue  # without slots: the hybrid and window-only again
        try:
            with attention_parts(model, **PARTS_OF[name]):
                pass
        except ValueError as exc:
            skipped[name] = str(exc)
            continue
        names.append(name)
    return names, skipped


@contextlib.contextmanager
def variant(model: nn.Module, name: str) -> Iterator[nn.Module]:
    """``model`` with the attention parts of ablation ``name`` (one of
    :data:`VARIANTS`) switched on, restored when the block ends."""
    if name not in PARTS_OF:
        raise ValueError(f"variant must be one of {tuple(PARTS_OF)}, got {name!r}")
    if name == "hybrid":
        yield model
        return
    from ...integrations.hf import attention_parts

    with attention_parts(model, **PARTS_OF[name]):
        yield model


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def last_hidden(model: nn.Module, ids: Tensor) -> Tensor:
    """A decoder's last hidden states ``(L, D)`` for one text ``ids: (1, L)`` (its
    ``get_decoder()``, no cache): the language-model head then makes the logits a
    slice at a time."""
    out = model.get_decoder()(input_ids=ids.to(_device(model)), use_cache=False)
    return out.last_hidden_state[0]


def text_ids(tokenizer, texts: list[str], length: int) -> list[Tensor]:
    """Each text's first ``length`` tokens as ``(1, length)``; shorter texts are left
    out."""
    out = []
    for text in texts:
        ids = tokenize(tokenizer, [text], length)["input_ids"]
        if ids.shape[1] == length:
            out.append(ids)
    return out


@torch.no_grad()
def decoder_quality(
    teacher: nn.Module,
    student: nn.Module,
    texts: dict[int, list[Tensor]],
    *,
    variants: list[str],
    buckets: tuple[int, ...],
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Perplexity ratio, KL and top-1 agreement of every ablation against ``teacher``:
    one row per ``(length, model)`` over the texts of that length (``texts``: length
    -> ``(1, length)`` ids) and one per ``(length, model, position bucket)``. The exact
    model's rows have ratio 1, KL 0 and agreement 1 by definition (its perplexity is in
    every row's ``ppl_exact``)."""
    rows, bucket_rows = [], []
    ref_head, head = teacher.get_output_embeddings(), student.get_output_embeddings()
    for length, ids_list in texts.items():
        if not ids_list:
            continue
        refs = [
            last_hidden(teacher, ids)[:-1]
            for ids in tqdm(ids_list, desc=f"exact @{length}", disable=not progress, leave=False)
        ]
        targets = [ids[0, 1:].to(refs[0].device) for ids in ids_list]
        for name in ["exact", *variants]:
            stats = []
            for ref, ids, tgt in zip(
                refs,
                ids_list,
                targets,
            ):
                if name == "exact":
                    stats.append(metrics.stats_from_hidden(ref_head, ref_head, ref, ref, tgt))
                    continue
                with variant(student, name) as m:
                    hidden = last_hidden(m, ids)[:-1]
                stats.append(metrics.stats_from_hidden(ref_head, head, ref, hidden, tgt))
            merged = {k: torch.cat([s[k] for s in stats]) for k in stats[0]}
            base = {"length": length, "model": name, "texts": len(ids_list)}
            rows.append({**base, **metrics.summarize(merged)})
            bucket_rows += [{**base, **r} for r in metrics.by_bucket(stats, buckets)]
    return rows, bucket_rows


@torch.no_grad()
def score_example(model: nn.Module, example: RecallExample) -> dict:
    """:func:`~.metrics.answer_score` of ``model`` on one recall example."""
    check_example(example)
    ids = torch.tensor([example.input_ids])
    a, n = example.answer_start, example.answer_len
    hidden = last_hidden(model, ids)[a - 1 : a + n - 1]
    logits = model.get_output_embeddings()(hidden)
    return metrics.answer_score(logits, ids[0, a : a + n].to(logits.device))


def recall(
    teacher: nn.Module,
    student: nn.Module,
    examples: list[RecallExample],
    *,
    variants: list[str],
    progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Every model scored on every example. Returns ``(rows, examples)``: one row per
    ``(task, distance, model)`` with ``accuracy`` (exact answers), ``logprob`` (mean
    per answer token), ``chance`` and where the source lies (:func:`~.tasks.placement`
    for the converted model), and the per-example scores."""
    info = conversion(student)
    per = []
    bar = tqdm(total=len(examples) * (1 + len(variants)), desc="recall", disable=not progress)
    for name in ["exact", *variants]:
        for i, ex in enumerate(examples):
            if name == "exact":
                score = score_example(teacher, ex)
            else:
                with variant(student, name) as m:
                    score = score_example(m, ex)
            per.append({"model": name, "example": i, **ex.as_row(), **score})
            bar.update()
    bar.close()
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in per:
        groups.setdefault((r["task"], r["distance"], r["model"]), []).append(r)
    for (task, distance, name), rs in groups.items():
        ex = next(e for e in examples if e.task == task and e.distance == distance)
        where = placement(ex, window=info["window"], sinks=info["sinks"], layers=info["layers"])
        rows.append(
            {
                "task": task,
                "distance": distance,
                "model": name,
                "accuracy": sum(r["exact"] for r in rs) / len(rs),
                "logprob": sum(r["logprob"] for r in rs) / len(rs),
                "examples": len(rs),
                "chance": ex.chance,
                "length": max(r["length"] for r in rs),
                **where,
            }
        )
    order = {name: i for i, name in enumerate(("exact", *PARTS_OF))}
    task_order = {t: i for i, t in enumerate(dict.fromkeys(ex.task for ex in examples))}
    rows.sort(key=lambda r: (task_order[r["task"]], r["distance"], order[r["model"]]))
    return rows, per


def retrieval_queries(
    tokenizer, docs: list[str], *, max_length: int, query_tokens: int = 32, seed: int = 0
) -> list[str]:
    """One query per document: ``query_tokens`` consecutive tokens taken verbatim from a
    seeded place in the second half of its first ``max_length`` tokens (so that the
    query's words lie deep inside the document), decoded to text."""
    rng = random.Random(seed)
    out = []
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False, truncation=True, max_length=max_length)[
            "input_ids"
        ]
        lo = len(ids) // 2
        hi = max(lo, len(ids) - query_tokens)
        start = rng.randint(lo, hi)
        out.append(tokenizer.decode(ids[start : start + query_tokens], skip_special_tokens=True))
    return out


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer, texts: list[str], *, max_length: int, batch_size: int
) -> Tensor:
    """Sentence embeddings ``(N, D)`` (masked mean of the last hidden states,
    L2-normalized: :func:`~linattn.integrations.hf.distill.embedding_agreement`'s)."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenize(tokenizer, texts[i : i + batch_size], max_length, _device(model))
        out.append(_pool(model(**batch).last_hidden_state.double(), batch["attention_mask"]))
    return torch.cat(out).cpu()


def encoder_quality(
    teacher: nn.Module,
    student: nn.Module,
    tokenizer,
    docs: list[str],
    *,
    variants: list[str],
    max_length: int,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """One row per model: embedding cosine against the exact model on ``docs`` at
    ``max_length`` tokens (``mean_cosine``, ``min_cosine``) and retrieval of each
    document by its query (:func:`retrieval_queries`; ``recall@1``, ``recall@5``,
    ``mrr``), queries and documents embedded by the same model."""
    queries = retrieval_queries(tokenizer, docs, max_length=max_length)
    kw = {"max_length": max_length, "batch_size": batch_size}
    ref_docs = embed(teacher, tokenizer, docs, **kw)
    rows = []
    for name in tqdm(["exact", *variants], desc="encoder", disable=not progress):
        if name == "exact":
            d, q = ref_docs, embed(teacher, tokenizer, queries, **kw)
        else:
            with variant(student, name) as m:
                d = embed(m, tokenizer, docs, **kw)
                q = embed(m, tokenizer, queries, **kw)
        cos = (d * ref_docs).sum(-1)
        rows.append(
            {
                "model": name,
                "max_length": max_length,
                "mean_cosine": cos.mean().item(),
                "min_cosine": cos.min().item(),
                **metrics.retrieval_scores(q, d),
            }
        )
    return rows
