"""Recurrent FAVOR decoding: an O(1) state per (batch, head), advanced a block at a time.

The state after tokens ``1..t`` is ``S = sum_j exp(r_j - c) F_j^T [v_j, 1]``
(``(M, dv + 1)``) with its stabilizer ``c = max_j r_j``; consuming one token (or a block)
costs the same whatever ``t`` is. The step is the causal scan with the state carried in,
so running it token by token reproduces :func:`favor_causal`. With a window ``w`` the
state also holds the last ``w`` keys and values (and which of them are padding), and
``S`` only the keys older than them: stepping reproduces the causal window hybrid. With
``sinks = s`` it also holds the sink keys that have left the window (``S`` never sums a
sink) and how many real keys each sequence has consumed (which tells whether a new key is
one of the first ``s``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ...features import FeatureMap, FeatureParams
from .causal import favor_causal, initial_state
from .window import favor_window_step


class FavorState(NamedTuple):
    """Causal FAVOR state.

    ``kv: (B, H, M, dv + 1)`` (the last column sums ``phi(k)``) and ``stab: (B, H)``, the
    log-scale ``kv`` is stored under (``kv * exp(stab)`` is the unstabilized sum, up to
    the feature map's constant). With a window ``w``: ``keys: (B, H, r, d)`` and
    ``values: (B, H, r, dv)``, the last ``r = min(w, t)`` tokens after ``t`` (oldest
    first: the ring never holds more than can be seen), ``padding: (B, r)`` bool (True =
    padding or empty slot), and ``kv`` sums only the keys older than those;
    None without a window. With ``sinks = s > 0`` (the window is then ``w``, or 0 for
    ``window=None``): ``sink_keys: (B, H, s', d)``, ``sink_values: (B, H, s', dv)`` and
    ``sink_padding: (B, s')`` bool (True = empty slot), the sinks (first ``s`` real keys)
    that have left the window, in ``s' = min(s, tokens that have left the window)``
    slots (they grow as the ring does: never more than can be seen, so a huge ``s``
    costs no memory), and ``seen: (B,)`` long, the real keys consumed so far; None when
    ``sinks == 0``. ``kv`` never sums a sink. With far inputs (``far_q``/``far_k`` of
    :func:`~linattn.favor_attention`): ``far_keys: (B, H, r, d)``, the far keys of the
    ring's tokens (the keys the feature map scores once they leave the window); else
    None. With a ``decay``, ``kv`` and ``stab`` are kept in the frame of the next token's
    position (see :func:`~.window.step.favor_window_step`). Grouped-query attention
    (:func:`~linattn.favor_recurrent` with ``H_kv < H`` key/value heads): ``keys``,
    ``values``, ``sink_keys``, ``sink_values`` and ``far_keys`` have ``H_kv`` heads, not
    ``H`` (``kv`` and ``stab`` keep ``H``).
    """

    kv: Tensor
    stab: Tensor
    keys: Tensor | None = None
    values: Tensor | None = None
    padding: Tensor | None = None
    sink_keys: Tensor | None = None
    sink_values: Tensor | None = None
    sink_padding: Tensor | None = None
    seen: Tensor | None = None
    far_keys: Tensor | None = None


def empty_window_state(
    bsz: int,
    heads: int,
    num_features: int,
    head_dim: int,
    dv: int,
    window: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    sinks: int = 0,
    far: bool = False,
    kv_heads: int | None = None,
) -> FavorState:
    """The state before any token, for a window of ``window`` tokens (and ``sinks`` sink
    keys; ``far``: with an empty ring of far keys; ``kv_heads``: heads of the ring and
    sink slots, default ``heads``, fewer under grouped-query attention). The ring of the window's keys starts empty and grows with the tokens consumed
    up to ``window`` slots, the sink slots with the tokens that leave the window up to
    ``sinks``: neither holds more than can be seen, so a huge ``window`` or ``sinks``
    costs no memory."""
    kv, stab = initial_state((bsz, heads), num_features, dv, dtype=dtype, device=device)
    heads = heads if kv_heads is None else kv_heads
    sink_fields = ()
    if sinks:
        sink_fields = (
            torch.zeros(bsz, heads, 0, head_dim, dtype=dtype, device=device),
            torch.zeros(bsz, heads, 0, dv, dtype=dtype, device=device),
            torch.ones(bsz, 0, dtype=torch.bool, device=device),
            torch.zeros(bsz, dtype=torch.long, device=device),
        )
    return FavorState(
        kv,
        stab,
        torch.zeros(bsz, heads, 0, head_dim, dtype=dtype, device=device),
        torch.zeros(bsz, heads, 0, dv, dtype=dtype, device=device),
        torch.ones(bsz, 0, dtype=torch.bool, device=device),
        *sink_fields,
        **(
            {"far_keys": torch.zeros(bsz, heads, 0, head_dim, dtype=dtype, device=device)}
            if far
            else {}
        ),
    )


def window_ring(state: FavorState, window: int) -> int:
    """The ring length (slots of ``state.keys``) valid for ``window``: ``window`` once the
    ring is full, fewer while every token consumed is still in it (no key has reached
    ``kv`` or a sink slot: the ring then holds exactly the tokens seen so far; padding
    that left it is invisible either way). A state whose ring is shorter than
    ``window`` after keys have left it belongs to a smaller window: ``window`` is
    returned, and the shape check fails."""
    keys = state.keys
    if not isinstance(keys, Tensor) or keys.dim() != 4 or keys.shape[-2] >= window:
        return window
    left = (state.kv != 0).any()
    if isinstance(state.sink_padding, Tensor):
        left = left | (~state.sink_padding).any()
    return window if bool(left) else keys.shape[-2]


def sink_ring(state: FavorState, sinks: int) -> int:
    """The number of sink slots (of ``state.sink_keys``) valid for ``sinks``: ``sinks``
    once they are all there, fewer while no key has reached ``kv`` (the slots grow with
    the tokens that leave the window, and every real key that leaves before ``sinks``
    slots exist is a sink). A state with fewer slots whose ``kv`` holds keys belongs to
    fewer sinks: ``sinks`` is returned, and the shape check fails."""
    keys = state.sink_keys
    if not isinstance(keys, Tensor) or keys.dim() != 4 or keys.shape[-2] >= sinks:
        return sinks
    return sinks if bool((state.kv != 0).any()) else keys.shape[-2]


def favor_recurrent_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: FavorState | None,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    linear_factor: Tensor | None = None,
    sinks: int = 0,
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
    compiled: bool = False,
    kv_groups: int = 1,
) -> tuple[Tensor, FavorState]:
    """Consume ``n >= 1`` new tokens (causally among themselves) after ``state``.

    Shapes: ``q, k: (B, H, n, d)``, ``v: (B, H, n, dv)``, ``linear_factor: (H,)``,
    ``()`` or None (hybrid only: a window or sinks). ``sinks > 0`` with
    ``window=None`` steps the hybrid with an empty band (window 0). ``decay``,
    ``far_q``, ``far_k``: hybrid only, as :func:`~.window.step.favor_window_step`.
    ``compiled``, ``kv_groups``: as :func:`~.window.step.favor_window_step` (hybrid only;
    ``k, v`` then come repeated to the query heads, the state's ring keeps ``H /
    kv_groups`` heads). Returns ``(out: (B, H, n, dv), new_state)``.
    """
    far = far_k is not None
    if window is None and sinks:
        window = 0
    if window is not None:
        if state is None:
            m = fm.feature_dim(params.weight, q.shape[-1])
            state = empty_window_state(
                q.shape[0],
                q.shape[1],
                m,
                q.shape[-1],
                v.shape[-1],
                window,
                dtype=q.dtype,
                device=q.device,
                sinks=sinks,
                far=far,
                kv_heads=q.shape[1] // kv_groups,
            )
        fields = tuple(state)[:9] if sinks else tuple(state)[:5]
        out, new = favor_window_step(
            q,
            k,
            v,
            fm,
            params,
            window=window,
            state=fields,
            linear_factor=linear_factor,
            key_padding_mask=key_padding_mask,
            sinks=sinks,
            decay=decay,
            far_q=far_q,
            far_k=far_k,
            far_ring=state.far_keys if far else None,
            compiled=compiled,
            kv_groups=kv_groups,
        )
        if far:
            return out, FavorState(*new[:-1], far_keys=new[-1])
        return out, FavorState(*new)
    initial = None if state is None else (state.kv, state.stab)
    out, kv, stab = favor_causal(
        q,
        k,
        v,
        fm,
        params,
        key_padding_mask=key_padding_mask,
        chunk_size=min(64, q.shape[-2]),
        initial=initial,
    )
    return out, FavorState(kv, stab)
