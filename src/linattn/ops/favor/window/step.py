"""Causal hybrid decoding (:func:`favor_window_step`): the state carries the linear state
of the keys older than the window, the ring of the last ``min(w, t)`` tokens and, with
sinks, the sinks that have left the window; stepping equals the parallel causal form.

* :func:`favor_window_step`: the entry; one new token takes :func:`favor_window_step_one`
  (the band over the ring, the sink slots and ``phi(q) S``, a handful of tensor ops),
  longer pieces :func:`favor_window_step_general` (the band by ``unfold``, the far part
  by the chunked causal scan), the plain reference of the one-token step;
* :func:`compiled_step_one`: :func:`favor_window_step_one` through ``torch.compile``
  (``compiled=True``): the same math in a few fused kernels, for decoding loops where
  the one-token step's many small tensor ops cost more than their arithmetic;
* :func:`window_final_state`: the state after a whole prompt, built from its keys and
  values alone (the far sums in one product, the ring and the sink slots gathered), so
  that a prefill runs the parallel hybrid and still hands its state on.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ....features import FeatureMap, FeatureParams
from ..causal import initial_state
from ..common import builds_grad, graph_captured, ones_col
from .hybrid import combine, factor_shape
from .naive import band_attention, far_left
from .sinks import gather_slots, sink_attention, sink_slots, step_sinks


def favor_window_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    window: int,
    state: tuple[Tensor, ...],
    linear_factor: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    sinks: int = 0,
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
    far_ring: Tensor | None = None,
    compiled: bool = False,
    kv_groups: int = 1,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Causal hybrid decoding: consume ``n`` new tokens after ``state``.

    One token (``n == 1``, the decoding loop) takes :func:`favor_window_step_one`, more
    take :func:`favor_window_step_general`; both compute the same (up to rounding; the
    contents of empty sink slots may differ, they are never read).

    Shapes: ``q, k: (B, H, n, d)``, ``v: (B, H, n, dv)``, ``key_padding_mask: (B, n)``;
    ``state = (S: (B, H, M, dv + 1), c: (B, H), keys: (B, H, r, d), values:
    (B, H, r, dv), padding: (B, r) bool)``: the linear state of every key older than the
    window and the last ``r = min(w, tokens so far)`` keys/values (padding True for
    empty slots); the new ring has ``min(w, r + n)`` slots. With
    ``sinks = s > 0`` four more: ``sink_keys: (B, H, s', d)``, ``sink_values: (B, H, s',
    dv)``, ``sink_padding: (B, s')`` bool (True = empty slot), the sinks that have left
    the window in ``s' = min(s, tokens that have left it)`` slots (``S`` never holds a
    sink), and ``seen: (B,)`` long, the real keys consumed so far. Returns ``(out: (B, H, n, dv), new_state)``; stepping equals
    :func:`favor_window` (causal, same ``sinks``, ``decay``, far inputs) on the
    concatenated tokens.

    ``decay`` (``ln gamma: (H,)`` or ``()``): ``S`` and ``c`` are kept in the frame of the
    next query (``S exp(c)`` sums ``gamma^(t - j)`` times key ``j``'s term for the next
    position ``t``): a key enters with ``gamma^w`` (it leaves the window ``w`` tokens
    before its query), and ``c`` falls by ``-ln gamma`` per token consumed. ``far_q,
    far_k: (B, H, n, d)``: the far part's own queries and keys (see
    :func:`~.hybrid.favor_window`); then ``far_ring: (B, H, r, d)`` holds the ring's far
    keys (empty before the first token) and the new state has the new ``far_ring``
    appended as its last entry.

    ``compiled``: one token after a full ring (and full sink slots) takes
    :func:`compiled_step_one` (the same outputs up to rounding; the first call compiles,
    seconds); other steps, a graph being captured or a gradient to build take the eager
    forms.

    ``kv_groups = g > 1`` (grouped-query attention): ``k, v, far_k`` come repeated to the
    ``H`` query heads (head ``h`` is key/value head ``h // g``), and the state's ring,
    far ring and sink slots keep each key/value head once: ``(B, H / g, r, d)``, ``g``
    times less memory; ``S`` and ``c`` stay per query head (the feature map may differ
    per head). The one-token step scores the ``g`` query heads of a key/value head
    against its ring in one product.
    """
    if (far_k is None) != (far_ring is None) or (far_q is None) != (far_k is None):
        raise ValueError("far_q, far_k and far_ring go together (all or none)")
    if q.shape[-2] != 1:
        step = favor_window_step_general
    elif compiled and _steady(state, window, sinks, (q, k, v, far_q, far_k)):
        step = compiled_step_one()
    else:
        step = favor_window_step_one
    return step(
        q,
        k,
        v,
        fm,
        params,
        window=window,
        state=state,
        linear_factor=linear_factor,
        key_padding_mask=key_padding_mask,
        sinks=sinks,
        decay=decay,
        far_q=far_q,
        far_k=far_k,
        far_ring=far_ring,
        kv_groups=kv_groups,
    )


@functools.cache
def compiled_step_one():
    """:func:`favor_window_step_one` through ``torch.compile`` (made once, on first use;
    shapes marked dynamic after a first recompilation, e.g. another batch size). Its
    callers take it only in the steady state (:func:`_steady`), where every call of a
    decoding loop has the same shapes, so that it compiles once, not once per ring
    length."""
    return torch.compile(favor_window_step_one, dynamic=None)


def _steady(state: tuple[Tensor, ...], window: int, sinks: int, inputs: tuple) -> bool:
    """Whether a one-token step may take the compiled form: the ring holds ``window``
    tokens and the sink slots ``sinks`` (shapes that no longer change), no graph is being
    captured (an outer ``torch.compile`` traces the eager form itself) and no gradient is
    to be built."""
    if state[2].shape[-2] != window or (sinks and state[5].shape[-2] != sinks):
        return False
    if graph_captured():
        return False
    return not builds_grad(*inputs, *state)


def _decay_shape(decay: Tensor, like: Tensor) -> Tensor:
    # ln gamma as (H, 1) (or a 0-d tensor) for (B, H, ...) sums; like's dtype.
    d = decay.to(like.dtype)
    return d.reshape(-1, 1) if d.dim() else d


def favor_window_step_general(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    window: int,
    state: tuple[Tensor, ...],
    linear_factor: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    sinks: int = 0,
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
    far_ring: Tensor | None = None,
    kv_groups: int = 1,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """:func:`favor_window_step` for any ``n >= 1`` new tokens (shapes there): the band by
    :func:`~.naive.band_attention`, the sinks by :func:`~.sinks.step_sinks`, the far part
    by the chunked causal scan (:func:`~.naive.far_left`) with the state carried in.
    ``kv_groups > 1``: the grouped state's ring and sink slots are repeated to the query
    heads for the step and the new ones kept once per key/value head again."""
    if kv_groups > 1:
        state, far_ring = _repeat_heads(state, far_ring, kv_groups, sinks)
    kv, stab, wk, wv, wpad = state[:5]
    n = q.shape[-2]
    # The ring holds the last min(w, tokens so far) tokens: it is not full (ring < w)
    # until w tokens have been consumed, and never larger than what can be seen.
    ring = wk.shape[-2]
    pad = key_padding_mask
    if pad is None:
        pad = torch.zeros(q.shape[0], n, dtype=torch.bool, device=q.device)
    kc, vc = torch.cat([wk, k], dim=-2), torch.cat([wv, v], dim=-2)
    padc = torch.cat([wpad, pad], dim=-1)
    keep = ~padc
    near = band_attention(q, kc, vc, keep, window, True, params.scale, q_offset=ring)
    parts = [near]
    keep_far = keep
    if sinks:
        keep_far, part, sink_state = step_sinks(
            q, kc, vc, keep, state[5:9], n, sinks, params.scale, window
        )
        parts.append(part)
    # Query a sits at position ring + a of kc; its far keys are j <= ring + a - w.
    fkc = kc if far_k is None else torch.cat([far_ring, far_k], dim=-2)
    kb = qb = None
    if decay is not None:
        # Positions relative to the first new query (the state's frame).
        ld = _decay_shape(decay, q)
        qb = ld * torch.arange(n, device=q.device, dtype=q.dtype)
        kb = -ld * (torch.arange(ring + n, device=q.device, dtype=q.dtype) - ring)
    nd, g, kv, stab = far_left(
        q if far_q is None else far_q,
        fkc,
        vc,
        keep_far.to(q.dtype),
        fm,
        params,
        max(ring - window, -n),
        64,
        initial=(kv, stab),
        key_bias=kb,
        query_bias=qb,
    )
    if decay is not None:
        # The next query sits n places after the first new one.
        stab = stab + n * ld.reshape(-1)
    lf = factor_shape(linear_factor)
    if lf is not None:
        nd = nd * lf
    parts.append((nd, g))
    out = combine(parts, fm.positive_features)
    keep_from = max(0, ring + n - window)
    new = (kv, stab, kc[..., keep_from:, :], vc[..., keep_from:, :], padc[:, keep_from:])
    if keep_from:
        # Copies of the ring, not views of the long kc (which would stay alive with them).
        new = (kv, stab, *(t.clone() for t in new[2:]))
    if sinks:
        new = new + sink_state
    if far_k is not None:
        new = (*new, fkc[..., keep_from:, :].clone() if keep_from else fkc)
    if kv_groups > 1:
        new = _group_heads(new, kv_groups, sinks, far_k is not None)
    return out, new


def _head_fields(sinks: int, far: bool, count: int) -> tuple[int, ...]:
    """Indices of a window state's fields that have a key/value head axis: the ring's
    keys and values, the sink slots' keys and values, the far ring (the last of
    ``count`` fields)."""
    return (2, 3) + ((5, 6) if sinks else ()) + ((count - 1,) if far else ())


def _repeat_heads(
    state: tuple[Tensor, ...], far_ring: Tensor | None, groups: int, sinks: int
) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """A grouped state's per-key/value-head fields (``(B, H / g, r, d)``) repeated to
    the ``H`` query heads (head ``h`` from ``h // g``), and the far ring likewise."""
    fields = list(state)
    for i in _head_fields(sinks, False, len(fields)):
        fields[i] = fields[i].repeat_interleave(groups, dim=1)
    if far_ring is not None:
        far_ring = far_ring.repeat_interleave(groups, dim=1)
    return tuple(fields), far_ring


def _group_heads(
    state: tuple[Tensor, ...], groups: int, sinks: int, far: bool
) -> tuple[Tensor, ...]:
    """The inverse of :func:`_repeat_heads` on a new state (whose far ring, with
    ``far``, is its last field): one copy per key/value head, contiguous (not a view
    of the repeated tensor)."""
    fields = list(state)
    for i in _head_fields(sinks, far, len(fields)):
        fields[i] = fields[i][:, ::groups].contiguous()
    return tuple(fields)


def favor_window_step_one(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    window: int,
    state: tuple[Tensor, ...],
    linear_factor: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    sinks: int = 0,
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
    far_ring: Tensor | None = None,
    kv_groups: int = 1,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """:func:`favor_window_step` for one new token (``n == 1``; shapes there), in a handful
    of tensor ops: the query sits at position ``r`` (the ring's length) of ``[ring, new]``;
    its band is the last ``min(w, r + 1)`` of those slots, the key at slot ``r - w`` (once
    the ring is full) leaves the window before the query reads the state: into a sink
    slot if it is one of the first ``sinks`` real keys, else into ``S``; then
    ``phi(q) S`` is the far part. Equals :func:`favor_window_step_general` (its plain
    reference) up to rounding. ``kv_groups = g > 1``: the ring and sink slots hold
    ``H / g`` key/value heads; the exact part scores each one's ``g`` query heads as
    ``g`` rows of one product, and the leaving key is repeated to the query heads for
    ``S``."""
    kv, stab, wk, wv, wpad = state[:5]
    ring = wk.shape[-2]
    bsz, heads = q.shape[:2]
    groups = kv_groups
    if groups > 1:
        # The new token's key and value once per key/value head (they come repeated).
        k, v = k[:, ::groups], v[:, ::groups]
        far_k = None if far_k is None else far_k[:, ::groups]
    pad = key_padding_mask
    if pad is None:
        pad = torch.zeros(bsz, 1, dtype=torch.bool, device=q.device)
    kc, vc = torch.cat([wk, k], dim=-2), torch.cat([wv, v], dim=-2)
    fkc = kc if far_k is None else torch.cat([far_ring, far_k], dim=-2)
    padc = torch.cat([wpad, pad], dim=-1)
    keep = ~padc  # [B, r + 1]
    # The band and the new ring: the last min(w, r + 1) slots (none for w = 0).
    lo = max(0, ring + 1 - window)
    sink_state = ()
    leave = ring - window
    if leave >= 0:
        kl, vl = kc[..., leave : leave + 1, :], vc[..., leave : leave + 1, :]
        enters = keep[:, leave]  # [B]
        if sinks:
            sk, sv, spad, seen = state[5:9]
            if sk.shape[-2] < sinks:
                # The slots grow with the tokens that leave the window (up to `sinks`):
                # one more for this one.
                sk, sv = F.pad(sk, (0, 0, 0, 1)), F.pad(sv, (0, 0, 0, 1))
                spad = F.pad(spad, (0, 1), value=True)
            # Real keys before the leaving one: all consumed, less those still after it.
            rank = seen - keep[:, leave:ring].sum(-1)
            is_sink = enters & (rank < sinks)
            enters = enters & ~is_sink
            # Sinks leave in order: the r-th goes to slot r (the first empty one).
            slot = is_sink[:, None] & (
                torch.arange(sk.shape[-2], device=q.device)[None, :] == rank[:, None]
            )  # [B, s']
            sel = slot[:, None, :, None]
            sink_state = (torch.where(sel, kl, sk), torch.where(sel, vl, sv), spad & ~slot)
        # The leaving key is w places before the query: gamma^w under a decay.
        bias = None if decay is None else window * _decay_shape(decay, q)
        fkl = fkc[..., leave : leave + 1, :]
        if groups > 1:
            # S is per query head: the leaving key and value repeated to them.
            fkl, vl = fkl.repeat_interleave(groups, dim=1), vl.repeat_interleave(groups, dim=1)
        kv, stab = absorb_key(kv, stab, fkl, vl, enters, fm, params, bias=bias)
    elif sinks:
        sink_state = tuple(state[5:8])
    # The exact part: the sink slots (all outside the window) and the band, in one row of
    # scores (they are disjoint).
    ek, ev, ekeep = kc[..., lo:, :], vc[..., lo:, :], keep[:, lo:]
    if sinks:
        sk, sv, spad = sink_state
        ek, ev = torch.cat([sk, ek], dim=-2), torch.cat([sv, ev], dim=-2)
        ekeep = torch.cat([~spad, ekeep], dim=-1)
        sink_state = (*sink_state, state[8] + (~pad[:, 0]).long())
    parts = []
    if ek.shape[-2]:
        if groups == 1:
            parts.append(sink_attention(q, ek, ev, ekeep[:, None, None, :], params.scale))
        else:
            # A key/value head's g query heads as g query rows: (B, H / g, g, d).
            qg = q.reshape(bsz, heads // groups, groups, q.shape[-1])
            nd_e, mx_e = sink_attention(qg, ek, ev, ekeep[:, None, None, :], params.scale)
            parts.append((nd_e.reshape(bsz, heads, 1, -1), mx_e.reshape(bsz, heads, 1)))
    # The far part: phi(q) S, with S's stabilizer and the map's constant.
    fq, rq = fm.stabilized_query(q if far_q is None else far_q, params)
    nd = fq @ kv
    lc = fm.log_const(params)
    if isinstance(lc, Tensor):
        lc = lc.unsqueeze(-1)
    g = stab.unsqueeze(-1) + rq + 2 * lc
    lf = factor_shape(linear_factor)
    if lf is not None:
        nd = nd * lf
    parts.append((nd, g))
    out = combine(parts, fm.positive_features)
    if decay is not None:
        # The next query is one place on: every far key one step further away.
        stab = stab + _decay_shape(decay, q).reshape(-1)
    new = (kv, stab, kc[..., lo:, :], vc[..., lo:, :], padc[:, lo:], *sink_state)
    if far_k is not None:
        new = (*new, fkc[..., lo:, :])
    return out, new


def absorb_key(
    kv: Tensor,
    stab: Tensor,
    k: Tensor,
    v: Tensor,
    enters: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The causal state ``(S: (B, H, M, dv + 1), c: (B, H))`` after one more key ``k: (B,
    H, 1, d)`` with value ``v: (B, H, 1, dv)``, counted where ``enters: (B,)`` is True:
    ``c' = max(c, r_k)``, ``S' = exp(c - c') S + exp(r_k - c') F_k^T [v, 1]`` (every
    exponent <= 0, as the chunked scan's). ``bias``: a log-weight added to ``r_k``
    (``(H, 1)`` or ``()``; the decay's ``w ln gamma``), or None."""
    fk, r = fm.stabilized(k, params, is_query=False)  # [B, H, 1, M], [B, H, 1]
    if bias is not None:
        r = r + bias
    r = r.masked_fill(~enters[:, None, None], -math.inf)
    new_stab = torch.maximum(stab, r[..., 0].detach())
    # [B, H, 1, dv + 1]: the key's weight exp(r - c') on [v, 1].
    wv = ones_col(v) * torch.exp(r - new_stab.unsqueeze(-1)).unsqueeze(-1)
    contrib = fk.transpose(-2, -1) @ wv  # [B, H, M, dv + 1]
    return torch.addcmul(contrib, kv, torch.exp(stab - new_stab)[..., None, None]), new_stab


def window_final_state(
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    window: int,
    key_padding_mask: Tensor | None = None,
    sinks: int = 0,
    decay: Tensor | None = None,
    far_k: Tensor | None = None,
    kv_groups: int = 1,
    far_sums: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, ...]:
    """The decoding state after the ``L`` tokens ``k: (B, H, L, d)``, ``v: (B, H, L, dv)``
    (``key_padding_mask: (B, L)``, True = padding), as :func:`favor_window_step` leaves
    it after consuming them (up to rounding, and the contents of empty sink slots):
    ``(S, c)`` the far sums of the real non-sink keys older than the last ``r = min(w,
    L)`` (one ``O(L M dv)`` product under their maximum log-scale), the ring of those
    last ``r`` keys, values and padding, and with ``sinks`` the sink slots (the first
    ``sinks`` real keys older than the ring; empty slots zero) and ``seen`` (real keys
    per sequence). The queries play no part: a prefill runs the parallel hybrid for its
    outputs and takes the state from here. ``decay``, ``far_k``: as
    :func:`favor_window_step` (then the ring's far keys are appended as the last entry).
    ``kv_groups = g > 1``: ``k, v, far_k`` come repeated to the query heads (grouped-query
    attention); the ring, far ring and sink slots keep every ``g``-th head (one per
    key/value head), as :func:`favor_window_step` with ``kv_groups``. ``far_sums``: ``(S,
    c)`` computed already (:func:`~.hybrid.favor_window` with ``final_state=True``, from
    the parallel pass's own features), then only the ring and the sink slots are
    gathered here."""
    bsz, heads, length, d = k.shape
    dv = v.shape[-1]
    cut = length - min(window, length)
    pad = key_padding_mask
    if pad is None:
        pad = torch.zeros(bsz, length, dtype=torch.bool, device=k.device)
    keep = ~pad
    far_keep = keep[:, :cut]
    sink_state = ()
    if sinks:
        is_sink, idx, valid = sink_slots(keep, bsz, length, sinks, k.device)
        # One slot per token that left the window, up to `sinks` (the decoding step's
        # count); the r-th real key sits at position >= r, so the sinks that left are
        # among the first min(sinks, cut) slots.
        idx, valid = idx[:, : min(sinks, cut)], valid[:, : min(sinks, cut)]
        left = valid & (idx < cut)  # [B, s']
        sel = left[:, None, :, None]
        sk = gather_slots(k[:, ::kv_groups], idx).masked_fill(~sel, 0)
        sv = gather_slots(v[:, ::kv_groups], idx).masked_fill(~sel, 0)
        sink_state = (sk, sv, ~left, keep.long().sum(-1))
        far_keep = far_keep & ~is_sink[:, :cut]
    if far_sums is not None:
        kv, stab = far_sums
        cut_sums = False
    else:
        m = fm.feature_dim(params.weight, d)
        kv, stab = initial_state((bsz, heads), m, dv, dtype=k.dtype, device=k.device)
        cut_sums = bool(cut)
    fks = k if far_k is None else far_k
    if cut_sums:
        fk, r = fm.stabilized(fks[..., :cut, :], params, is_query=False)  # [B, H, cut, M]
        if decay is not None:
            # gamma^(L - j): the next query sits at position L.
            dist = length - torch.arange(cut, device=k.device, dtype=k.dtype)
            r = r + _decay_shape(decay, k) * dist
        r = r.masked_fill(~far_keep[:, None, :], -math.inf)
        stab = torch.maximum(stab, r.detach().amax(-1))
        w = torch.exp(r - stab.unsqueeze(-1)).unsqueeze(-1)
        kv = fk.transpose(-2, -1) @ (ones_col(v[..., :cut, :]) * w)
    # Copies, not views: a view would keep the whole prompt's keys and values alive in
    # the state (a FavorCache after an 8k prefill: gigabytes behind its 17 MB).
    g = kv_groups
    ring = (k[:, ::g, cut:].clone(), v[:, ::g, cut:].clone(), pad[:, cut:].clone())
    if far_k is None:
        return (kv, stab, *ring, *sink_state)
    return (kv, stab, *ring, *sink_state, far_k[:, ::g, cut:].clone())
