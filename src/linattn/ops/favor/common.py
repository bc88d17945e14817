"""Small pieces both FAVOR paths share."""

from __future__ import annotations

import torch
from torch import Tensor


def ones_col(v: Tensor) -> Tensor:
    """``[v, 1]: (..., n, dv + 1)``: the normalizer rides along as a last value column."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def safe_denominator(den: Tensor, positive: bool) -> Tensor:
    """``den`` with rows that see no key set to ``inf``, so their output is exactly 0.

    Positive feature maps have ``den >= 0`` (0 when every visible key is padding);
    signed ones (trigonometric) only lose exact zeros.
    """
    valid = den > 0 if positive else den != 0
    return torch.where(valid, den, float("inf"))
