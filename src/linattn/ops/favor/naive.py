"""The oracle: FAVOR attention that materializes the ``(Lq, Lk)`` matrix.

Quadratic in time and memory; used by the tests (in float64) and as the definition the
fast paths must match up to rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...features import FeatureMap, FeatureParams


def favor_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Reference FAVOR attention.

    Shapes: ``q: (B, H, Lq, d)``, ``k: (B, H, Lk, d)`` (raw; ``params.scale``
    applies), ``v: (B, H, Lk, dv)``, ``key_padding_mask: (B, Lk)`` bool (True =
    ignore). Returns ``(B, H, Lq, dv)``; a query row with no visible key gets zeros.

    Equivalent to::

        A = phi(q) @ phi(k).T          # (Lq, Lk), phi by the kernel's exact formula
        A = A masked (padded keys, and j > i when causal) to 0
        out = (A @ v) / A.sum(-1)
    """
    a = fm.exact(q, params) @ fm.exact(k, params).transpose(-2, -1)
    if key_padding_mask is not None:
        a = a.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    if causal:
        a = torch.tril(a)
    num = a @ v
    den = a.sum(-1, keepdim=True)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
