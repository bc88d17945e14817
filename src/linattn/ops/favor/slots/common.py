"""What the slot hybrid's forms share: the rules, the decoding state, the checks of
the configuration and inputs, the far part's factor and the tie-safe scores."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ....features import FeatureMap

Rule = Literal["error", "mass", "union"]
RULES = ("error", "mass", "union")
#: The rules that score keys by the attention they received (tracked at every query).
MASS_RULES = ("mass", "union")


class SlotState(NamedTuple):
    """Decoding state of :func:`favor_slots_step` (one per layer).

    ``pos``: tokens consumed. ``sink_k: (B, H, s', d)``, ``sink_v: (B, H, s', dv)``, the
    sinks seen (``s' <= s``). ``local_k: (B, H, n, d)``, ``local_v``, ``local_score:
    (B, H, n)``: the undecided keys (window + pending), positions ``lo .. pos - 1`` with
    ``lo = pos - n``. ``cache_k: (B, H, g, d)``, ``cache_v``, ``cache_score: (B, H, g)``,
    ``cache_pos: (B, H, g)`` long (``g <= G``). ``kv: (B, H, M, dv + 1)`` the far state
    ``sum_j F_j^T exp(r_j - stab) [v_j, 1]`` under ``stab: (B, H)`` (with a ``decay``,
    in the frame of the next query ``pos``: key ``j`` weighs ``gamma^(pos - j)``).
    With far inputs (``far_q``/``far_k``): ``local_fk: (B, H, n, d)`` and ``cache_fk:
    (B, H, g, d)``, the far keys of the undecided and the cached keys (None otherwise).
    """

    pos: int
    sink_k: Tensor
    sink_v: Tensor
    local_k: Tensor
    local_v: Tensor
    local_score: Tensor
    cache_k: Tensor
    cache_v: Tensor
    cache_score: Tensor
    cache_pos: Tensor
    kv: Tensor
    stab: Tensor
    local_fk: Tensor | None = None
    cache_fk: Tensor | None = None


def _check_config(window: object, sinks: object, slots: object, interval: object, rule: object):
    for name, val, low in (("window", window, 1), ("sinks", sinks, 0), ("slots", slots, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{name} must be an int >= {low}, got {val!r}")
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, int) or interval < 1
    ):
        raise ValueError(f"interval must be None or an int >= 1, got {interval!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, fm: FeatureMap, key_padding_mask) -> None:
    if key_padding_mask is not None:
        raise ValueError(
            "key_padding_mask is not supported by the slot hybrid (slots are chosen per "
            "position); pass unpadded sequences of one length"
        )
    if not fm.causal_ok:
        raise ValueError(f"kernel {fm.name!r} depends on the whole sequence; it cannot be causal")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a (B, H, L, d) tensor, got {getattr(x, 'shape', x)}")
    if q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            "expected q and k of one shape (B, H, L, d) and v (B, H, L, dv); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )


def _lf(linear_factor: Tensor | None, like: Tensor) -> Tensor:
    """``(1, H, 1)`` or ``()`` factor of the far part (1 when None)."""
    if linear_factor is None:
        return like.new_ones(())
    if linear_factor.dim():
        return linear_factor.to(like.dtype).reshape(1, -1, 1)
    return linear_factor.to(like.dtype)


def union_score(error: Tensor, mass: Tensor) -> Tensor:
    """``"union"``'s score ``(..., n)``: the larger of the error and the mass score, each
    divided by its row's maximum (a row of zeros stays zero), so a key ranked high by
    either rule ranks high; the scores are compared within one decision only."""
    tiny = torch.finfo(error.dtype).tiny
    e = error / error.amax(-1, keepdim=True).clamp_min(tiny)
    m = mass / mass.amax(-1, keepdim=True).clamp_min(tiny)
    return torch.maximum(e, m)


def tie_safe(score: Tensor) -> Tensor:
    """``score: (..., n)`` rounded to a millionth of its row's maximum: keys whose scores
    differ only by rounding (identical keys and values, as repeated tokens give once the
    far part scores un-rotated keys) tie, and a tie goes to the earlier candidate in every
    form alike (the prefill, decoding token by token, the reference), whose sums round
    differently."""
    top = score.amax(-1, keepdim=True).clamp_min(torch.finfo(score.dtype).tiny)
    return torch.round(score / top * 1e6)
