"""Recurrent FAVOR decoding: an O(1) state per (batch, head), advanced a block at a time.

The state after tokens ``1..t`` is ``S = sum_j exp(r_j - c) F_j^T [v_j, 1]``
(``(M, dv + 1)``) with its stabilizer ``c = max_j r_j``; consuming one token (or a block)
costs the same whatever ``t`` is. The step is the causal scan with the state carried in,
so running it token by token reproduces :func:`favor_causal`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ...features import FeatureMap, FeatureParams
from .causal import favor_causal


class FavorState(NamedTuple):
    """Causal FAVOR state: ``kv: (B, H, M, dv + 1)`` (the last column sums ``phi(k)``) and
    ``stab: (B, H)``, the log-scale ``kv`` is stored under (``kv * exp(stab)`` is the
    unstabilized sum, up to the feature map's constant)."""

    kv: Tensor
    stab: Tensor


def favor_recurrent_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: FavorState | None,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, FavorState]:
    """Consume ``n >= 1`` new tokens (causally among themselves) after ``state``.

    Shapes: ``q, k: (B, H, n, d)``, ``v: (B, H, n, dv)``. Returns
    ``(out: (B, H, n, dv), new_state)``.
    """
    initial = None if state is None else (state.kv, state.stab)
    out, kv, stab = favor_causal(
        q, k, v, fm, params, key_padding_mask=key_padding_mask,
        chunk_size=min(64, q.shape[-2]), initial=initial,
    )
    return out, FavorState(kv, stab)
