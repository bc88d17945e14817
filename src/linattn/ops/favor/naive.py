"""The oracle: FAVOR attention that materializes the ``(Lq, Lk)`` matrix.

Quadratic in time and memory; used by the tests (in float64) and as the definition the
fast paths must match up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...features import FeatureMap, FeatureParams


def window_mask(lq: int, lk: int, window: int, causal: bool, device=None) -> Tensor:
    """``near: (Lq, Lk)`` bool, the pairs scored exactly by the window hybrid:
    ``i - window < j <= i`` when causal, else ``|i - j| <= window``."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    if causal:
        return (j <= i) & (j > i - window)
    return (i - j).abs() <= window


def sink_mask(key_padding_mask: Tensor | None, lk: int, sinks: int, device=None) -> Tensor:
    """``is_sink: (B, Lk)`` (or ``(Lk,)`` without a mask) bool: the first ``sinks``
    unpadded keys of each sequence (a left-padded sequence's sinks are its first real
    tokens); all False when ``sinks == 0``."""
    if key_padding_mask is None:
        return torch.arange(lk, device=device) < sinks
    keep = ~key_padding_mask
    return keep & (keep.long().cumsum(-1) <= sinks)


def favor_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    window: int | None = None,
    linear_factor: Tensor | None = None,
    sinks: int = 0,
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
) -> Tensor:
    """Reference FAVOR attention, optionally the sliding-window hybrid with sink keys.

    Shapes: ``q: (B, H, Lq, d)``, ``k: (B, H, Lk, d)`` (raw; ``params.scale``
    applies), ``v: (B, H, Lk, dv)``, ``key_padding_mask: (B, Lk)`` bool (True =
    ignore), ``linear_factor``: ``(H,)`` or ``()`` (used only by the hybrid: a window or
    ``sinks > 0``), ``sinks``: the number of sink keys (the first ``sinks`` unpadded keys
    of each sequence), scored exactly by every query that sees them, window or not;
    ``decay``: ``ln gamma: (H,)`` or ``()``, ``<= 0``, or None (causal hybrid only): the
    far score of query ``i`` and key ``j`` is weighed by ``gamma^(i - j)``; ``far_q,
    far_k``: the inputs of the feature-map scores (default ``q``, ``k``).
    Returns ``(B, H, Lq, dv)``; a query row with no visible key gets zeros.

    Equivalent to::

        A = phi_q(far_q) @ phi_k(far_k).T      # (Lq, Lk), by the kernel's exact formula
        if window is not None or sinks:
            # near: |i - j| <= w, or i - w < j <= i if causal (none if window is None),
            # or j among the first `sinks` unpadded keys of the sequence
            A = where(near, exp(scale * q @ k.T), linear_factor[h] * decay[h]^(i - j) * A)
        A = A masked (padded keys, and j > i when causal) to 0
        out = (A @ v) / A.sum(-1)
    """
    fq = q if far_q is None else far_q
    fk = k if far_k is None else far_k
    a = fm.exact(fq, params, is_query=True) @ fm.exact(fk, params, is_query=False).mT
    if window is not None or sinks:
        if linear_factor is not None:
            lf = linear_factor.reshape(-1, 1, 1) if linear_factor.dim() else linear_factor
            a = a * lf
        lq, lk = q.shape[-2], k.shape[-2]
        if decay is not None:
            # gamma_h^(i - j) on the far scores (causal: i - j >= 0 where it counts).
            ld = decay.reshape(-1, 1, 1) if decay.dim() else decay
            dist = (torch.arange(lq, device=q.device)[:, None] + (lk - lq)) - torch.arange(
                lk, device=q.device
            )
            a = a * torch.exp(ld.to(a.dtype) * dist.clamp(min=0).to(a.dtype))
        near = torch.zeros(lq, lk, dtype=torch.bool, device=q.device)
        if window is not None:
            near = window_mask(lq, lk, window, causal, device=q.device)
        if sinks:
            is_sink = sink_mask(key_padding_mask, lk, sinks, device=q.device)
            # [B, 1, 1, Lk] (or [Lk]) against the [Lq, Lk] band
            near = near | (is_sink[:, None, None, :] if is_sink.dim() == 2 else is_sink)
        a = torch.where(near, torch.exp(params.scale * (q @ k.transpose(-2, -1))), a)
    if key_padding_mask is not None:
        a = a.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    if causal:
        a = torch.tril(a)
    num = a @ v
    den = a.sum(-1, keepdim=True)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
