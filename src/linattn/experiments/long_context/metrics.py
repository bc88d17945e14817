"""Per-token agreement of a model with a reference model, and its summaries by length
and by position bucket (pure functions on tensors).

Shape legend: ``L`` tokens of one text, ``V`` the vocabulary, ``D`` the hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Positions per slice when logits are computed from hidden states (``slice x V``
#: float32 logits per model at a time, not ``L x V``).
LOGIT_SLICE = 512


def token_stats(ref_logits: Tensor, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per-position agreement of ``logits`` with ``ref_logits``.

    Args:
        ref_logits, logits: ``(L, V)`` next-token logits (row ``i`` predicts
            ``targets[i]``) of the reference (exact) model and the compared one.
        targets: ``(L,)`` token ids.

    Returns ``{"nll_ref", "nll", "kl", "agree"}``, each ``(L,)`` float64: the negative
    log-likelihoods of ``targets``, ``KL(ref || model)`` of the next-token distributions
    and 1.0 where the two top-1 predictions agree. Equivalent to::

        lr, lm = log_softmax(ref_logits), log_softmax(logits)
        nll = -lm[arange(L), targets]; kl = (lr.exp() * (lr - lm)).sum(-1)
    """
    lr = F.log_softmax(ref_logits.double(), -1)
    lm = F.log_softmax(logits.double(), -1)
    t = targets.unsqueeze(-1)
    return {
        "nll_ref": -lr.gather(-1, t).squeeze(-1),
        "nll": -lm.gather(-1, t).squeeze(-1),
        "kl": (lr.exp() * (lr - lm)).sum(-1),
        "agree": (lr.argmax(-1) == lm.argmax(-1)).double(),
    }


def stats_from_hidden(
    ref_head,
    head,
    ref_hidden: Tensor,
    hidden: Tensor,
    targets: Tensor,
    *,
    slice_len: int = LOGIT_SLICE,
) -> dict[str, Tensor]:
    """:func:`token_stats` of ``ref_head(ref_hidden)`` against ``head(hidden)`` (the two
    models' language-model heads, ``(.., D) -> (.., V)``), computed ``slice_len``
    positions at a time. ``ref_hidden, hidden: (L, D)``, ``targets: (L,)``; the same
    numbers as one call on the whole logits, with ``slice_len x V`` logits per model in
    memory instead of ``L x V``."""
    parts = [
        token_stats(
            ref_head(ref_hidden[i : i + slice_len]),
            head(hidden[i : i + slice_len]),
            targets[i : i + slice_len],
        )
        for i in range(0, targets.shape[0], slice_len)
    ]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def summarize(stats: dict[str, Tensor], start: int = 0, end: int | None = None) -> dict:
    """Mean agreement over positions ``start:end`` of :func:`token_stats` rows (several
    texts: concatenate their rows first): ``ppl``, ``ppl_exact``, ``ppl_ratio``
    (``exp(mean nll - mean nll_ref)``), ``kl`` (mean per token), ``top1_agreement`` and
    ``tokens``. Empty range: ``{"tokens": 0}``."""
    part = {k: v[start:end] for k, v in stats.items()}
    n = part["nll"].numel()
    if n == 0:
        return {"tokens": 0}
    nll, nll_ref = part["nll"].mean().item(), part["nll_ref"].mean().item()
    return {
        "ppl": math.exp(nll),
        "ppl_exact": math.exp(nll_ref),
        "ppl_ratio": math.exp(nll - nll_ref),
        "kl": part["kl"].mean().item(),
        "top1_agreement": part["agree"].mean().item(),
        "tokens": n,
    }


def bucket_edges(buckets: tuple[int, ...], length: int) -> list[tuple[int, int]]:
    """The position buckets ``[a, b)`` of ``buckets`` (increasing edges, e.g.
    ``(0, 64, 512, 2048)``) that start inside a text of ``length`` positions, the last
    one cut at ``length``."""
    edges = sorted(set(buckets))
    out = []
    for a, b in zip(edges, [*edges[1:], None]):
        if a >= length:
            break
        out.append((a, length if b is None else min(b, length)))
    return out


def by_bucket(stats: list[dict[str, Tensor]], buckets: tuple[int, ...]) -> list[dict]:
    """:func:`summarize` per position bucket over several texts of one length
    (``stats``: one :func:`token_stats` dict per text; position ``i`` predicts token
    ``i + 1``). Rows ``{"from", "to", **summary}``."""
    length = stats[0]["nll"].shape[0]
    rows = []
    for a, b in bucket_edges(buckets, length):
        merged = {k: torch.cat([s[k][a:b] for s in stats]) for k in stats[0]}
        rows.append({"from": a, "to": b, **summarize(merged)})
    return rows


def answer_score(logits: Tensor, answer: Tensor) -> dict:
    """Teacher-forced score of one answer: ``logits: (n, V)``, row ``i`` predicting
    ``answer[i]`` (``answer: (n,)``). ``exact``: 1.0 when every top-1 prediction is the
    answer token, else 0.0; ``logprob``: mean log-probability per answer token."""
    lp = F.log_softmax(logits.double(), -1)
    hit = bool((lp.argmax(-1) == answer).all())
    return {
        "exact": float(hit),
        "logprob": lp.gather(-1, answer.unsqueeze(-1)).mean().item(),
    }


def retrieval_scores(queries: Tensor, docs: Tensor) -> dict:
    """Query ``i``'s document is document ``i``: ``recall@1``, ``recall@5`` and ``mrr``
    of the ranking by cosine similarity. ``queries: (N, D)``, ``docs: (N, D)``."""
    q = F.normalize(queries.double(), dim=-1)
    d = F.normalize(docs.double(), dim=-1)
    sims = q @ d.T
    own = sims.diagonal().unsqueeze(-1)
    # Rank 1 + documents scored strictly higher than the right one (ties favour it).
    rank = 1 + (sims > own).sum(-1)
    return {
        "recall@1": (rank <= 1).double().mean().item(),
        "recall@5": (rank <= 5).double().mean().item(),
        "mrr": (1.0 / rank.double()).mean().item(),
        "documents": int(queries.shape[0]),
    }
