"""The slot hybrid in segments between decisions (:func:`favor_slots`) and its decoding
step from a :class:`~.common.SlotState` (:func:`favor_slots_step`): stabilized,
float32-safe; :func:`~.reference.slots_reference` is their oracle."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ....features import FeatureMap, FeatureParams
from ..common import builds_grad, graph_captured
from .common import (
    MASS_RULES,
    Rule,
    SlotState,
    _check_config,
    _check_inputs,
    _lf,
    tie_safe,
    union_score,
)


def _floor(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 4


def empty_slot_state(
    bsz: int,
    heads: int,
    head_dim: int,
    dv: int,
    num_features: int,
    *,
    dtype,
    device,
    far: bool = False,
) -> SlotState:
    """The state before any token (``far``: with far-key fields)."""

    def z(*shape, dt=dtype):
        return torch.zeros(*shape, dtype=dt, device=device)

    return SlotState(
        pos=0,
        sink_k=z(bsz, heads, 0, head_dim),
        sink_v=z(bsz, heads, 0, dv),
        local_k=z(bsz, heads, 0, head_dim),
        local_v=z(bsz, heads, 0, dv),
        local_score=z(bsz, heads, 0),
        cache_k=z(bsz, heads, 0, head_dim),
        cache_v=z(bsz, heads, 0, dv),
        cache_score=z(bsz, heads, 0),
        cache_pos=z(bsz, heads, 0, dt=torch.long),
        kv=z(bsz, heads, num_features, dv + 1),
        stab=torch.full((bsz, heads), _floor(dtype), dtype=dtype, device=device),
        local_fk=z(bsz, heads, 0, head_dim) if far else None,
        cache_fk=z(bsz, heads, 0, head_dim) if far else None,
    )


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """``x: (B, H, n, e)`` rows ``idx: (B, H, g)`` -> ``(B, H, g, e)``."""
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def _read_error(
    keys: Tensor, values: Tensor, kv: Tensor, fm: FeatureMap, params: FeatureParams
) -> Tensor:
    """``||v_j - S^T phi(k_j) / z^T phi(k_j)||: (B, H, n)`` from the stabilized state
    ``kv: (B, H, M, dv + 1)`` (the ratio is free of every scale); read 0 if ``z.phi = 0``."""
    f, _ = fm.stabilized(keys, params, is_query=False)  # [B, H, n, M]
    nd = f @ kv  # [B, H, n, dv + 1]
    den = nd[..., -1:]
    read = torch.where(den != 0, nd[..., :-1] / torch.where(den != 0, den, 1.0), 0.0)
    return (values - read).norm(dim=-1)


def _decide(
    st: SlotState,
    group: int,
    fm: FeatureMap,
    params: FeatureParams,
    slots: int,
    rule: Rule,
    ld: Tensor | None = None,
) -> SlotState:
    """Decide on the first ``group`` undecided keys (the pending group) and the cache
    (``ld``: the decay's ``ln gamma`` as ``(1, H, 1)`` or ``()``, or None)."""
    gk, gv = st.local_k[:, :, :group], st.local_v[:, :, :group]
    lo = st.pos - st.local_k.shape[2]
    bsz, heads = gk.shape[:2]
    gpos = torch.arange(lo, lo + group, device=gk.device).expand(bsz, heads, group)
    ck = torch.cat([st.cache_k, gk], 2)
    cv = torch.cat([st.cache_v, gv], 2)
    far = st.local_fk is not None
    # The keys the feature map scores: the far keys when given.
    cfk = torch.cat([st.cache_fk, st.local_fk[:, :, :group]], 2) if far else ck
    cpos = torch.cat([st.cache_pos, gpos], 2)
    cscore = torch.cat([st.cache_score, st.local_score[:, :, :group]], 2)
    n = ck.shape[2]
    kv, stab = st.kv, st.stab
    keep_fk = cfk if far else None
    if n <= slots:
        keep_k, keep_v, keep_pos, keep_score = ck, cv, cpos, cscore
    else:
        with torch.no_grad():
            if rule == "mass":
                score = cscore
            else:
                score = _read_error(cfk, cv, kv, fm, params)
                if rule == "union":
                    score = union_score(score, cscore)
            order = torch.sort(tie_safe(score), dim=-1, descending=True, stable=True).indices
            keep_idx = order[..., :slots].sort(-1).values
            out_idx = order[..., slots:].sort(-1).values
        keep_k, keep_v = _gather(ck, keep_idx), _gather(cv, keep_idx)
        if far:
            keep_fk = _gather(cfk, keep_idx)
        keep_pos = torch.gather(cpos, 2, keep_idx)
        keep_score = torch.gather(cscore, 2, keep_idx)
        ev = _gather(cv, out_idx)
        f, r = fm.stabilized(_gather(cfk, out_idx), params, is_query=False)  # [B, H, e, M]
        if ld is not None:
            # gamma^(pos - j): the state's frame is the next query's position.
            dist = (st.pos - torch.gather(cpos, 2, out_idx)).to(r.dtype)
            r = r + ld * dist
        with torch.no_grad():
            new = torch.maximum(stab, r.max(-1).values)
        vv = torch.cat([ev, torch.ones_like(ev[..., :1])], -1)
        w = torch.exp(r - new.unsqueeze(-1)).unsqueeze(-1)
        kv = kv * torch.exp(stab - new)[..., None, None] + f.transpose(-2, -1) @ (w * vv)
        stab = new
    return st._replace(
        local_k=st.local_k[:, :, group:],
        local_v=st.local_v[:, :, group:],
        local_score=st.local_score[:, :, group:],
        cache_k=keep_k,
        cache_v=keep_v,
        cache_pos=keep_pos,
        cache_score=keep_score,
        kv=kv,
        stab=stab,
        local_fk=st.local_fk[:, :, group:] if far else None,
        cache_fk=keep_fk,
    )


@functools.cache
def compiled_decide():
    """:func:`_decide` through ``torch.compile`` (made once, on first use). Taken only in
    the steady state (:func:`_decide_steady`): a full cache, where every decision of a
    sequence has the same shapes (``slots`` cached keys, ``interval`` pending ones), so
    that it compiles once (and once more with the position made symbolic)."""
    return torch.compile(_decide, dynamic=None)


def _decide_steady(st: SlotState, slots: int, params: FeatureParams, ld: Tensor | None) -> bool:
    """Whether a decision may take :func:`compiled_decide`: the cache is full (the shapes
    no longer change), no graph is being captured (an outer ``torch.compile`` traces the
    eager form) and no gradient is to be built."""
    if st.cache_k.shape[2] != slots or graph_captured():
        return False
    return not builds_grad(
        st.local_k, st.local_v, st.cache_k, st.cache_v, st.kv, st.local_fk, st.cache_fk,
        params.weight, ld,
    )  # fmt: skip


def _segment(
    st: SlotState,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    sinks: int,
    lf: Tensor,
    track_mass: bool,
    fq_in: Tensor | None = None,
    fk_in: Tensor | None = None,
    ld: Tensor | None = None,
) -> tuple[Tensor, SlotState]:
    """Queries ``pos .. pos + n - 1`` with no decision among them: returns
    ``(out: (B, H, n, dv), state)`` with the segment's keys appended (``fq_in, fk_in``:
    the far queries and keys, or None; ``ld``: ``ln gamma`` as :func:`_decide`)."""
    n = q.shape[2]
    a = st.pos
    # sink keys of the segment (positions < sinks) and the rest
    ns = max(0, min(sinks - a, n))
    sink_k = torch.cat([st.sink_k, k[:, :, :ns]], 2)
    sink_v = torch.cat([st.sink_v, v[:, :, :ns]], 2)
    local_k = torch.cat([st.local_k, k[:, :, ns:]], 2)
    local_v = torch.cat([st.local_v, v[:, :, ns:]], 2)
    local_score = torch.cat([st.local_score, st.local_score.new_zeros(*k.shape[:2], n - ns)], 2)
    lo = a + n - local_k.shape[2]
    dev = q.device
    qi = torch.arange(a, a + n, device=dev)[:, None]
    sink_pos = torch.arange(sink_k.shape[2], device=dev)[None, :]
    local_pos = torch.arange(lo, a + n, device=dev)[None, :]
    # The exact keys in three groups, scored apart (no copy of the cache per token):
    # sinks and the undecided keys masked by position, the cached keys (older than
    # every query of the segment) all visible. Empty groups are left out.
    groups = [
        (name, keys, vals, visible)
        for name, keys, vals, visible in (
            ("sink", sink_k, sink_v, sink_pos <= qi),
            ("cache", st.cache_k, st.cache_v, None),
            ("local", local_k, local_v, local_pos <= qi),
        )
        if keys.shape[2]
    ]
    scores = []
    for _, keys, _, visible in groups:
        sc = params.scale * (q @ keys.transpose(-2, -1))  # [B, H, n, K_group]
        scores.append(sc if visible is None else sc.masked_fill(~visible, float("-inf")))
    # [B, H, n]; the query's own key (a sink or an undecided key) is always visible
    g_ex = torch.stack([sc.detach().amax(-1) for sc in scores]).amax(0)
    es = [torch.exp(sc - g_ex.unsqueeze(-1)) for sc in scores]
    num = sum(e @ vals for e, (_, _, vals, _) in zip(es, groups))
    den_ex = sum(e.sum(-1, keepdim=True) for e in es)
    nd_ex = torch.cat([num, den_ex], -1)  # [B, H, n, dv + 1]
    fq, rq = fm.stabilized_query(q if fq_in is None else fq_in, params)
    nd_far = (fq @ st.kv) * lf.unsqueeze(-1)
    g_far = rq + st.stab.unsqueeze(-1) + 2 * _log_const(fm, params, q)
    stab = st.stab
    if ld is not None:
        # Query a + t reads the state (frame a) with gamma^t; the next frame is a + n.
        g_far = g_far + ld * torch.arange(n, device=dev, dtype=q.dtype)
        stab = stab + (ld * n).reshape(-1)
    top = torch.maximum(g_ex, g_far.detach())
    nd = nd_ex * torch.exp(g_ex - top).unsqueeze(-1) + nd_far * torch.exp(g_far - top).unsqueeze(-1)
    den = nd[..., -1:]
    out = nd[..., :-1] / den
    cache_score = st.cache_score
    if track_mass:
        with torch.no_grad():
            # p_ij = e^{s_ij} / den_i, summed over the segment's queries
            w = torch.exp(g_ex - top).unsqueeze(-1) / den  # [B, H, n, 1]
            got = {name: (e * w).sum(2) for e, (name, _, _, _) in zip(es, groups)}
            if "cache" in got:
                cache_score = cache_score + got["cache"]
            if "local" in got:
                local_score = local_score + got["local"]
    new = st._replace(
        pos=a + n,
        sink_k=sink_k,
        sink_v=sink_v,
        local_k=local_k,
        local_v=local_v,
        local_score=local_score,
        cache_score=cache_score,
        stab=stab,
        local_fk=None if fk_in is None else torch.cat([st.local_fk, fk_in[:, :, ns:]], 2),
    )
    return out, new


def _log_const(fm: FeatureMap, params: FeatureParams, q: Tensor) -> Tensor | float:
    c = fm.log_const(params)
    if isinstance(c, Tensor) and c.dim():
        return c.to(q.dtype).unsqueeze(-1)
    return c


def favor_slots_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    state: SlotState | None = None,
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
    compiled: bool = False,
) -> tuple[Tensor, SlotState]:
    """``n`` new tokens ``q, k: (B, H, n, d)``, ``v: (B, H, n, dv)`` after ``state``
    (None: the start). Returns ``(out: (B, H, n, dv), state)``. Calling it token by
    token, in blocks or once over the sequence gives the same outputs up to rounding.
    The configuration (``window``, ``slots``, ``sinks``, ``interval``, ``rule``,
    ``decay``, far inputs or not) must be the same at every call of one sequence.
    ``decay`` (``ln gamma: (H,)`` or ``()``), ``far_q``/``far_k`` (shapes of ``q``/``k``,
    both or neither): as :func:`linattn.favor_attention`'s, for the evicted keys' scores
    (the error rule reads the state back through the far keys too). ``compiled``:
    decisions on a full cache go through :func:`compiled_decide` (the same choices and
    sums up to rounding; the first compiles, seconds, once per process), the rest of the
    step stays eager; decisions that build a gradient stay eager too."""
    _check_config(window, sinks, slots, interval, rule)
    if not isinstance(compiled, bool):
        raise TypeError(f"compiled must be a bool, got {type(compiled).__name__}")
    _check_inputs(q, k, v, fm, None)
    if (far_q is None) != (far_k is None):
        raise ValueError("far_q and far_k go together (both or neither)")
    far = far_k is not None
    if far and (far_q.shape != q.shape or far_k.shape != k.shape):
        raise ValueError(
            f"far_q/far_k must have q's/k's shapes {tuple(q.shape)}, got "
            f"{tuple(far_q.shape)} / {tuple(far_k.shape)}"
        )
    step = window if interval is None else interval
    if state is None:
        f, _ = fm.stabilized_query(q[:, :, :1], params)
        state = empty_slot_state(
            q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], f.shape[-1],
            dtype=q.dtype, device=q.device, far=far,
        )  # fmt: skip
    elif (state.local_fk is not None) != far:
        made = "with" if state.local_fk is not None else "without"
        raise ValueError(
            f"the slot state was made {made} far inputs; pass far_q/far_k at every call "
            "of a sequence or at none"
        )
    lf = _lf(linear_factor, q)
    ld = None if decay is None else _lf(decay, q)
    first = sinks + window - 1 + step  # the first query preceded by a decision
    outs = []
    i, n = 0, q.shape[2]
    while i < n:
        p = state.pos
        if p >= first and (p - first) % step == 0:
            decide = _decide
            if compiled and _decide_steady(state, slots, params, ld):
                decide = compiled_decide()
            state = decide(state, step, fm, params, slots, rule, ld)
        nxt = first if p < first else p + step - (p - first) % step
        j = min(n, i + nxt - p)
        out, state = _segment(
            state, q[:, :, i:j], k[:, :, i:j], v[:, :, i:j], fm, params, sinks, lf,
            rule in MASS_RULES,
            None if far_q is None else far_q[:, :, i:j],
            None if far_k is None else far_k[:, :, i:j],
            ld,
        )  # fmt: skip
        outs.append(out)
        i = j
    return torch.cat(outs, 2), state


def favor_slots(
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
    key_padding_mask: Tensor | None = None,
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
    compiled: bool = False,
) -> Tensor:
    """The slot hybrid over a whole sequence (prefill), in segments of ``interval``
    (default ``window``) tokens between decisions; see the module docstring.

    ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``, raw (``params.scale`` applies; build
    ``params`` with ``fm.prepare``), ``linear_factor``: None, ``()`` or ``(H,)``.
    Returns ``(B, H, L, dv)``. ``key_padding_mask`` must be None (refused otherwise).
    ``compiled``: as :func:`favor_slots_step` (decisions on a full cache compiled).

    Equivalent to ``slots_reference(...)[0]``.
    """
    _check_inputs(q, k, v, fm, key_padding_mask)
    return favor_slots_step(
        q, k, v, fm, params, None, window=window, slots=slots, sinks=sinks,
        interval=interval, rule=rule, linear_factor=linear_factor, decay=decay,
        far_q=far_q, far_k=far_k, compiled=compiled,
    )[0]  # fmt: skip
