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
    cos, sin = rotary(x, positions)
    # The denominator folded into the (B, L, r) tables, not applied to (B, H, L, r).
    norm = cos * cos + sin * sin
    cos, sin = (cos / norm).unsqueeze(1).to(x.dtype), (sin / norm).unsqueeze(1).to(x.dtype)
    r = cos.shape[-1]
    h = r // 2
    # x cos - rotate_half(x) sin = [x1 c1 + x2 s1, x2 c2 - x1 s2] (halves of the rotated
    # dims), written straight into the result: no rotate_half copy.
    x1, x2 = x[..., :h], x[..., h:r]
    if torch.is_grad_enabled() and x.requires_grad:
        parts = [
            torch.addcmul(x1 * cos[..., :h], x2, sin[..., :h]),
            torch.addcmul(x2 * cos[..., h:], x1, sin[..., h:], value=-1.0),
            x[..., r:],
        ]
        return torch.cat(parts, dim=-1)
    out = torch.empty_like(x)
    torch.mul(x1, cos[..., :h], out=out[..., :h])
    out[..., :h].addcmul_(x2, sin[..., :h])
    torch.mul(x2, cos[..., h:], out=out[..., h:r])
    out[..., h:r].addcmul_(x1, sin[..., h:], value=-1.0)
    if r < x.shape[-1]:
        out[..., r:] = x[..., r:]
    return out
