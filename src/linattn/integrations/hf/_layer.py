"""Helpers shared by the converted layers' paths (the plain hybrid, the slot hybrid)."""

from __future__ import annotations

from torch import Tensor


def pending_entry(pending: tuple) -> tuple:
    """A cache layer's pending ``(k, v, mask, positions)``: positions None where the
    entry has three fields (a converted DynamicCache)."""
    return (*pending, None) if len(pending) == 3 else pending


def as_query_heads(k: Tensor, v: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values ``(B, H_kv, n, d)`` repeated to ``q``'s ``H`` heads (grouped-query
    attention; ``H`` a multiple of ``H_kv``), on its device and in its dtype."""
    heads = q.shape[1]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
    return k.to(device=q.device, dtype=q.dtype), v.to(device=q.device, dtype=q.dtype)
