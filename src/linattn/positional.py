"""Positional information that works with linear attention (pure functions).

Rotary embeddings rotate q and k before the feature map, so relative positions enter
``q.k`` as in exact attention. Absolute embeddings (learned, sinusoidal) are added to
the token embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rotary_angles(positions: Tensor, dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of shape ``(L, dim)`` for integer ``positions: (L,)``; ``dim`` even.

    Pairs ``(x[i], x[i + dim/2])`` rotate by ``positions * base^(-2i/dim)``.
    """
    if dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {dim}")
    inv = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x: (..., L, d)`` by angles ``cos, sin: (L, d)`` (from :func:`rotary_angles`).

    Equivalent to ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half([a, b]) = [-b, a]``.
    """
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


def sinusoidal_table(length: int, dim: int, *, dtype=None, device=None) -> Tensor:
    """The Transformer's sinusoidal position table ``(length, dim)``:
    ``[sin(p w_i), cos(p w_i)]`` interleaved, ``w_i = 10000^(-2i/dim)``."""
    pos = torch.arange(length, dtype=torch.float64, device=device)[:, None]
    inv = torch.exp(
        -math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
    )
    table = torch.zeros(length, dim, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : dim // 2]
    return table.to(dtype or torch.get_default_dtype())
