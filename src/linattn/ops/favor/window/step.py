"""Causal hybrid decoding (:func:`favor_window_step`): the state carries the linear state
of the keys older than the window, the ring of the last ``min(w, t)`` tokens and, with
sinks, the sinks that have left the window; stepping equals the parallel causal form."""

from __future__ import annotations

import torch
from torch import Tensor

from ....features import FeatureMap, FeatureParams
from .hybrid import combine, factor_shape
from .naive import band_attention, far_left
from .sinks import step_sinks


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
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Causal hybrid decoding: consume ``n`` new tokens after ``state``.

    Shapes: ``q, k: (B, H, n, d)``, ``v: (B, H, n, dv)``, ``key_padding_mask: (B, n)``;
    ``state = (S: (B, H, M, dv + 1), c: (B, H), keys: (B, H, r, d), values:
    (B, H, r, dv), padding: (B, r) bool)``: the linear state of every key older than the
    window and the last ``r = min(w, tokens so far)`` keys/values (padding True for
    empty slots); the new ring has ``min(w, r + n)`` slots. With
    ``sinks = s > 0`` four more: ``sink_keys: (B, H, s, d)``, ``sink_values: (B, H, s,
    dv)``, ``sink_padding: (B, s)`` bool (True = empty slot), the sinks that have left
    the window (``S`` never holds a sink), and ``seen: (B,)`` long, the real keys consumed
    so far. Returns ``(out: (B, H, n, dv), new_state)``; stepping equals
    :func:`favor_window` (causal, same ``sinks``) on the concatenated tokens.
    """
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
            q, kc, vc, keep, state[5:], n, sinks, params.scale, window
        )
        parts.append(part)
    # Query a sits at position ring + a of kc; its far keys are j <= ring + a - w.
    nd, g, kv, stab = far_left(
        q, kc, vc, keep_far.to(q.dtype), fm, params, max(ring - window, -n), 64, initial=(kv, stab)
    )
    lf = factor_shape(linear_factor)
    if lf is not None:
        nd = nd * lf
    parts.append((nd, g))
    out = combine(parts, fm.positive_features)
    keep_from = max(0, ring + n - window)
    new = (kv, stab, kc[..., keep_from:, :], vc[..., keep_from:, :], padc[:, keep_from:])
    if sinks:
        new = new + sink_state
    return out, new
