"""Causal window hybrid with a budget of exact key-value slots kept by a rule (LoLA-style).

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``d`` head_dim, ``dv`` value dim,
``M`` features per token, ``w`` window, ``s`` sinks, ``G`` slots (cache budget), ``I``
decision interval. ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``.

Semantics (causal only; no ``key_padding_mask``)
-------------------------------------------------
Every earlier key ``j <= i`` of query ``i`` is in exactly one of five sets, and query
``i`` scores it with the exact ``e^{s_ij}`` (``s_ij = scale q_i.k_j``) if it is in one of
the first four, and with ``lambda_h phi(q_i).phi(k_j)`` (``phi`` the kernel's feature
map, ``lambda_h`` the optional per-head ``linear_factor``) if it is in the fifth, all
under one normalizer::

    out_i = (sum_{exact} e^{s_ij} v_j + lambda sum_{far} phi_i.phi_j v_j)
            / (sum_{exact} e^{s_ij} + lambda sum_{far} phi_i.phi_j)

* **sinks**: ``j < s`` (the first ``s`` keys), always exact, never cached or evicted;
* **window**: ``i - w < j <= i``, ``j >= s``;
* **pending**: keys that have left the window but have not been decided yet;
* **cache**: at most ``G`` keys per (batch, head), chosen by the rule (heads choose
  independently);
* **far**: the evicted keys, summed in the linear state ``(S, z) = sum_j (phi(k_j)
  v_j^T, phi(k_j))``.

Time runs over the queries. Before query ``i`` the key ``j = i - w`` leaves the window;
if ``j >= s`` it joins the pending group. When ``(j - s + 1) % I == 0`` (the group holds
``I`` keys) the rule decides, still before query ``i``: the candidates are the cached
keys (in cache order) followed by the pending keys (oldest first); if there are at most
``G`` of them all are cached, else the ``G`` with the largest score are cached (ties: the
earlier candidate wins; the kept ones stay in candidate order) and the others are
evicted into ``(S, z)``. The pending group is then empty. ``I = 1`` decides on every key
as it leaves the window (no pending keys ever; with ``G = 0`` this is exactly the
causal window hybrid of ``favor_attention(..., causal=True, window=w, sinks=s)``).
``I > 1`` batches the decisions (as LoLA does with its chunks): a key then stays exact
for up to ``I - 1`` tokens after it leaves the window, so query ``i`` scores between
``w`` and ``w + I - 1`` recent keys exactly (compare slot variants against ``G = 0`` at
the same ``I``).

Rules (the score, larger = kept):

* ``"error"`` (LoLA's self-recall error): ``||v_j - S^T phi(k_j) / z^T phi(k_j)||``,
  how badly the current far state (before this decision's evictions) reads key ``j``'s
  value back; ``0`` read-out when ``z^T phi(k_j) == 0`` (empty state). Recomputed for the
  cached keys at every decision (the state changes).
* ``"mass"`` (H2O-style heavy hitters): the attention probability the key has received
  so far, summed over every query that scored it exactly (in the window, pending or
  cached), ``p_ij = e^{s_ij} / den_i``.

The scores are data, not parameters: decisions carry no gradient; the outputs are
differentiable in ``q``, ``k``, ``v`` (and the projection / ``linear_factor``) for the
decisions made.

State per (batch, head), O(1) in the length: sinks ``s``, the window and pending keys
(at most ``w + I - 1``), the cache ``G``, ``(S, z)`` ``(M, dv + 1)`` and their scores.
Time O(L (w + I + G + s) d + L M dv) plus ``O((G + I) M dv)`` per decision for
``"error"``.

Forms
-----
* :func:`slots_reference`: token by token, plain sets and the exact feature map
  (``fm.exact``); the oracle (float64, small sizes).
* :func:`favor_slots`: the sequence in segments between decisions (``I`` tokens; the
  default ``I = w`` gives chunks of the window size): the exact part of a segment is one
  masked product against ``[sinks, cache, window + pending + the segment's keys]``, the
  far part one product against the fixed state; stabilized (per-token feature
  log-scales, a running maximum for the state), float32-safe.
* :func:`favor_slots_step`: the same machinery from a :class:`SlotState`, for decoding
  (any number of new tokens; token by token equals one call).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ...features import FeatureMap, FeatureParams

__all__ = [
    "RULES",
    "SlotState",
    "empty_slot_state",
    "favor_slots",
    "favor_slots_step",
    "slots_reference",
]

Rule = Literal["error", "mass"]
RULES = ("error", "mass")


class SlotState(NamedTuple):
    """Decoding state of :func:`favor_slots_step` (one per layer).

    ``pos``: tokens consumed. ``sink_k: (B, H, s', d)``, ``sink_v: (B, H, s', dv)``, the
    sinks seen (``s' <= s``). ``local_k: (B, H, n, d)``, ``local_v``, ``local_score:
    (B, H, n)``: the undecided keys (window + pending), positions ``lo .. pos - 1`` with
    ``lo = pos - n``. ``cache_k: (B, H, g, d)``, ``cache_v``, ``cache_score: (B, H, g)``,
    ``cache_pos: (B, H, g)`` long (``g <= G``). ``kv: (B, H, M, dv + 1)`` the far state
    ``sum_j F_j^T exp(r_j - stab) [v_j, 1]`` under ``stab: (B, H)`` (with a ``decay``,
    in the frame of the next query ``pos``: key ``j`` weighs ``gamma^(pos - j)``).
    With far inputs (``far_q``/``far_k``): ``local_fk: (B, H, n, d)`` and ``cache_fk:
    (B, H, g, d)``, the far keys of the undecided and the cached keys (None otherwise).
    """

    pos: int
    sink_k: Tensor
    sink_v: Tensor
    local_k: Tensor
    local_v: Tensor
    local_score: Tensor
    cache_k: Tensor
    cache_v: Tensor
    cache_score: Tensor
    cache_pos: Tensor
    kv: Tensor
    stab: Tensor
    local_fk: Tensor | None = None
    cache_fk: Tensor | None = None


def _check_config(window: object, sinks: object, slots: object, interval: object, rule: object):
    for name, val, low in (("window", window, 1), ("sinks", sinks, 0), ("slots", slots, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, int) or interval < 1
    ):
        raise ValueError(f"interval must be None or an int >= 1, got {interval!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, fm: FeatureMap, key_padding_mask) -> None:
    if key_padding_mask is not None:
        raise ValueError(
            "key_padding_mask is not supported by the slot hybrid (slots are chosen per "
            "position); pass unpadded sequences of one length"
        )
    if not fm.causal_ok:
        raise ValueError(f"kernel {fm.name!r} depends on the whole sequence; it cannot be causal")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, L, d) tensor, got {getattr(x, 'shape', x)}")
    if q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            "expected q and k of one shape (B, H, L, d) and v (B, H, L, dv); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def _lf(linear_factor: Tensor | None, like: Tensor) -> Tensor:
    """``(1, H, 1)`` or ``()`` factor of the far part (1 when None)."""
    if linear_factor is None:
        return like.new_ones(())
    if linear_factor.dim():
        return linear_factor.to(like.dtype).reshape(1, -1, 1)
    return linear_factor.to(like.dtype)


# ----------------------------------------------------------------------------- reference


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
                                if rule == "mass":
                                    score = [mass[c] for c in cands]
                                else:
                                    score = []
                                    for c in cands:
                                        read = torch.zeros_like(v[b, h, c])
                                        if far:
                                            a_c = (fk[b, h, far] @ fk[b, h, c]) * gam(i, far)
                                            z = a_c.sum()
                                            if z != 0:
                                                read = a_c @ v[b, h, far] / z
                                        score.append(float((v[b, h, c] - read).norm()))
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


# ----------------------------------------------------------------------------- fast form


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


def tie_safe(score: Tensor) -> Tensor:
    """``score: (..., n)`` rounded to a millionth of its row's maximum: keys whose scores
    differ only by rounding (identical keys and values, as repeated tokens give once the
    far part scores un-rotated keys) tie, and a tie goes to the earlier candidate in every
    form alike (the prefill, decoding token by token, the reference), whose sums round
    differently."""
    top = score.amax(-1, keepdim=True).clamp_min(torch.finfo(score.dtype).tiny)
    return torch.round(score / top * 1e6)


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
            score = cscore if rule == "mass" else _read_error(cfk, cv, kv, fm, params)
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
    nc = st.cache_k.shape[2]
    # [n, s' + g + nl]: cached keys are older than every query of the segment
    visible = torch.cat([sink_pos <= qi, qi.new_ones(n, nc, dtype=torch.bool), local_pos <= qi], 1)
    keys = torch.cat([sink_k, st.cache_k, local_k], 2)
    vals = torch.cat([sink_v, st.cache_v, local_v], 2)
    s = params.scale * (q @ keys.transpose(-2, -1))  # [B, H, n, K]
    s = s.masked_fill(~visible, float("-inf"))
    g_ex = s.detach().amax(-1)  # [B, H, n]; the query's own key is always visible
    e = torch.exp(s - g_ex.unsqueeze(-1))
    vv = torch.cat([vals, torch.ones_like(vals[..., :1])], -1)
    nd_ex = e @ vv  # [B, H, n, dv + 1]
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
            p = e * (torch.exp(g_ex - top).unsqueeze(-1) / den)  # [B, H, n, K]
            ks = sink_k.shape[2]
            cache_score = cache_score + p[..., ks : ks + nc].sum(2)
            local_score = local_score + p[..., ks + nc :].sum(2)
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
) -> tuple[Tensor, SlotState]:
    """``n`` new tokens ``q, k: (B, H, n, d)``, ``v: (B, H, n, dv)`` after ``state``
    (None: the start). Returns ``(out: (B, H, n, dv), state)``. Calling it token by
    token, in blocks or once over the sequence gives the same outputs up to rounding.
    The configuration (``window``, ``slots``, ``sinks``, ``interval``, ``rule``,
    ``decay``, far inputs or not) must be the same at every call of one sequence.
    ``decay`` (``ln gamma: (H,)`` or ``()``), ``far_q``/``far_k`` (shapes of ``q``/``k``,
    both or neither): as :func:`linattn.favor_attention`'s, for the evicted keys' scores
    (the error rule reads the state back through the far keys too)."""
    _check_config(window, sinks, slots, interval, rule)
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
            state = _decide(state, step, fm, params, slots, rule, ld)
        nxt = first if p < first else p + step - (p - first) % step
        j = min(n, i + nxt - p)
        out, state = _segment(
            state, q[:, :, i:j], k[:, :, i:j], v[:, :, i:j], fm, params, sinks, lf,
            rule == "mass",
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
) -> Tensor:
    """The slot hybrid over a whole sequence (prefill), in segments of ``interval``
    (default ``window``) tokens between decisions; see the module docstring.

    ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``, raw (``params.scale`` applies; build
    ``params`` with ``fm.prepare``), ``linear_factor``: None, ``()`` or ``(H,)``.
    Returns ``(B, H, L, dv)``. ``key_padding_mask`` must be None (refused otherwise).

    Equivalent to ``slots_reference(...)[0]``.
    """
    _check_inputs(q, k, v, fm, key_padding_mask)
    return favor_slots_step(
        q, k, v, fm, params, None, window=window, slots=slots, sinks=sinks,
        interval=interval, rule=rule, linear_factor=linear_factor, decay=decay,
        far_q=far_q, far_k=far_k,
    )[0]  # fmt: skip
