"""Attention sinks of the window hybrid (``sinks=s``): the first ``s`` unpadded keys of
each sequence, scored exactly by every query that sees them and left out of the far
parts. Parallel form (:func:`sink_part`) and the decoding step's (:func:`step_sinks`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..common import ones_col


def sink_slots(
    keep: Tensor | None, bsz: int, length: int, sinks: int, device
) -> tuple[Tensor, Tensor, Tensor]:
    """The sink keys of each sequence: its first ``sinks`` unpadded keys.

    Shapes: ``keep: (B, L)`` bool (True = real key) or None. Returns ``is_sink: (B, L)``
    bool, ``idx: (B, s')`` long and ``valid: (B, s')`` bool with ``s' = min(sinks, L)``:
    slot ``r`` holds the position of the ``r``-th real key where ``valid`` (a sequence
    with fewer than ``sinks`` real keys has invalid slots at the end).
    """
    if keep is None:
        keep = torch.ones(bsz, length, dtype=torch.bool, device=device)
    is_sink = keep & (keep.long().cumsum(-1) <= sinks)
    return (is_sink, *first_true(is_sink, min(sinks, length)))


def first_true(flags: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``idx: (B, count)`` the positions of the first ``count`` True entries of ``flags:
    (B, n)`` in order (stable sort), and ``valid: (B, count)`` whether each is True."""
    order = torch.sort((~flags).to(torch.uint8), dim=-1, stable=True).indices[:, :count]
    return order, flags.gather(-1, order)


def gather_slots(x: Tensor, idx: Tensor) -> Tensor:
    """``x: (B, H, L, e)`` at the positions ``idx: (B, s)`` of each sequence:
    ``(B, H, s, e)``."""
    index = idx[:, None, :, None].expand(x.shape[0], x.shape[1], idx.shape[-1], x.shape[-1])
    return x.gather(-2, index)


def sink_attention(
    q: Tensor, ks: Tensor, vs: Tensor, allowed: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Exact scores of every query against gathered sink keys.

    Shapes: ``q: (B, H, n, d)``, ``ks: (B, H, s, d)``, ``vs: (B, H, s, dv)``,
    ``allowed: (B, 1, n, s)`` bool (the pairs this part counts). Returns ``nd: (B, H, n,
    dv + 1)`` and ``mx: (B, H, n)`` with ``sum_{allowed} exp(scale q.k) [v, 1] =
    exp(mx) nd`` (``mx = -inf``, ``nd = 0`` where nothing is allowed), as
    :func:`band_attention`.
    """
    if ks.shape[-2] == 0:
        # No slot yet (a state's sink slots grow with the tokens that leave the window).
        bsz, heads = torch.broadcast_shapes(q.shape[:2], vs.shape[:2])
        nd = q.new_zeros(bsz, heads, q.shape[-2], vs.shape[-1] + 1)
        return nd, q.new_full((bsz, heads, q.shape[-2]), -math.inf)
    scores = (q @ ks.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    mx = scores.detach().amax(-1)
    mx_safe = torch.where(torch.isfinite(mx), mx, 0.0)
    e = torch.exp(scores - mx_safe.unsqueeze(-1))
    return e @ ones_col(vs), mx


def sink_part(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    sinks: int,
    window: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The sinks of a whole sequence (parallel form).

    Shapes: ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``, ``keep: (B, L)`` or None.
    Returns ``keep_far: (B, L)`` bool (real keys that are not sinks: what the far parts
    see) and the part ``(nd, mx)`` of :func:`sink_attention` over the sinks outside each
    query's window (``|i - j| > w``; causal ``j <= i - w``; ``w = -1``: every sink).
    """
    bsz, _, length, _ = k.shape
    is_sink, idx, valid = sink_slots(keep, bsz, length, sinks, k.device)
    far = keep if keep is not None else torch.ones_like(is_sink)
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    pos = idx[:, None, :]  # [B, 1, s']
    outside = (pos <= i - window) if causal else ((i - pos).abs() > window)  # [B, n, s']
    allowed = (valid[:, None, :] & outside).unsqueeze(1)  # [B, 1, n, s']
    part = sink_attention(q, gather_slots(k, idx), gather_slots(v, idx), allowed, scale)
    return far & ~is_sink, part


def step_sinks(
    q: Tensor,
    kc: Tensor,
    vc: Tensor,
    keep: Tensor,
    state: tuple[Tensor, ...],
    n: int,
    sinks: int,
    scale: float,
    window: int,
) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The sinks of one decoding step (:func:`favor_window_step`).

    Shapes: ``kc: (B, H, w + n, d)``, ``vc``, ``keep: (B, w + n)`` over the window's keys
    then the ``n`` new ones; ``state = (sink_keys, sink_values, sink_padding, seen)``.
    Returns ``keep_far: (B, w + n)`` (real, not a sink), the sink part ``(nd, mx)`` and
    the new ``(sink_keys, sink_values, sink_padding, seen)``. The sinks in the state are
    older than every key of ``kc``, so every new query scores them; slot ``p`` of ``kc``
    leaves the window for the queries ``a >= p + shift``, ``shift = window - ring`` (the
    ring, the first ``len(kc) - n`` slots, holds fewer than ``window`` tokens until it
    is full)."""
    sk, sv, spad, seen = state
    w = kc.shape[-2] - n
    shift = window - w
    leave = max(0, n - shift)
    real = keep.long()
    total = seen + real[:, w:].sum(-1)  # [B]
    # Rank (0-based, among real keys) of slot p = real keys before it.
    rank = total[:, None] - real.flip(-1).cumsum(-1).flip(-1)
    is_sink = keep & (rank < sinks)
    idx, valid = first_true(is_sink[:, :leave], min(sinks, leave))
    a = torch.arange(n, device=q.device)[:, None]
    leaving = valid[:, None, :] & (idx[:, None, :] + shift <= a)  # [B, n, s']
    old = (~spad)[:, None, :].expand(-1, n, -1)  # [B, n, s]
    allowed = torch.cat([old, leaving], dim=-1).unsqueeze(1)
    ck = torch.cat([sk, gather_slots(kc, idx)], dim=-2)
    cv = torch.cat([sv, gather_slots(vc, idx)], dim=-2)
    part = sink_attention(q, ck, cv, allowed, scale)
    # After the step every candidate has left the window: at most `sinks` are real.
    keep_slots, kept = first_true(torch.cat([~spad, valid], dim=-1), sinks)
    new = (gather_slots(ck, keep_slots), gather_slots(cv, keep_slots), ~kept, total)
    return keep & ~is_sink, part, new
