"""Fused Triton kernels for FAVOR+ on CUDA (``kernel="softmax"`` and ``"softmax_hyp"``).

Selection: ``linattn.favor_attention`` asks :func:`not_supported_reasons` (one backend of
:mod:`linattn._dispatch`); the Triton path runs when triton is importable, the tensors
are on a CUDA device, the call is one the kernels cover (below), and ``LINATTN_TRITON``
is not ``0``/``off``/``eager``. Otherwise the reasons are logged (``LINATTN_LOG_DISPATCH=1``)
and the eager path (``bidirectional.py``/``causal.py``) runs, with its own checks and
error messages. On CPU the kernels are never selected, except
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
from dataclasses import replace

import torch
from torch import Tensor

from ...._checks import check_scale
from ...._dispatch import FavorCall

__all__ = [
    "available",
    "interpret_on_cpu",
    "maybe_favor_triton",
    "not_supported_reasons",
    "run",
    "triton_enabled",
]

SUPPORTED_KERNELS = ("softmax", "softmax_hyp")
MAX_HEAD_DIM = 128
MAX_FEATURES = 512
_ENV = "LINATTN_TRITON"
_CPU_INTERPRET = False


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


def not_supported_reasons(call: FavorCall) -> list[str]:
    """Why the kernels cannot run ``call`` (a :class:`~linattn._dispatch.FavorCall`);
    empty when they can. Every reason is listed, not just the first."""
    q, k, v, w = call.q, call.k, call.v, call.projection
    reasons = []
    if not triton_enabled():
        reasons.append(f"{_ENV} disables it")
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return [*reasons, "q, k, v are not all tensors"]
    if not _device_ok(q):
        reasons.append(f"q is on {q.device.type} (the kernels run on CUDA)")
    elif not available():
        reasons.append("triton is not installed")
    for name in (
        "window",
        "linear_factor",
        "cu_seqlens",
        "initial_state",
        "decay",
        "far_q",
        "far_k",
    ):
        if getattr(call, name) is not None:
            reasons.append(f"{name} is set")
    if call.sinks:
        reasons.append("sinks is set")
    if call.output_final_state:
        reasons.append("output_final_state is set")
    if call.kernel not in SUPPORTED_KERNELS:
        reasons.append(f"kernel={call.kernel!r} (covered: {', '.join(SUPPORTED_KERNELS)})")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        reasons.append(f"dtype {q.dtype} (covered: float32, float16, bfloat16)")
    if not (q.dim() == k.dim() == v.dim() == 4):
        reasons.append(f"q has {q.dim()} dimensions (covered: (B, H, L, d))")
    else:
        d, dv = q.shape[3], v.shape[3]
        if not (d <= MAX_HEAD_DIM and dv <= MAX_HEAD_DIM):
            reasons.append(f"head_dim {d} or value dim {dv} above {MAX_HEAD_DIM}")
        if isinstance(w, Tensor) and w.dim() == 3 and w.shape[0] != q.shape[1]:
            reasons.append("projection has another head count")
    if call.causal and q.shape[-2] != k.shape[-2]:
        reasons.append("causal with Lq != Lk")
    if not isinstance(w, Tensor):
        reasons.append("no projection")
    else:
        if w.dim() not in (2, 3) or w.shape[-1] != q.shape[-1] or not w.is_floating_point():
            reasons.append("projection shape or dtype")
        if w.device != q.device:
            reasons.append("projection on another device")
        if w.requires_grad and torch.is_grad_enabled():
            reasons.append("the projection needs a gradient")
        feats = w.shape[-2] * (2 if call.kernel == "softmax_hyp" else 1)
        if not 1 <= feats <= MAX_FEATURES:
            reasons.append(f"{feats} features (covered: 1..{MAX_FEATURES})")
    return reasons


def run(call: FavorCall) -> Tensor:
    """The kernels' result for a supported ``call`` (padded keys and values already
    zeroed, as :class:`~linattn._dispatch.FavorCall` holds them)."""
    from ._ops import favor_triton, fold_weight

    q = call.q
    scale = check_scale(call.scale, q.shape[-1])
    w = fold_weight(call.projection, call.kernel, scale, q.shape[1])
    mask = call.key_padding_mask
    keep = None if mask is None else (~mask).contiguous()
    return favor_triton(
        q.contiguous(),
        call.k.contiguous(),
        call.v.contiguous(),
        w,
        causal=call.causal,
        keep=keep,
        scale=scale,
    )


def maybe_favor_triton(**kwargs) -> Tensor | None:
    """The Triton result of a ``favor_attention`` call given by its arguments' names (a
    :class:`~linattn._dispatch.FavorCall`'s fields), or None when the kernels do not
    cover it (:func:`not_supported_reasons`). For benchmarks that must time the kernels
    and nothing else; ``favor_attention`` dispatches through :mod:`linattn._dispatch`."""
    if kwargs.get("sinks") is None:
        kwargs["sinks"] = 0
    call = FavorCall(**kwargs)
    if not_supported_reasons(call):
        return None
    mask = call.key_padding_mask
    if mask is not None:
        # Padding may hold anything (NaN, inf): a select keeps it out of the kernels.
        pad = mask[:, None, :, None]
        call = replace(call, k=call.k.masked_fill(pad, 0), v=call.v.masked_fill(pad, 0))
    return run(call)
