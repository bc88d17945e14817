"""The stateful causal path (a state carried in and out), packed sequences
(``cu_seqlens``) and the state helpers behind :mod:`linattn.functional`.

Shape legend as :mod:`linattn.functional`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_cu_seqlens, check_scale
from ._dtype import compute_dtype
from ._favor_checks import (
    _as_4d,
    _check_causal_kernel,
    _check_decay,
    _check_far_inputs,
    _check_linear_factor,
    _check_projection,
    _check_sinks,
    _check_state,
    _check_window,
    _checked_inputs,
    _expand_kv_groups,
    _far_4d,
    _prepare,
)
from .features import Kernel, get_feature_map
from .ops.favor import (
    FavorState,
    empty_window_state,
    favor_causal,
    favor_recurrent_step,
    favor_window,
)
from .ops.favor.causal import initial_state
from .ops.favor.common import builds_grad
from .ops.favor.window.step import window_final_state


def _favor_stateful(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor | None,
    state: FavorState | None,
    *,
    kernel: Kernel,
    key_padding_mask: Tensor | None,
    scale: float | None,
    window: int | None,
    linear_factor: Tensor | None,
    chunk_size: int,
    sinks: int,
    state_name: str = "initial_state",
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
    compiled: bool = False,
    kv_groups: int = 1,
) -> tuple[Tensor, FavorState]:
    """The causal forms with a state carried in and out (``favor_attention`` with
    ``initial_state`` / ``output_final_state``, and ``favor_recurrent``).

    Shapes: ``q, k: (..., L, d)``, ``v: (..., L, dv)``; the state's ``(B, H)`` are q's
    batch and folded heads. Returns ``(out: (..., L, dv)`` in q's dtype, the state after
    the last token ``)``. Plain causal: the chunked scan carries the state
    (:func:`favor_causal`); window or sinks: the decoding step
    (:func:`favor_recurrent_step`). ``decay``, ``far_q``, ``far_k``: as
    :func:`~linattn.favor_attention` (hybrid only; checked there). ``compiled``: one-token
    hybrid steps through the compiled step (``favor_recurrent(compile_step=True)``).
    ``kv_groups = g``: ``k, v, far_k`` were repeated from ``H / g`` key/value heads
    (:func:`~._favor_checks._expand_kv_groups`; hybrid only): the state's ring and sink
    slots keep those.
    """
    hybrid = window is not None or bool(sinks)
    far_q, far_k = _check_far_inputs(far_q, far_k, q, k, hybrid)
    if (far_q is None) != (far_k is None):
        raise ValueError(
            "far_q and far_k go together with a state: the state keeps the far keys of its "
            "window ring for the far queries to come"
        )
    if state is not None and q.shape[-2] == 0:
        if decay is not None:
            _check_decay(decay, _as_4d(q), True, hybrid)
        return _empty_piece(
            q,
            v,
            projection,
            state,
            kernel,
            scale,
            window,
            sinks,
            linear_factor,
            state_name,
            far=far_k is not None,
            kv_groups=kv_groups,
        )
    fm, params, q4, k4, v4, mask = _prepare(
        q, k, v, projection, kernel, True, key_padding_mask, scale
    )
    window = _check_window(window, True, q, k)
    sinks = _check_sinks(sinks)
    lf = _check_linear_factor(linear_factor, q4)
    dec = _check_decay(decay, q4, True, hybrid)
    fq4, fk4 = _far_4d(far_q, q4.dtype, None), _far_4d(far_k, q4.dtype, mask)
    if state is not None:
        m = fm.feature_dim(params.weight, q.shape[-1])
        state = _check_state(
            state,
            m,
            q4,
            v4.shape[-1],
            window,
            sinks,
            name=state_name,
            far=fk4 is not None,
            kv_groups=kv_groups,
        )
    if window is None and not sinks:
        initial = None if state is None else (state.kv, state.stab)
        out, kv, stab = favor_causal(
            q4, k4, v4, fm, params, key_padding_mask=mask, chunk_size=chunk_size, initial=initial
        )
        new_state = FavorState(kv=kv, stab=stab)
    elif state is None and q4.shape[-2] > 1:
        # A prefill (no state before it): the parallel hybrid for the outputs and, when
        # no gradient is to be built, the state's far sums from its own features; the
        # ring and sink slots (and the far sums otherwise) from the keys and values
        # alone. The decoding step is its reference.
        grad = builds_grad(q4, k4, v4, fq4, fk4, lf, dec, params.weight)
        out = favor_window(
            q4,
            k4,
            v4,
            fm,
            params,
            window=window,
            causal=True,
            linear_factor=lf,
            key_padding_mask=mask,
            chunk_size=chunk_size,
            sinks=sinks,
            decay=dec,
            far_q=fq4,
            far_k=fk4,
            final_state=not grad,
        )
        out, sums = out if not grad else (out, None)
        fields = window_final_state(
            k4,
            v4,
            fm,
            params,
            window=0 if window is None else window,
            key_padding_mask=mask,
            sinks=sinks,
            decay=dec,
            far_k=fk4,
            kv_groups=kv_groups,
            far_sums=sums,
        )
        new_state = _state_of_fields(fields, fk4 is not None)
    else:
        out, new_state = favor_recurrent_step(
            q4,
            k4,
            v4,
            state,
            fm,
            params,
            key_padding_mask=mask,
            window=window,
            linear_factor=lf,
            sinks=sinks,
            decay=dec,
            far_q=fq4,
            far_k=fk4,
            compiled=compiled,
            kv_groups=kv_groups,
        )
    return out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype), new_state


def _state_of_fields(fields: tuple[Tensor, ...], far: bool) -> FavorState:
    """A :class:`FavorState` from :func:`window_final_state`'s fields (its far ring, with
    ``far``, the last one)."""
    if far:
        return FavorState(*fields[:-1], far_keys=fields[-1])
    return FavorState(*fields)


def _empty_piece(
    q: Tensor,
    v: Tensor,
    projection: Tensor | None,
    state: FavorState,
    kernel: Kernel,
    scale: float | None,
    window: int | None,
    sinks: int,
    linear_factor: Tensor | None,
    state_name: str,
    far: bool = False,
    kv_groups: int = 1,
) -> tuple[Tensor, FavorState]:
    """A piece of no tokens (``q: (..., 0, d)``, ``v: (..., 0, dv)``) after ``state``:
    the empty output ``(..., 0, dv)`` and the state, checked (as a piece with tokens
    checks it) and otherwise unchanged."""
    fm = get_feature_map(kernel)
    weight = _check_projection(projection, fm, q)
    check_scale(scale, q.shape[-1])
    _check_causal_kernel(fm)
    q4 = _as_4d(q).to(compute_dtype(q.dtype))
    window = _check_window(window, True, q, q)
    sinks = _check_sinks(sinks)
    _check_linear_factor(linear_factor, q4)
    m = fm.feature_dim(weight, q.shape[-1])
    state = _check_state(
        state, m, q4, v.shape[-1], window, sinks, name=state_name, far=far, kv_groups=kv_groups
    )
    return q.new_zeros(*q.shape[:-1], v.shape[-1]), state


def _favor_state_of(
    k: Tensor,
    v: Tensor,
    projection: Tensor | None,
    *,
    kernel: Kernel,
    key_padding_mask: Tensor | None,
    scale: float | None,
    window: int | None,
    sinks: int,
    decay: Tensor | None = None,
    far_k: Tensor | None = None,
    heads: int | None = None,
) -> FavorState:
    """The window hybrid's state after the keys ``k: (B, H, L, d)`` and values ``v: (B, H,
    L, dv)`` alone (a prefill whose outputs nobody reads, e.g. a lazy cache's fold): the
    final state of ``favor_attention(q, k, v, causal=True, window=window, sinks=sinks,
    output_final_state=True)`` for any ``q``, without its O(L w) band. Window or sinks
    only; ``L >= 1``. ``decay``, ``far_k``: as :func:`~linattn.favor_attention`.
    ``heads``: the query heads ``H'`` when ``k``'s ``H`` are grouped-query key/value
    heads (``H'`` a multiple of ``H``): the state :func:`~linattn.favor_recurrent` makes
    for ``H'`` query heads and these key/value heads."""
    shape = k.shape if heads is None else (k.shape[0], heads, *k.shape[2:])
    _, k, v, far_k, groups = _expand_kv_groups(k.new_zeros(shape), k, v, far_k)
    q, k, v = _checked_inputs(k.new_zeros(k.shape), k, v, key_padding_mask)
    fm, params, q4, k4, v4, mask = _prepare(
        q, k, v, projection, kernel, True, key_padding_mask, scale
    )
    window = _check_window(window, True, q, k)
    _, far_k = _check_far_inputs(None, far_k, q, k, True)
    fk4 = _far_4d(far_k, k4.dtype, mask)
    fields = window_final_state(
        k4,
        v4,
        fm,
        params,
        window=0 if window is None else window,
        key_padding_mask=mask,
        sinks=_check_sinks(sinks),
        decay=_check_decay(decay, q4, True, True),
        far_k=fk4,
        kv_groups=groups,
    )
    return _state_of_fields(fields, fk4 is not None)


def packed_positions(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """Each token's position inside its own sequence, ``(T,)`` long, for packed
    ``cu_seqlens`` (int32 ``(N + 1,)``, see :func:`favor_attention`): ``[0, 1, .., n_0 -
    1, 0, 1, .., n_1 - 1, ...]``. ``total``: the packed length T (default
    ``cu_seqlens[-1]``, checked when given)."""
    if total is None and isinstance(cu_seqlens, Tensor) and cu_seqlens.numel():
        total = int(cu_seqlens[-1])
    device = cu_seqlens.device if isinstance(cu_seqlens, Tensor) else None
    offsets = check_cu_seqlens(cu_seqlens, total, device)
    starts = torch.tensor(offsets[:-1], device=device)
    lengths = torch.tensor(offsets, device=device).diff()
    pos = torch.arange(offsets[-1], device=device)
    return pos - starts.repeat_interleave(lengths, output_size=offsets[-1])


def _state_row(state: FavorState, i: int) -> FavorState:
    """Row ``i`` of a batched state, as a batch of one (named fields, no tuple slicing)."""
    return state._replace(**{f: t[i : i + 1] for f, t in state._asdict().items() if t is not None})


def _cat_states(states: list[FavorState]) -> FavorState:
    """States of batch 1 (or more) stacked along the batch axis. The window rings hold
    ``min(w, tokens seen)`` slots, so sequences of different lengths have rings of
    different lengths: the shorter rings are padded in front (their oldest end) with
    empty slots (``padding`` True), which the decoding step treats as keys never seen.
    The sink slots (``min(sinks, tokens that left the window)``) likewise, padded at the
    end (sinks fill their slots in order) with empty slots."""
    if states[0].keys is not None:
        ring = max(st.keys.shape[-2] for st in states)
        states = [_pad_ring(st, ring) for st in states]
    if states[0].sink_keys is not None:
        slots = max(st.sink_keys.shape[-2] for st in states)
        states = [_pad_sinks(st, slots) for st in states]
    fields = {}
    for f in FavorState._fields:
        parts = [getattr(st, f) for st in states]
        fields[f] = None if parts[0] is None else torch.cat(parts, dim=0)
    return FavorState(**fields)


def _pad_ring(state: FavorState, ring: int) -> FavorState:
    """``state`` with its window ring (``keys: (B, H, r, d)``) grown to ``ring`` slots by
    empty slots in front."""
    extra = ring - state.keys.shape[-2]
    if extra == 0:
        return state
    return state._replace(
        keys=F.pad(state.keys, (0, 0, extra, 0)),
        values=F.pad(state.values, (0, 0, extra, 0)),
        padding=F.pad(state.padding, (extra, 0), value=True),
    )


def _pad_sinks(state: FavorState, slots: int) -> FavorState:
    """``state`` with its sink slots (``sink_keys: (B, H, s', d)``) grown to ``slots`` by
    empty slots at the end."""
    extra = slots - state.sink_keys.shape[-2]
    if extra == 0:
        return state
    return state._replace(
        sink_keys=F.pad(state.sink_keys, (0, 0, 0, extra)),
        sink_values=F.pad(state.sink_values, (0, 0, 0, extra)),
        sink_padding=F.pad(state.sink_padding, (0, extra), value=True),
    )


def _empty_state(
    kernel: Kernel, projection: Tensor | None, q: Tensor, v: Tensor, window, sinks
) -> FavorState:
    """The state before any token for one sequence of packed ``q: (1, H, T, d)``."""
    fm = get_feature_map(kernel)
    heads, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
    m = fm.feature_dim(projection, d)
    cdt = compute_dtype(q.dtype)
    window = _check_window(window, True, q, q)
    sinks = _check_sinks(sinks)
    if window is None and not sinks:
        kv, stab = initial_state((1, heads), m, dv, dtype=cdt, device=q.device)
        return FavorState(kv=kv, stab=stab)
    band = 0 if window is None else window
    return empty_window_state(1, heads, m, d, dv, band, dtype=cdt, device=q.device, sinks=sinks)


def _run_packed(offsets: list[int], q: Tensor, k: Tensor, v: Tensor, run) -> Tensor:
    """``run(i, q_i, k_i, v_i) -> out_i`` on each packed sequence ``i``, the tokens
    ``c_i .. c_{i+1} - 1`` of ``q, k: (1, H, T, d)``, ``v: (1, H, T, dv)``, concatenated:
    ``(1, H, T, dv)``. A sequence of length 0 adds nothing (and is not run)."""
    outs = [
        run(i, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
        for i, (s, e) in enumerate(itertools.pairwise(offsets))
        if e > s
    ]
    if not outs:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _run_packed_favor(
    offsets: list[int],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    run,
    *,
    state: FavorState | None,
    stateful: bool,
    projection: Tensor | None,
    kernel: Kernel,
    window: int | None,
    sinks: int,
    state_name: str,
):
    """:func:`_run_packed` for FAVOR+ with one state row per sequence:
    ``run(q_i, k_i, v_i, state_i) -> (out_i, state_i)`` (``state_i`` None when not
    ``stateful``); ``state``: None or batch ``N``. Returns ``out`` (and, when
    ``stateful``, the states stacked: ``(out, state)``). A sequence of length 0 keeps its
    state (the empty state when none was given)."""
    n = len(offsets) - 1
    if state is not None:
        # Checked whole (one row per sequence, batch N) before any sequence runs, so that
        # the rows of empty sequences, which pass through, are checked and cast too.
        fm = get_feature_map(kernel)
        m = fm.feature_dim(_check_projection(projection, fm, q), q.shape[-1])
        rows = q.new_empty(n, q.shape[1], 0, q.shape[-1])
        state = _check_state(
            state,
            m,
            rows,
            v.shape[-1],
            _check_window(window, True, q, q),
            _check_sinks(sinks),
            name=state_name,
            dtype=compute_dtype(q.dtype),
        )
    rows = [None if state is None else _state_row(state, i) for i in range(n)]

    def one(i, qs, ks, vs):
        out, rows[i] = run(qs, ks, vs, rows[i])
        return out

    out = _run_packed(offsets, q, k, v, one)
    if not stateful:
        return out
    for i, row in enumerate(rows):
        if row is None:
            rows[i] = _empty_state(kernel, projection, q, v, window, sinks)
    return out, _cat_states(rows)
