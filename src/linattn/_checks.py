"""Input validation shared by the functional API and the modules.

Every check raises ``ValueError`` or ``TypeError`` whose message names the argument,
the shape (or value) expected and the one received.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_str(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t: object, *, min_dim: int = 1, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {shape_str(t)}"
        )
    if floating and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )
    return t


def check_qkv(
    q: object, k: object, v: object, *, allow_empty: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Check q: (..., Lq, d), k: (..., Lk, d), v: (..., Lk, dv) with equal leading dims.
    ``allow_empty``: ``Lq = Lk = 0`` is allowed (a piece of no tokens after a state)."""
    q = check_tensor("q", q, min_dim=2)
    k = check_tensor("k", k, min_dim=2)
    v = check_tensor("v", v, min_dim=2)
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(
            "q, k and v must have the same number of dimensions "
            f"(..., L, d); got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}"
        )
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
        raise ValueError(
            "q, k and v must share their leading (batch, heads) dimensions; "
            f"got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head_dim (last dimension); got q {shape_str(q)}, "
            f"k {shape_str(k)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length (dimension -2); got k {shape_str(k)}, "
            f"v {shape_str(v)}"
        )
    empty = allow_empty and q.shape[-2] == k.shape[-2] == 0
    if k.shape[-2] == 0 and not empty:
        raise ValueError(f"k must hold at least one key; got k {shape_str(k)}")
    if q.shape[-2] == 0 and not empty:
        raise ValueError(f"q must hold at least one query (Lq >= 1); got q {shape_str(q)}")
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(
            f"head_dim and the value dim must be >= 1; got q {shape_str(q)}, v {shape_str(v)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device; got q {q.device}, k {k.device}, v {v.device}"
        )
    return q, k, v


def check_key_padding_mask(mask: object, k: Tensor) -> Tensor | None:
    """Check key_padding_mask: (batch, Lk) bool, True = padding; batch = k.shape[0]."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            "key_padding_mask must have dtype torch.bool (True marks padding to ignore), "
            f"got {mask.dtype}"
        )
    lk = k.shape[-2]
    if k.dim() < 3 or mask.dim() != 2 or mask.shape[0] != k.shape[0] or mask.shape[1] != lk:
        expect = f"({k.shape[0]}, {lk})" if k.dim() >= 3 else "(batch, Lk) with k of rank >= 3"
        raise ValueError(
            f"key_padding_mask must have shape (batch, Lk) = {expect} for k {shape_str(k)}, "
            f"got {shape_str(mask)}"
        )
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but k is on {k.device}")
    return mask


def check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a positive float or None, got {type(scale).__name__}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return float(scale)


def is_int(value: object) -> bool:
    """An integral number (a Python or NumPy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: object) -> int:
    """``value`` as a Python int: an int or another integral number (a NumPy integer,
    say), not a bool and not a float. Store the result, not ``value`` (JSON)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """``value`` as a Python int ``>= minimum`` (:func:`check_int`)."""
    value = check_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
) -> float:
    """``value``: a real number (an int, a float or a NumPy real, not a bool) in the
    interval from ``low`` to ``high`` (open ends unless ``low_inclusive`` /
    ``high_inclusive``), returned as a Python int or float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value) if not isinstance(value, int) else value
    if not (
        (low <= value if low_inclusive else low < value)
        and (value <= high if high_inclusive else value < high)
    ):
        raise ValueError(
            f"{name} must be in {'[' if low_inclusive else '('}{low:g}, {high:g}"
            f"{']' if high_inclusive else ')'}, got {value}"
        )
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]


def check_cu_seqlens(cu_seqlens: object, total: int, device: torch.device) -> list[int]:
    """Packed-sequence offsets (FlashAttention's varlen ``cu_seqlens``) as Python ints
    ``[c_0, ..., c_N]``: an int32 tensor of shape ``(N + 1,)``, ``N >= 1``, on
    ``device``, with ``c_0 = 0``, non-decreasing, ``c_N = total`` (the packed length)."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(
            f"cu_seqlens must be an int32 tensor of offsets (N + 1,), got "
            f"{type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(
            f"cu_seqlens must have dtype torch.int32 (as FlashAttention's varlen), got "
            f"{cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            "cu_seqlens must have shape (N + 1,) with N >= 1 sequences, got "
            f"{shape_str(cu_seqlens)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}")
    offsets = [int(c) for c in cu_seqlens.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]} (cu_seqlens {offsets})")
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise ValueError(
                f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {offsets[i]} < "
                f"cu_seqlens[{i - 1}] = {offsets[i - 1]}"
            )
    if offsets[-1] != total:
        raise ValueError(
            f"cu_seqlens must end at T = {total} (the packed length), got {offsets[-1]}"
        )
    return offsets
