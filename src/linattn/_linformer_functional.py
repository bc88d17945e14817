"""Linformer's functional form (:func:`linattn.functional.linformer_attention`).

Shape legend as :mod:`linattn.functional`.
"""

from __future__ import annotations

from torch import Tensor

from ._checks import check_key_padding_mask, check_qkv, check_scale, check_tensor, shape_str
from ._favor_checks import _as_4d, _check_cu_seqlens
from ._favor_state import _run_packed
from .ops.linformer import compact_padding, linear_compress, projected_attention


def _check_linformer_projection(name: str, proj: object, q4: Tensor, lk: int) -> Tensor:
    p = check_tensor(name, proj, min_dim=2)
    heads = q4.shape[1]
    if p.dim() not in (2, 3) or (p.dim() == 3 and p.shape[0] != heads):
        raise ValueError(
            f"{name} must have shape (proj_dim, n) or (heads, proj_dim, n) = "
            f"({heads}, proj_dim, n), "
            f"got {shape_str(p)}"
        )
    if lk > p.shape[-1]:
        raise ValueError(
            f"sequence length {lk} exceeds the {p.shape[-1]} columns of {name} "
            f"{shape_str(p)} (Linformer's maximum length n): use a projection with "
            f"n >= {lk}"
        )
    if p.dtype != q4.dtype:
        raise TypeError(f"{name} has dtype {p.dtype} but q has dtype {q4.dtype}")
    if p.device != q4.device:
        raise ValueError(f"{name} is on {p.device} but q is on {q4.device}")
    return p


def linformer_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj_k: Tensor | None = None,
    proj_v: Tensor | None = None,
    *,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    compressed: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Linformer attention: keys and values projected along the sequence to ``proj_dim``.

    Args:
        q: ``(..., Lq, d)``; k: ``(..., Lk, d)``; v: ``(..., Lk, dv)`` (leading dims
            ``(B, H)``).
        proj_k: ``E: (proj_dim, n)`` shared by the heads, or ``(H, proj_dim, n)`` one per
            head, with ``Lk <= n``: the first ``Lk`` columns are used.
        proj_v: ``F``, same shapes; default ``proj_k`` (key-value sharing).
        key_padding_mask: ``(B, Lk)`` bool, True = padding. Padded keys and values drop
            out and the j-th real key meets column j, so real tokens' outputs do not
            depend on the amount, side or content of the padding.
        scale: default ``1 / sqrt(d)``.
        dropout_p: dropout on the ``(Lq, proj_dim)`` attention weights (pass 0 in
            evaluation).
        compressed: ``k: (..., proj_dim, d)`` and ``v: (..., proj_dim, dv)`` are already
            compressed (by a compression that is not a matrix: pooling, convolution, or
            one applied before the input projections, see
            :class:`linattn.LinformerProjection`); then ``proj_k``, ``proj_v`` and
            ``key_padding_mask`` must be None (padding was dropped by the compression).
        cu_seqlens: None, or int32 ``(N + 1,)`` offsets of ``N`` sequences packed back to
            back in q, k, v of shape ``(1, H, T, d)`` (as :func:`favor_attention`): the
            result equals each sequence run alone (its keys meet the first columns of
            ``proj_k``/``proj_v``); a loop over the sequences, no padding materialized.
            Not with ``key_padding_mask`` or ``compressed=True``.

    Returns:
        ``(..., Lq, dv)``. Linformer is not causal: a projection along the sequence mixes
        future keys into every compressed position, so there is no causal form.

    Equivalent to, per sequence with real keys ``K``, ``V`` (``len`` rows)::

        K' = proj_k[..., :len] @ K;  V' = proj_v[..., :len] @ V   # compressed: K' = k
        out = softmax(q @ K'.T * scale) @ V'
    """
    if cu_seqlens is not None:
        if compressed is not False:
            raise ValueError(
                "cu_seqlens needs compressed=False: packed sequences are compressed one by "
                "one, by proj_k and proj_v"
            )
        offsets = _check_cu_seqlens(cu_seqlens, q, k, v, key_padding_mask)

        def run(_i, qs, ks, vs):
            return linformer_attention(qs, ks, vs, proj_k, proj_v, scale=scale, dropout_p=dropout_p)

        return _run_packed(offsets, q, k, v, run)
    q, k, v = check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    if (
        isinstance(dropout_p, bool)
        or not isinstance(dropout_p, (int, float))
        or not (0.0 <= dropout_p < 1.0)
    ):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(compressed, bool):
        raise TypeError(f"compressed must be a bool, got {type(compressed).__name__}")
    q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
    if compressed:
        for name, value in (
            ("proj_k", proj_k),
            ("proj_v", proj_v),
            ("key_padding_mask", key_padding_mask),
        ):
            if value is not None:
                raise ValueError(
                    f"{name} must be None with compressed=True (k and v are "
                    "already compressed, their padding already dropped)"
                )
        kc, vc = k4, v4
    else:
        if proj_k is None:
            raise ValueError(
                "proj_k is required: pass E of shape (proj_dim, n) or "
                "(heads, proj_dim, n), or compressed=True with k and v already "
                "compressed"
            )
        mask = check_key_padding_mask(key_padding_mask, k)
        pk = _check_linformer_projection("proj_k", proj_k, q4, k4.shape[-2])
        pv = (
            pk
            if proj_v is None
            else _check_linformer_projection("proj_v", proj_v, q4, k4.shape[-2])
        )
        if pv.shape[-2] != pk.shape[-2]:
            raise ValueError(
                f"proj_k and proj_v must project to the same proj_dim; got proj_k "
                f"{shape_str(pk)}, proj_v {shape_str(pv)}"
            )
        kc, _ = compact_padding(k4, mask)
        vc, _ = compact_padding(v4, mask)
        kc, vc = linear_compress(kc, pk), linear_compress(vc, pv)
    out = projected_attention(q4, kc, vc, scale, dropout_p=dropout_p)
    return out.reshape(*q.shape[:-1], v.shape[-1])
