"""Rotary embedding helpers for ``far_rope=False``: the tokens' positions and the
rotation undone, so that the feature-map (far) part scores position-free queries and keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def positions_for(
    positions: Tensor | None, mask: Tensor | None, bsz: int, length: int, device
) -> Tensor:
    """Position ids ``(B, L)`` long of ``L`` tokens: ``positions`` (``(B, L)``, ``(1,
    L)`` or ``(L,)``) as given, else ``0 .. L - 1`` counted from each row's first real
    token (``mask: (B, L)`` True = padding), as transformers' ``generate()`` numbers a
    left-padded row."""
    if positions is not None:
        pos = positions.to(device=device, dtype=torch.long)
        if pos.dim() == 1:
            pos = pos.unsqueeze(0)
        if pos.dim() != 2 or pos.shape[-1] != length or pos.shape[0] not in (1, bsz):
            raise ValueError(
                f"position_ids must have shape (batch, {length}) or ({length},) for "
                f"{length} tokens, got {tuple(positions.shape)}"
            )
        return pos.expand(bsz, length)
    if mask is None:
        return torch.arange(length, device=device).expand(bsz, length)
    return ((~mask).long().cumsum(-1) - 1).clamp_min(0)


def unrotate(rotary: nn.Module, x: Tensor, positions: Tensor) -> Tensor:
    """``x: (B, H, L, d)`` with the rotary embedding of ``rotary`` (a transformers rotary
    module, ``cos, sin = rotary(x, position_ids)``) at ``positions: (B, L)`` undone:
    transformers rotates ``x_rot = x cos + rotate_half(x) sin`` on the first ``r`` dims
    (``r`` = the width of ``cos``; all of them but for partial rotary); the inverse is
    ``(x_rot cos - rotate_half(x_rot) sin) / (cos^2 + sin^2)`` there (the denominator
    is the squared attention scaling of the scaled rotary types)."""
    return apply_unrotation(x, *unrotation_tables(rotary, x, positions))


def unrotate_pair(
    rotary: nn.Module, q: Tensor, k: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`unrotate` of queries and keys at the same ``positions: (B, L)`` (``q: (B,
    H, L, d)``, ``k: (B, H_k, L, d)``, one dtype), the tables computed once."""
    tables = unrotation_tables(rotary, q, positions)
    return apply_unrotation(q, *tables), apply_unrotation(k, *tables)


def unrotation_tables(rotary: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos / n, [sin_1, -sin_2] / n)``, each ``(B, 1, L, r)`` in ``x``'s dtype, ``n =
    cos^2 + sin^2`` (``sin_1, sin_2`` the halves of the ``r`` rotated dims): what
    :func:`apply_unrotation` multiplies by (the denominator and the sign folded into the
    small tables, not applied to ``(B, H, L, r)``)."""
    cos, sin = rotary(x, positions)
    norm = cos * cos + sin * sin
    h = cos.shape[-1] // 2
    signed = torch.cat([sin[..., :h], -sin[..., h:]], dim=-1)
    return (cos / norm).unsqueeze(1).to(x.dtype), (signed / norm).unsqueeze(1).to(x.dtype)


def apply_unrotation(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x cos - rotate_half(x) sin`` on the first ``r`` dims of ``x: (B, H, L, d)``
    (``cos, sin: (B, 1, L, r)`` from :func:`unrotation_tables`, ``sin`` signed), the rest
    as they are: ``[x1 c1 + x2 s1, x2 c2 - x1 s2]`` for the halves ``x1, x2``, i.e. ``x
    cos + [x2, x1] sin_signed``, three tensor ops (a few more under partial rotary)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(r // 2, dims=-1), sin)
    head = x[..., :r]
    rot = torch.addcmul(head * cos, head.roll(r // 2, dims=-1), sin)
    return torch.cat([rot, x[..., r:]], dim=-1)
