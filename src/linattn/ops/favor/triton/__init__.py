"""Fused Triton kernels for FAVOR+ on CUDA (``kernel="softmax"`` and ``"softmax_hyp"``).

Selection (:func:`maybe_favor_triton`, called first by ``linattn.favor_attention``): the
Triton path runs when triton is importable, the tensors are on a CUDA device, the call is
one the kernels cover (below), and ``LINATTN_TRITON`` is not ``0``/``off``/``eager``.
Anything else returns None and the eager path (``bidirectional.py``/``causal.py``) runs,
with its own checks and error messages. On CPU the kernels are never selected, except
inside :func:`interpret_on_cpu` with ``TRITON_INTERPRET=1`` (Triton's numpy interpreter;
for the tests).

Covered: ``(B, H, L, d)`` q/k/v of one dtype (float32, float16, bfloat16; half inputs
accumulate in float32), ``d, dv <= 128``, ``M <= 512`` features (m <= 256 for the
hyperbolic map), a projection ``(m, d)`` or ``(H, m, d)`` that needs no gradient,
``key_padding_mask (B, Lk)``, causal or not. Not covered (eager): the other kernels,
``window``/``linear_factor``, trainable projections, initial states.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from ...._checks import check_scale

__all__ = ["available", "interpret_on_cpu", "maybe_favor_triton", "triton_enabled"]

SUPPORTED_KERNELS = ("softmax", "softmax_hyp")
MAX_HEAD_DIM = 128
MAX_FEATURES = 512
_ENV = "LINATTN_TRITON"
_CPU_INTERPRET = False
# Arguments the kernels understand; any other argument that is not None sends the call to
# the eager path (e.g. window / linear_factor).
_KNOWN = {
    "q",
    "k",
    "v",
    "projection",
    "kernel",
    "causal",
    "key_padding_mask",
    "scale",
    "chunk_size",
    "block_size",
}


def available() -> bool:
    """True when triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def triton_enabled() -> bool:
    """False when ``LINATTN_TRITON`` is set to ``0``, ``off``, ``false`` or ``eager``."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "off", "false", "eager")


@contextlib.contextmanager
def interpret_on_cpu() -> Iterator[None]:
    """Let CPU tensors take the Triton path (tests; needs ``TRITON_INTERPRET=1`` set
    before triton is imported)."""
    global _CPU_INTERPRET
    old = _CPU_INTERPRET
    _CPU_INTERPRET = True
    try:
        yield
    finally:
        _CPU_INTERPRET = old


def _device_ok(t: Tensor) -> bool:
    if t.device.type == "cuda":
        return True
    return (
        _CPU_INTERPRET
        and t.device.type == "cpu"
        and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    )


def _covered(q, k, v, projection, kernel, causal, key_padding_mask) -> bool:
    tensors = (q, k, v, projection)
    if not all(isinstance(t, Tensor) for t in tensors):
        return False
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if not (q.dim() == k.dim() == v.dim() == 4):
        return False
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        return False
    if not all(t.device == q.device for t in tensors) or not _device_ok(q):
        return False
    d, dv = q.shape[3], v.shape[3]
    if not (1 <= d <= MAX_HEAD_DIM and 1 <= dv <= MAX_HEAD_DIM) or min(q.shape[2], k.shape[2]) < 1:
        return False
    if kernel not in SUPPORTED_KERNELS or not isinstance(causal, bool):
        return False
    if causal and q.shape[2] != k.shape[2]:
        return False
    if projection.dim() not in (2, 3) or projection.shape[-1] != d:
        return False
    if projection.dim() == 3 and projection.shape[0] != q.shape[1]:
        return False
    if not projection.is_floating_point() or (projection.requires_grad and torch.is_grad_enabled()):
        return False
    feats = projection.shape[-2] * (2 if kernel == "softmax_hyp" else 1)
    if not 1 <= feats <= MAX_FEATURES:
        return False
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            return False
        if key_padding_mask.shape != (q.shape[0], k.shape[2]):
            return False
        if key_padding_mask.device != q.device:
            return False
    return True


def maybe_favor_triton(**kwargs) -> Tensor | None:
    """The Triton result of a ``favor_attention`` call, or None when the call is not one
    the kernels cover (the caller then runs the eager path). Takes ``favor_attention``'s
    arguments by name; an unknown argument that is not None means "not covered"."""
    if any(key not in _KNOWN and val is not None for key, val in kwargs.items()):
        return None
    q, k, v = kwargs.get("q"), kwargs.get("k"), kwargs.get("v")
    projection = kwargs.get("projection")
    kernel = kwargs.get("kernel", "softmax")
    causal = kwargs.get("causal", False)
    mask = kwargs.get("key_padding_mask")
    if not triton_enabled() or not isinstance(q, Tensor) or not _device_ok(q):
        return None
    if not _covered(q, k, v, projection, kernel, causal, mask) or not available():
        return None
    scale = check_scale(kwargs.get("scale"), q.shape[-1])
    from ._ops import favor_triton, fold_weight

    w = fold_weight(projection, kernel, scale, q.shape[1])
    keep = None if mask is None else (~mask).contiguous()
    if mask is not None:
        # Padding may hold anything (NaN, inf): a select keeps it out of the kernels.
        pad = mask[:, None, :, None]
        k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    return favor_triton(
        q.contiguous(), k.contiguous(), v.contiguous(), w, causal=causal, keep=keep, scale=scale
    )
