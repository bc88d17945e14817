"""The slot hybrid token by token (:func:`slots_reference`): plain sets and the exact
feature map, the oracle of the fast forms (float64, small sizes)."""

from __future__ import annotations

import torch
from torch import Tensor

from ....features import FeatureMap, FeatureParams
from .common import Rule, _check_config, _check_inputs, _lf, tie_safe


def slots_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    window: int,
    slots: int,
    sinks: int = 0,
    interval: int | None = None,
    rule: Rule = "error",
    linear_factor: Tensor | None = None,
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
) -> tuple[Tensor, list[list[list[int]]]]:
    """The oracle, token by token, per (batch, head), by the module docstring's rules;
    with a ``decay`` (``ln gamma``) the far score of query ``i`` and key ``j`` (and the
    error rule's read-out before query ``i``) is weighed by ``gamma^(i - j)``; ``far_q,
    far_k``: the feature map's inputs (default ``q``, ``k``).

    Returns ``(out: (B, H, L, dv), cached)`` with ``cached[b][h]`` the positions in the
    cache at the end (in cache order). Uses ``fm.exact`` (no stabilizer): small, tame
    inputs only (float64 in the tests).
    """
    _check_config(window, sinks, slots, interval, rule)
    _check_inputs(q, k, v, fm, None)
    step = window if interval is None else interval
    bsz, heads, length, _ = q.shape
    fq = fm.exact(q if far_q is None else far_q, params, is_query=True)  # [B, H, L, M]
    fk = fm.exact(k if far_k is None else far_k, params, is_query=False)
    lf = _lf(linear_factor, q).reshape(-1) if linear_factor is not None else None
    lds = None if decay is None else decay.to(q.dtype).reshape(-1)
    rows: list[list[Tensor]] = []
    cached_all: list[list[list[int]]] = []
    for b in range(bsz):
        rows_b, cached_b = [], []
        for h in range(heads):
            lam = 1.0 if lf is None else lf[h if lf.numel() > 1 else 0]
            ldh = 0.0 if lds is None else lds[h if lds.numel() > 1 else 0]

            def gam(i: int, js: list[int], ldh=ldh) -> Tensor:
                # gamma^(i - j) for the keys js
                return torch.exp(ldh * (i - torch.tensor(js, dtype=q.dtype)))

            cache: list[int] = []
            pending: list[int] = []
            far: list[int] = []
            mass = [0.0] * length
            outs = []
            for i in range(length):
                j = i - window
                if j >= sinks:
                    pending.append(j)
                    if (j - sinks + 1) % step == 0:
                        cands = cache + pending
                        if len(cands) > slots:
                            with torch.no_grad():
                                m_score = [mass[c] for c in cands]
                                e_score = []
                                for c in cands if rule != "mass" else ():
                                    read = torch.zeros_like(v[b, h, c])
                                    if far:
                                        a_c = (fk[b, h, far] @ fk[b, h, c]) * gam(i, far)
                                        z = a_c.sum()
                                        if z != 0:
                                            read = a_c @ v[b, h, far] / z
                                    e_score.append(float((v[b, h, c] - read).norm()))
                                if rule == "mass":
                                    score = m_score
                                elif rule == "error":
                                    score = e_score
                                else:  # union: each divided by its largest, the larger
                                    top_e, top_m = max(e_score), max(m_score)
                                    score = [
                                        max(e / top_e if top_e > 0 else 0.0,
                                            m / top_m if top_m > 0 else 0.0)
                                        for e, m in zip(e_score, m_score)
                                    ]  # fmt: skip
                            # stable: larger score first, ties (up to rounding: tie_safe)
                            # by candidate order
                            score = tie_safe(torch.tensor(score, dtype=q.dtype)).tolist()
                            order = sorted(range(len(cands)), key=lambda t: (-score[t], t))
                            keep = sorted(order[:slots])
                            far += [cands[t] for t in range(len(cands)) if t not in keep]
                            cache = [cands[t] for t in keep]
                        else:
                            cache = cands
                        pending = []
                exact = [p for p in range(i + 1) if p < sinks or p > i - window]
                exact += cache + pending
                s_ex = torch.exp(params.scale * (k[b, h, exact] @ q[b, h, i]))
                num = s_ex @ v[b, h, exact]
                den = s_ex.sum()
                if far:
                    a = lam * (fk[b, h, far] @ fq[b, h, i]) * gam(i, far)
                    num = num + a @ v[b, h, far]
                    den = den + a.sum()
                outs.append(num / den)
                with torch.no_grad():
                    for p, val in zip(exact, (s_ex / den).tolist()):
                        mass[p] += val
            rows_b.append(torch.stack(outs))
            cached_b.append(cache)
        rows.append(torch.stack(rows_b))
        cached_all.append(cached_b)
    return torch.stack(rows), cached_all
