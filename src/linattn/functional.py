"""Functional attention: validate the inputs, pick the op, restore shape and dtype.

Shape legend (as ``torch.nn.functional.scaled_dot_product_attention``):
``B`` batch, ``H`` heads (any leading dims after the batch are folded into ``H``),
``Lq``/``Lk`` query/key lengths, ``d`` head_dim, ``dv`` value dim, ``m`` projection rows,
``M`` features per token (``m`` or ``2m``), ``w`` the hybrid's window, ``s`` its sink
keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (
    check_key_padding_mask,
    check_positive_int,
    check_qkv,
    check_scale,
    check_tensor,
    is_int,
    shape_str,
)
from ._dtype import compute_dtype
from .features import FeatureMap, Kernel, get_feature_map
from .ops.favor import (
    FavorState,
    favor_bidirectional,
    favor_causal,
    favor_recurrent_step,
    favor_window,
)
from .ops.favor.recurrent import window_ring
from .ops.favor.triton import maybe_favor_triton
from .ops.linformer import compact_padding, linear_compress, projected_attention

__all__ = ["FavorState", "favor_attention", "favor_recurrent", "linformer_attention"]


def _as_4d(x: Tensor) -> Tensor:
    # (..., L, d) -> (B, H, L, d) with the leading dims after the batch folded into H.
    if x.dim() == 2:
        return x.unsqueeze(0).unsqueeze(0)
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, *x.shape[-2:])


def _check_projection(projection: object, fm: FeatureMap, q: Tensor) -> Tensor | None:
    if projection is None:
        if fm.needs_projection:
            raise ValueError(
                f"kernel={fm.name!r} uses random features: pass projection=W of shape "
                f"(num_features, {q.shape[-1]}), e.g. linattn.draw_projection(256, "
                f"{q.shape[-1]})"
            )
        return None
    w = check_tensor("projection", projection, min_dim=2)
    heads = _as_4d(q).shape[1]
    d = q.shape[-1]
    cols = fm.weight_cols(d)
    if (
        w.dim() not in (2, 3)
        or w.shape[-1] != cols
        or w.shape[-2] == 0
        or (w.dim() == 3 and w.shape[0] != heads)
    ):
        what, dims = ("head_dim", f"{d}") if cols == d else ("2 head_dim", f"2*{d}")
        untied = (
            f" (kernel={fm.name!r}: the key and the query projections side by side)"
            if fm.untied
            else ""
        )
        raise ValueError(
            f"projection must have shape (num_features, {what}) = (m, {dims}) with m >= 1, "
            f"or one per head (heads, m, {what}) = ({heads}, m, {dims}){untied}, for q "
            f"{shape_str(q)}, got {shape_str(w)}"
        )
    if w.shape[-2] == 0:
        raise ValueError(f"projection must have at least one row, got {shape_str(w)}")
    if w.device != q.device:
        raise ValueError(f"projection is on {w.device} but q is on {q.device}")
    return w


def _zero_padding(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x: (B, ..., L, d)`` with the positions where ``mask: (B, L)`` is True set to 0.

    A select, not a product (``NaN * 0`` is NaN): padding contents never reach the math.
    """
    if mask is None:
        return x
    return x.masked_fill(mask.view(mask.shape[0], *([1] * (x.dim() - 3)), mask.shape[1], 1), 0)


def _check_window(window: object, causal: bool, q: Tensor, k: Tensor) -> int | None:
    if window is None:
        return None
    if not is_int(window):
        raise TypeError(f"window must be an int >= 0 or None, got {type(window).__name__}")
    window = int(window)
    if window < 0:
        raise ValueError(f"window must be >= 0 (or None for pure linear), got {window}")
    if not causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"window={window} needs Lq == Lk (self-attention: the window is centred on the "
            f"query's own position); got q {shape_str(q)}, k {shape_str(k)}"
        )
    return window


def _check_sinks(sinks: object) -> int:
    if not is_int(sinks):
        raise TypeError(f"sinks must be an int >= 0, got {type(sinks).__name__}")
    sinks = int(sinks)
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0 (0: no sink keys), got {sinks}")
    return sinks


def _check_hybrid_lengths(sinks: int, causal: bool, q: Tensor, k: Tensor) -> None:
    # The bidirectional hybrid (window or sinks) works on blocks of aligned q and k.
    if sinks and not causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"sinks={sinks} needs Lq == Lk (self-attention; the hybrid's blocks pair query "
            f"and key positions); got q {shape_str(q)}, k {shape_str(k)}"
        )


def _check_linear_factor(linear_factor: object, q4: Tensor) -> Tensor | None:
    if linear_factor is None:
        return None
    lf = check_tensor("linear_factor", linear_factor, min_dim=0)
    heads = q4.shape[1]
    if lf.dim() > 1 or (lf.dim() == 1 and lf.shape[0] != heads):
        raise ValueError(
            f"linear_factor must be a scalar tensor or have shape (heads,) = ({heads},), "
            f"got {shape_str(lf)}"
        )
    if lf.device != q4.device:
        raise ValueError(f"linear_factor is on {lf.device} but q is on {q4.device}")
    if not torch.compiler.is_compiling() and bool((lf.detach() < 0).any()):
        raise ValueError("linear_factor must be non-negative (e.g. sigmoid of a logit)")
    return lf.to(q4.dtype)


def _prepare(q, k, v, projection, kernel, causal, key_padding_mask, scale):
    q, k, v = check_qkv(q, k, v)
    fm = get_feature_map(kernel)
    weight = _check_projection(projection, fm, q)
    mask = check_key_padding_mask(key_padding_mask, k)
    # Padded keys/values may hold anything (NaN, inf, 1e30): zero them before any use.
    k, v = _zero_padding(k, mask), _zero_padding(v, mask)
    scale = check_scale(scale, q.shape[-1])
    if causal and not fm.causal_ok:
        raise ValueError(
            f"kernel={kernel!r} depends on every query and key of the call, so it cannot be "
            "causal; use kernel='softmax' or 'softmax_hyp' with causal=True"
        )
    cdt = compute_dtype(q.dtype)
    q4, k4, v4 = (_as_4d(t).to(cdt) for t in (q, k, v))
    if mask is not None:
        # Padded keys and values take no part, whatever they hold (NaN and inf included):
        # zeroed here so that no 0 * NaN reaches a sum.
        pad = mask[:, None, :, None]
        k4, v4 = k4.masked_fill(pad, 0.0), v4.masked_fill(pad, 0.0)
    w = None if weight is None else weight.to(cdt)
    params = fm.prepare(w, q4, k4, mask, scale)
    return fm, params, q4, k4, v4, mask


def favor_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor | None = None,
    *,
    kernel: Kernel = "softmax",
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    linear_factor: Tensor | None = None,
    chunk_size: int = 64,
    block_size: int | None = None,
    sinks: int = 0,
) -> Tensor:
    """FAVOR+ attention: softmax attention approximated by random features, O(L) time;
    optionally the sliding-window hybrid (exact softmax near the diagonal and for the
    first ``sinks`` keys).

    Args:
        q: ``(..., Lq, d)``; k: ``(..., Lk, d)``; v: ``(..., Lk, dv)``; leading dims
            ``(B, H)`` as in ``scaled_dot_product_attention`` (any number >= 0; the
            dims after the batch are the heads ``H``).
        projection: ``W: (m, d)`` shared by the heads, or ``(H, m, d)`` one per head;
            from :func:`linattn.draw_projection` for the random-feature kernels
            (required), a learned matrix for ``"hedgehog"`` (None = identity); optional
            for ``"relu"``/``"elu"``. ``"hedgehog_untied"`` takes ``(m, 2d)`` or
            ``(H, m, 2d)``: the key and the query projections side by side,
            ``[W_k, W_q]``.
        kernel: ``"softmax"`` (positive features, FAVOR+), ``"softmax_hyp"``
            (hyperbolic), ``"softmax_opt"`` (FAVOR++, bidirectional only),
            ``"softmax_trig"`` (trigonometric), ``"relu"``, ``"elu"``, ``"hedgehog"``
            (learned softmax features), ``"hedgehog_untied"`` (one learned map for the
            queries, another for the keys); formulas in :mod:`linattn.features`.
        causal: query ``i`` attends to keys ``j <= i`` (needs ``Lq == Lk``).
        key_padding_mask: ``(B, Lk)`` bool, True marks padding to ignore (its keys and
            values may hold anything, NaN included).
        scale: logit scale, default ``1 / sqrt(d)``.
        window: None: pure linear attention. ``w >= 0``: the hybrid; query ``i`` scores
            the keys with ``|i - j| <= w`` (needs ``Lq == Lk``), or ``i - w < j <= i``
            when causal, with the exact ``exp(scale q_i.k_j)``, and every other key with
            ``linear_factor[h] * phi(q~_i).phi(k~_j)``, under one normalizer. Time and
            memory O(L (w + m)). ``w >= L`` is exact softmax attention.
        linear_factor: None (= 1), or a non-negative tensor of shape ``(H,)`` or ``()``
            weighting the far (feature) scores of each head; differentiable. Used only
            by the hybrid, a window or ``sinks > 0`` (without either every score is far
            and it cancels).
        chunk_size: causal chunk length (a speed knob; results agree up to rounding).
        block_size: rows per block in the bidirectional pass, or per block of the
            window's exact band (default: automatic).
        sinks: ``s >= 0`` attention-sink keys: the first ``s`` unpadded keys of each
            sequence (a left-padded sequence's first real tokens, so outputs stay
            padding-invariant) are scored with the exact ``exp(scale q_i.k_j)`` by every
            query that sees them (``j <= i`` when causal), inside its window or not, and
            leave the linear part. With ``window=None`` the sinks are the only exact keys
            (the hybrid with no band). ``0``: no sinks (the plain window hybrid, or pure
            linear attention). Needs ``Lq == Lk``. Time and memory O(L (w + m + s)).

    Returns:
        ``(..., Lq, dv)`` in q's dtype. Float16/bfloat16 inputs compute in float32.

    With ``x~ = x * sqrt(scale)`` and ``phi`` the kernel's feature map (``phi_q`` for
    the queries and ``phi_k`` for the keys of the untied maps), equivalent to::

        A = phi(q~) @ phi(k~).transpose(-2, -1)      # (..., Lq, Lk)
        if window is not None or sinks:
            i, j = arange(Lq)[:, None], arange(Lk)[None, :]
            near = (i - window < j) & (j <= i) if causal else (i - j).abs() <= window
            # (near = False everywhere when window is None)
            real = ~key_padding_mask                  # (B, Lk)
            sink = real & (real.cumsum(-1) <= sinks)  # first `sinks` real keys
            near = near | sink[:, None, None, :]
            A = where(near, exp(scale * q @ k.transpose(-2, -1)),
                      linear_factor[:, None, None] * A)
        A = A.masked_fill(key_padding_mask[:, None, None, :], 0)
        if causal: A = A.tril()
        out = (A @ v) / A.sum(-1, keepdim=True)      # rows with no visible key: 0

    For ``kernel="softmax"``, ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` and
    ``phi(q~).phi(k~)`` is an unbiased estimate of ``exp(scale * q.k)`` (so with
    ``linear_factor=None`` the hybrid is unbiased too, and exact inside the window).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_positive_int("chunk_size", chunk_size)
    if block_size is not None:
        check_positive_int("block_size", block_size)
    sinks = _check_sinks(sinks)
    if (
        causal
        and isinstance(q, Tensor)
        and isinstance(k, Tensor)
        and q.dim() >= 2
        and (k.dim() >= 2 and q.shape[-2] != k.shape[-2])
    ):
        raise ValueError(
            f"causal=True needs Lq == Lk (self-attention); got q {shape_str(q)}, k {shape_str(k)}"
        )
    # Fused Triton kernels for CUDA tensors (ops/favor/triton); None: not covered, eager.
    # locals() = every argument, so new ones (e.g. window) send the call to the eager path;
    # sinks=0 is "no sinks" (None to the kernels), which they cover.
    fast = maybe_favor_triton(**{**locals(), "sinks": sinks or None})
    if fast is not None:
        return fast
    fm, params, q4, k4, v4, mask = _prepare(
        q, k, v, projection, kernel, causal, key_padding_mask, scale
    )
    window = _check_window(window, causal, q, k)
    _check_hybrid_lengths(sinks, causal, q, k)
    lf = _check_linear_factor(linear_factor, q4)
    if window is not None or sinks:
        out = favor_window(
            q4,
            k4,
            v4,
            fm,
            params,
            window=window,
            causal=causal,
            linear_factor=lf,
            key_padding_mask=mask,
            chunk_size=chunk_size,
            block_size=block_size,
            sinks=sinks,
        )
    elif causal:
        out = favor_causal(q4, k4, v4, fm, params, key_padding_mask=mask, chunk_size=chunk_size)[0]
    else:
        out = favor_bidirectional(
            q4, k4, v4, fm, params, key_padding_mask=mask, block_size=block_size
        )
    return out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype)


def favor_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor | None = None,
    *,
    state: FavorState | None = None,
    kernel: Kernel = "softmax",
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    window: int | None = None,
    linear_factor: Tensor | None = None,
    sinks: int = 0,
) -> tuple[Tensor, FavorState]:
    """Causal FAVOR+ decoding step: consume ``n`` new tokens after ``state``.

    Args:
        q, k: ``(B, H, n, d)``; v: ``(B, H, n, dv)``; the ``n >= 1`` new tokens (attending
            causally among themselves and to everything in ``state``).
        state: from the previous step, or None to start.
        projection, kernel, key_padding_mask (``(B, n)``), scale, window,
            linear_factor: as :func:`favor_attention`; use the same values at every step.
            With a window the state also carries the last ``window`` keys and values
            (and their padding): :class:`FavorState` ``keys``/``values``/``padding``.
        sinks: as :func:`favor_attention` (the same value at every step). With
            ``sinks > 0`` the state also carries the sinks that have left the window and
            the number of real keys consumed per sequence (:class:`FavorState`
            ``sink_keys``/``sink_values``/``sink_padding``/``seen``); with
            ``window=None`` the window part of the state is empty (window 0).

    Returns:
        ``(out: (B, H, n, dv), new_state)``. Time and memory per token do not depend on
        how many tokens the state has absorbed. Running it token by token (or ``n`` at a
        time) equals ``favor_attention(..., causal=True, window=window, sinks=sinks)``
        on the concatenated tokens.
    """
    q, k, v = check_qkv(q, k, v)
    if q.dim() != 4 or q.shape[-2] != k.shape[-2]:
        raise ValueError(
            "favor_recurrent takes q, k, v of shape (B, H, n, d) with the same n; got "
            f"q {shape_str(q)}, k {shape_str(k)}"
        )
    fm, params, q4, k4, v4, mask = _prepare(
        q, k, v, projection, kernel, True, key_padding_mask, scale
    )
    window = _check_window(window, True, q, k)
    sinks = _check_sinks(sinks)
    lf = _check_linear_factor(linear_factor, q4)
    if state is not None:
        state = _check_state(state, fm, params, q, v, window, q4.dtype, sinks)
    out, new_state = favor_recurrent_step(
        q4,
        k4,
        v4,
        state,
        fm,
        params,
        key_padding_mask=mask,
        window=window,
        linear_factor=lf,
        sinks=sinks,
    )
    return out.to(q.dtype), new_state


def _check_state(state, fm, params, q, v, window, dtype, sinks=0) -> FavorState:
    if not isinstance(state, FavorState):
        raise TypeError(f"state must be a FavorState or None, got {type(state).__name__}")
    m = fm.feature_dim(params.weight, q.shape[-1])
    want = (*q.shape[:2], m, v.shape[-1] + 1)
    for name, t in (("state.kv", state.kv), ("state.stab", state.stab)):
        check_tensor(name, t, min_dim=0)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if tuple(state.kv.shape) != want:
        raise ValueError(
            f"state.kv must have shape (B, H, M, dv + 1) = {want}, got {shape_str(state.kv)}"
        )
    if tuple(state.stab.shape) != want[:2]:
        raise ValueError(
            f"state.stab must have shape (B, H) = {want[:2]}, got {shape_str(state.stab)}"
        )
    if window is None and not sinks:
        if state.keys is not None:
            raise ValueError("state carries a window's keys but window=None was passed")
        if state.sink_keys is not None:
            raise ValueError("state carries sink keys but sinks=0 was passed")
        return FavorState(state.kv.to(dtype), state.stab.to(dtype))
    # sinks without a window: the hybrid's state with an empty window.
    band = window_ring(state, 0 if window is None else window)
    bsz, heads = q.shape[:2]
    shapes = {
        "keys": (state.keys, (bsz, heads, band, q.shape[-1])),
        "values": (state.values, (bsz, heads, band, v.shape[-1])),
        "padding": (state.padding, (bsz, band)),
    }
    if sinks:
        shapes.update(
            {
                "sink_keys": (state.sink_keys, (bsz, heads, sinks, q.shape[-1])),
                "sink_values": (state.sink_values, (bsz, heads, sinks, v.shape[-1])),
                "sink_padding": (state.sink_padding, (bsz, sinks)),
                "seen": (state.seen, (bsz,)),
            }
        )
    elif state.sink_keys is not None:
        raise ValueError("state carries sink keys but sinks=0 was passed")
    for name, (t, shape) in shapes.items():
        if t is None or tuple(t.shape) != shape:
            got = "None" if t is None else shape_str(t)
            raise ValueError(
                f"state.{name} must have shape {shape} for window={window}, sinks={sinks}, "
                f"got {got} (pass the state returned by the previous step with the same "
                "window and sinks)"
            )
    fields = [
        state.kv.to(dtype),
        state.stab.to(dtype),
        state.keys.to(dtype),
        state.values.to(dtype),
        state.padding,
    ]
    if sinks:
        fields += [
            state.sink_keys.to(dtype),
            state.sink_values.to(dtype),
            state.sink_padding,
            state.seen,
        ]
    return FavorState(*fields)


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

    Returns:
        ``(..., Lq, dv)``. Linformer is not causal: a projection along the sequence mixes
        future keys into every compressed position, so there is no causal form.

    Equivalent to, per sequence with real keys ``K``, ``V`` (``len`` rows)::

        K' = proj_k[..., :len] @ K;  V' = proj_v[..., :len] @ V   # compressed: K' = k
        out = softmax(q @ K'.T * scale) @ V'
    """
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
