"""Functional attention: validate the inputs, pick the op, restore shape and dtype.

Shape legend (as ``torch.nn.functional.scaled_dot_product_attention``):
``B`` batch, ``H`` heads (any leading dims after the batch are folded into ``H``),
``Lq``/``Lk`` query/key lengths, ``d`` head_dim, ``dv`` value dim, ``m`` projection rows,
``M`` features per token (``m`` or ``2m``), ``w`` the hybrid's window, ``s`` its sink
keys.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._checks import (
    check_cu_seqlens,
    check_key_padding_mask,
    check_positive_int,
    check_qkv,
    check_scale,
    check_tensor,
    is_int,
    shape_str,
)
from ._dispatch import Backend, FavorCall, dispatch
from ._dtype import compute_dtype
from .features import FeatureMap, Kernel, get_feature_map
from .ops.favor import (
    FavorState,
    empty_window_state,
    favor_bidirectional,
    favor_causal,
    favor_recurrent_step,
    favor_window,
)
from .ops.favor import triton as favor_triton
from .ops.favor.causal import initial_state
from .ops.favor.recurrent import window_ring
from .ops.favor.window.step import window_final_state
from .ops.linformer import compact_padding, linear_compress, projected_attention

__all__ = [
    "FavorState",
    "favor_attention",
    "favor_recurrent",
    "linformer_attention",
    "packed_positions",
]


def _as_4d(x: Tensor) -> Tensor:
    # (..., L, d) -> (B, H, L, d) with the leading dims after the batch folded into H.
    if x.dim() == 2:
        return x.unsqueeze(0).unsqueeze(0)
    if x.dim() == 3:
        return x.unsqueeze(1)
    # The head count spelled out, not -1: an empty batch (B = 0) has no elements to infer
    # it from.
    return x.reshape(x.shape[0], math.prod(x.shape[1:-2]), *x.shape[-2:])


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
    if not torch.compiler.is_compiling() and not _factor_checked(lf):
        # NaN fails every comparison, so `lf >= 0` alone lets it through: check finiteness.
        # One host synchronization for both conditions; the message tells which failed.
        bad = lf.detach()
        if not bool((torch.isfinite(bad) & (bad >= 0)).all()):
            if not bool(torch.isfinite(bad).all()):
                raise ValueError(
                    "linear_factor must be finite (e.g. exp of a finite log-weight), got "
                    f"{bad.tolist()}"
                )
            raise ValueError(
                f"linear_factor must be non-negative (e.g. exp of a log-weight), got {bad.tolist()}"
            )
        _remember_factor(lf)
    return lf.to(q4.dtype)


#: linear_factor tensors found finite and non-negative, each with its version counter
#: then: a decoding loop passes the same tensor at every token and layer step, and
#: checking it again would cost a host synchronization per call. Any in-place change
#: bumps the version and the tensor is checked again.
_CHECKED_FACTORS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _tensor_version(t: Tensor) -> int | None:
    """``t``'s version counter, or None for tensors without one (inference tensors)."""
    if t.is_inference():
        return None
    return t._version


def _factor_checked(lf: Tensor) -> bool:
    version = _tensor_version(lf)
    return version is not None and _CHECKED_FACTORS.get(lf) == version


def _remember_factor(lf: Tensor) -> None:
    version = _tensor_version(lf)
    if version is not None:
        _CHECKED_FACTORS[lf] = version


def _checked_inputs(q, k, v, key_padding_mask) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v checked (:func:`check_qkv`, the mask's shape) with the padded keys and
    values zeroed: the one place padding is zeroed, before any path sees the inputs.
    Padded keys and values may hold anything (NaN, inf, 1e30) and take no part."""
    q, k, v = check_qkv(q, k, v)
    mask = check_key_padding_mask(key_padding_mask, k)
    return q, _zero_padding(k, mask), _zero_padding(v, mask)


def _prepare(q, k, v, projection, kernel, causal, key_padding_mask, scale):
    """Feature map, its per-call parameters and the inputs as ``(B, H, L, d)`` in the
    compute dtype, for q, k, v from :func:`_checked_inputs`."""
    q, k, v = check_qkv(q, k, v)
    fm = get_feature_map(kernel)
    weight = _check_projection(projection, fm, q)
    # k and v come with their padding zeroed (_checked_inputs, once per call).
    mask = check_key_padding_mask(key_padding_mask, k)
    scale = check_scale(scale, q.shape[-1])
    if causal and not fm.causal_ok:
        raise ValueError(
            f"kernel={kernel!r} depends on every query and key of the call, so it cannot be "
            "causal; use kernel='softmax' or 'softmax_hyp' with causal=True"
        )
    cdt = compute_dtype(q.dtype)
    q4, k4, v4 = (_as_4d(t).to(cdt) for t in (q, k, v))
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
    cu_seqlens: Tensor | None = None,
    initial_state: FavorState | None = None,
    output_final_state: bool = False,
) -> Tensor | tuple[Tensor, FavorState]:
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
        cu_seqlens: None, or int32 ``(N + 1,)`` offsets ``0 = c_0 <= c_1 <= ... <= c_N =
            T`` of ``N`` sequences packed back to back in q, k, v of shape ``(1, H, T,
            d)`` (FlashAttention's varlen convention): sequence ``i`` is the tokens
            ``c_i .. c_{i+1} - 1``, and the result equals each sequence run alone (every
            form: bidirectional, causal, window, sinks, every kernel; data-dependent
            feature parameters such as FAVOR++'s are each sequence's own). No padding is
            materialized: each sequence runs through the op on its own slice (a loop over
            the ``N`` sequences, O(T) work in all plus ``N`` calls' overhead); sequences of
            length 0 are allowed. The offsets are read on the host (one device
            synchronization per call). Not with ``key_padding_mask``. With ``initial_state`` /
            ``output_final_state`` the state holds one row per sequence (batch ``N``).
        initial_state: causal only: a :class:`FavorState` for the tokens before these
            (from a previous call with ``output_final_state=True``, or from
            :func:`favor_recurrent`), with the same projection, kernel, scale, window and
            sinks. Prefilling a long prompt in pieces of any size equals one call, and
            the final state continues by further pieces or by :func:`favor_recurrent`.
        output_final_state: also return the state after the last token (causal only).
            Without a window or sinks the state is carried through the chunked causal
            scan (the same fast path, O(L m dv)). With a window or sinks and no
            ``initial_state`` (a prefill) the call runs the parallel hybrid (the
            stateless path) and builds the state from the keys and values (the far sums
            of the keys older than the window in one O(L m dv) product, the ring of the
            last ``min(w, L)`` tokens, the sink slots); with an ``initial_state`` it runs
            the decoding step's machinery (the band by ``unfold``, the far part by the
            chunked causal scan under plain autograd, the sinks gathered; one token: a
            dedicated step of a few tensor ops): exact and O(L (w + m + s)).

    Returns:
        ``(..., Lq, dv)`` in q's dtype. Float16/bfloat16 inputs compute in float32.
        With ``output_final_state=True`` a pair ``(out, state)``; the state is in the
        compute dtype (float32 for half inputs).

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
    if not isinstance(output_final_state, bool):
        raise TypeError(
            f"output_final_state must be a bool, got {type(output_final_state).__name__}"
        )
    stateful = initial_state is not None or output_final_state
    if stateful and not causal:
        raise ValueError(
            "initial_state / output_final_state need causal=True: a state holds the keys "
            "before the call, and a bidirectional query also sees keys after it"
        )
    if cu_seqlens is None:
        q, k, v = _checked_inputs(q, k, v, key_padding_mask)
    call = FavorCall(
        q=q,
        k=k,
        v=v,
        projection=projection,
        kernel=kernel,
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        window=window,
        linear_factor=linear_factor,
        chunk_size=chunk_size,
        block_size=block_size,
        sinks=sinks,
        cu_seqlens=cu_seqlens,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    return dispatch(call, BACKENDS)


def _favor_packed(call: FavorCall) -> Tensor | tuple[Tensor, FavorState]:
    """``cu_seqlens``: each packed sequence through ``favor_attention`` alone."""
    stateful = call.initial_state is not None or call.output_final_state
    offsets = _check_cu_seqlens(call.cu_seqlens, call.q, call.k, call.v, call.key_padding_mask)
    options = call.options()
    for name in ("cu_seqlens", "initial_state", "output_final_state", "key_padding_mask"):
        del options[name]

    def run(qs, ks, vs, st):
        if not stateful:
            return favor_attention(qs, ks, vs, call.projection, **options), None
        return favor_attention(
            qs, ks, vs, call.projection, **options, initial_state=st, output_final_state=True
        )

    result = _run_packed_favor(
        offsets,
        call.q,
        call.k,
        call.v,
        run,
        state=call.initial_state,
        stateful=stateful,
        projection=call.projection,
        kernel=call.kernel,
        window=call.window,
        sinks=call.sinks,
        state_name="initial_state",
    )
    return result[0] if stateful and not call.output_final_state else result


def _favor_call_stateful(call: FavorCall) -> Tensor | tuple[Tensor, FavorState]:
    out, state = _favor_stateful(
        call.q,
        call.k,
        call.v,
        call.projection,
        call.initial_state,
        kernel=call.kernel,
        key_padding_mask=call.key_padding_mask,
        scale=call.scale,
        window=call.window,
        linear_factor=call.linear_factor,
        chunk_size=call.chunk_size,
        sinks=call.sinks,
    )
    return (out, state) if call.output_final_state else out


def _eager(call: FavorCall, op) -> Tensor:
    """An eager path: ``op(q4, k4, v4, fm, params, mask, window, linear_factor)`` on the
    prepared ``(B, H, L, d)`` inputs; the result back in q's shape and dtype."""
    q, k, v = call.q, call.k, call.v
    fm, params, q4, k4, v4, mask = _prepare(
        q, k, v, call.projection, call.kernel, call.causal, call.key_padding_mask, call.scale
    )
    window = _check_window(call.window, call.causal, q, k)
    _check_hybrid_lengths(call.sinks, call.causal, q, k)
    lf = _check_linear_factor(call.linear_factor, q4)
    out = op(q4, k4, v4, fm, params, mask, window, lf)
    return out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype)


def _run_hybrid(call: FavorCall) -> Tensor:
    def op(q4, k4, v4, fm, params, mask, window, lf):
        return favor_window(
            q4,
            k4,
            v4,
            fm,
            params,
            window=window,
            causal=call.causal,
            linear_factor=lf,
            key_padding_mask=mask,
            chunk_size=call.chunk_size,
            block_size=call.block_size,
            sinks=call.sinks,
        )

    return _eager(call, op)


def _run_causal(call: FavorCall) -> Tensor:
    def op(q4, k4, v4, fm, params, mask, window, lf):
        return favor_causal(
            q4, k4, v4, fm, params, key_padding_mask=mask, chunk_size=call.chunk_size
        )[0]

    return _eager(call, op)


def _run_bidirectional(call: FavorCall) -> Tensor:
    def op(q4, k4, v4, fm, params, mask, window, lf):
        return favor_bidirectional(
            q4, k4, v4, fm, params, key_padding_mask=mask, block_size=call.block_size
        )

    return _eager(call, op)


def _unless(flag, reason: str) -> list[str]:
    return [] if flag else [reason]


#: favor_attention's paths, in order: the first whose reasons are empty runs.
BACKENDS = [
    Backend(
        "packed",
        lambda c: _unless(c.cu_seqlens is not None, "no cu_seqlens"),
        _favor_packed,
    ),
    Backend(
        "stateful",
        lambda c: _unless(
            c.initial_state is not None or c.output_final_state,
            "no initial_state or output_final_state",
        ),
        _favor_call_stateful,
    ),
    Backend("triton", favor_triton.not_supported_reasons, favor_triton.run),
    Backend(
        "eager-hybrid",
        lambda c: _unless(c.window is not None or c.sinks, "no window and no sinks"),
        _run_hybrid,
    ),
    Backend("eager-causal", lambda c: _unless(c.causal, "not causal"), _run_causal),
    Backend("eager-bidirectional", lambda c: [], _run_bidirectional),
]


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
    cu_seqlens: Tensor | None = None,
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
        cu_seqlens: None, or int32 ``(N + 1,)`` offsets of ``N`` sequences packed in q, k,
            v of shape ``(1, H, T, d)`` (as :func:`favor_attention`): sequence ``i``
            continues its own state, row ``i`` of a batch-``N`` ``state``, by its
            ``c_{i+1} - c_i >= 0`` new tokens (a sequence with none keeps its state).
            A loop over the sequences.

    Returns:
        ``(out: (B, H, n, dv), new_state)``. Time and memory per token do not depend on
        how many tokens the state has absorbed. Running it token by token (or ``n`` at a
        time) equals ``favor_attention(..., causal=True, window=window, sinks=sinks)``
        on the concatenated tokens, and equals
        ``favor_attention(..., causal=True, initial_state=state, output_final_state=True)``
        (the same function).
    """
    if cu_seqlens is not None:
        offsets = _check_cu_seqlens(cu_seqlens, q, k, v, key_padding_mask)
        options = dict(
            kernel=kernel, scale=scale, window=window, linear_factor=linear_factor, sinks=sinks
        )

        def run(qs, ks, vs, st):
            return favor_recurrent(qs, ks, vs, projection, state=st, **options)

        return _run_packed_favor(
            offsets,
            q,
            k,
            v,
            run,
            state=state,
            stateful=True,
            projection=projection,
            kernel=kernel,
            window=window,
            sinks=sinks,
            state_name="state",
        )
    q, k, v = _checked_inputs(q, k, v, key_padding_mask)
    if q.dim() != 4 or q.shape[-2] != k.shape[-2]:
        raise ValueError(
            "favor_recurrent takes q, k, v of shape (B, H, n, d) with the same n; got "
            f"q {shape_str(q)}, k {shape_str(k)}"
        )
    return _favor_stateful(
        q,
        k,
        v,
        projection,
        state,
        kernel=kernel,
        key_padding_mask=key_padding_mask,
        scale=scale,
        window=window,
        linear_factor=linear_factor,
        chunk_size=min(64, q.shape[-2]),
        sinks=sinks,
        state_name="state",
    )


def _favor_stateful(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    projection: Tensor | None,
    state: FavorState | None,
    *,
    kernel: Kernel,
    key_padding_mask: Tensor | None,
    scale: float | None,
    window: int | None,
    linear_factor: Tensor | None,
    chunk_size: int,
    sinks: int,
    state_name: str = "initial_state",
) -> tuple[Tensor, FavorState]:
    """The causal forms with a state carried in and out (``favor_attention`` with
    ``initial_state`` / ``output_final_state``, and ``favor_recurrent``).

    Shapes: ``q, k: (..., L, d)``, ``v: (..., L, dv)``; the state's ``(B, H)`` are q's
    batch and folded heads. Returns ``(out: (..., L, dv)`` in q's dtype, the state after
    the last token ``)``. Plain causal: the chunked scan carries the state
    (:func:`favor_causal`); window or sinks: the decoding step
    (:func:`favor_recurrent_step`).
    """
    fm, params, q4, k4, v4, mask = _prepare(
        q, k, v, projection, kernel, True, key_padding_mask, scale
    )
    window = _check_window(window, True, q, k)
    sinks = _check_sinks(sinks)
    lf = _check_linear_factor(linear_factor, q4)
    if state is not None:
        m = fm.feature_dim(params.weight, q.shape[-1])
        state = _check_state(state, m, q4, v4.shape[-1], window, sinks, name=state_name)
    if window is None and not sinks:
        initial = None if state is None else (state.kv, state.stab)
        out, kv, stab = favor_causal(
            q4, k4, v4, fm, params, key_padding_mask=mask, chunk_size=chunk_size, initial=initial
        )
        new_state = FavorState(kv=kv, stab=stab)
    elif state is None and q4.shape[-2] > 1:
        # A prefill (no state before it): the parallel hybrid for the outputs, the state
        # from the keys and values alone; the decoding step is its reference.
        out = favor_window(
            q4,
            k4,
            v4,
            fm,
            params,
            window=window,
            causal=True,
            linear_factor=lf,
            key_padding_mask=mask,
            chunk_size=chunk_size,
            sinks=sinks,
        )
        fields = window_final_state(
            k4,
            v4,
            fm,
            params,
            window=0 if window is None else window,
            key_padding_mask=mask,
            sinks=sinks,
        )
        new_state = FavorState(*fields)
    else:
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
    return out.reshape(*q.shape[:-1], v.shape[-1]).to(q.dtype), new_state


def _favor_state_of(
    k: Tensor,
    v: Tensor,
    projection: Tensor | None,
    *,
    kernel: Kernel,
    key_padding_mask: Tensor | None,
    scale: float | None,
    window: int | None,
    sinks: int,
) -> FavorState:
    """The window hybrid's state after the keys ``k: (B, H, L, d)`` and values ``v: (B, H,
    L, dv)`` alone (a prefill whose outputs nobody reads, e.g. a lazy cache's fold): the
    final state of ``favor_attention(q, k, v, causal=True, window=window, sinks=sinks,
    output_final_state=True)`` for any ``q``, without its O(L w) band. Window or sinks
    only; ``L >= 1``."""
    q, k, v = _checked_inputs(k.new_zeros(k.shape), k, v, key_padding_mask)
    fm, params, _, k4, v4, mask = _prepare(
        q, k, v, projection, kernel, True, key_padding_mask, scale
    )
    window = _check_window(window, True, q, k)
    fields = window_final_state(
        k4,
        v4,
        fm,
        params,
        window=0 if window is None else window,
        key_padding_mask=mask,
        sinks=_check_sinks(sinks),
    )
    return FavorState(*fields)


def _check_state(
    state: object,
    m: int,
    q4: Tensor,
    dv: int,
    window: int | None,
    sinks: int,
    *,
    name: str = "state",
    dtype: torch.dtype | None = None,
) -> FavorState:
    """``state`` checked against the call (``q4: (B, H, L, d)``, ``M = m`` features per
    token, value width ``dv``, the window and sinks), its tensors cast to ``dtype``
    (default q4's)."""
    if not isinstance(state, FavorState):
        raise TypeError(f"{name} must be a FavorState or None, got {type(state).__name__}")
    bsz, heads, _, d = q4.shape
    dtype = dtype or q4.dtype
    want = (bsz, heads, m, dv + 1)
    for field in ("kv", "stab"):
        t = getattr(state, field)
        check_tensor(f"{name}.{field}", t, min_dim=0)
        if t.device != q4.device:
            raise ValueError(f"{name}.{field} is on {t.device} but q is on {q4.device}")
    if tuple(state.kv.shape) != want:
        raise ValueError(
            f"{name}.kv must have shape (B, H, M, dv + 1) = {want}, got {shape_str(state.kv)}"
        )
    if tuple(state.stab.shape) != want[:2]:
        raise ValueError(
            f"{name}.stab must have shape (B, H) = {want[:2]}, got {shape_str(state.stab)}"
        )
    if window is None and not sinks:
        if state.keys is not None:
            raise ValueError(f"{name} carries a window's keys but window=None was passed")
        if state.sink_keys is not None:
            raise ValueError(f"{name} carries sink keys but sinks=0 was passed")
        return FavorState(kv=state.kv.to(dtype), stab=state.stab.to(dtype))
    # sinks without a window: the hybrid's state with an empty window.
    band = window_ring(state, 0 if window is None else window)
    shapes = {
        "keys": (bsz, heads, band, d),
        "values": (bsz, heads, band, dv),
        "padding": (bsz, band),
    }
    if sinks:
        shapes.update(
            {
                "sink_keys": (bsz, heads, sinks, d),
                "sink_values": (bsz, heads, sinks, dv),
                "sink_padding": (bsz, sinks),
                "seen": (bsz,),
            }
        )
    elif state.sink_keys is not None:
        raise ValueError(f"{name} carries sink keys but sinks=0 was passed")
    for field, shape in shapes.items():
        t = getattr(state, field)
        if t is None or tuple(t.shape) != shape:
            got = "None" if t is None else shape_str(t)
            raise ValueError(
                f"{name}.{field} must have shape {shape} for window={window}, sinks={sinks}, "
                f"got {got} (pass the state returned by the previous call with the same "
                "window and sinks)"
            )
    floating = ("kv", "stab", "keys", "values", "sink_keys", "sink_values")
    return state._replace(
        **{f: getattr(state, f).to(dtype) for f in floating if getattr(state, f) is not None}
    )


def _check_cu_seqlens(
    cu_seqlens: object, q: object, k: object, v: object, key_padding_mask: object
) -> list[int]:
    """Validate packed-sequence offsets for q, k, v of shape ``(1, H, T, d)``
    (:func:`~linattn._checks.check_cu_seqlens`); returns them as Python ints."""
    if key_padding_mask is not None:
        raise ValueError(
            "cu_seqlens and key_padding_mask cannot be combined: packed sequences hold no "
            "padding (pass the sequences back to back instead)"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, min_dim=0)
        if t.dim() != 4 or t.shape[0] != 1:
            raise ValueError(
                f"with cu_seqlens, {name} must have shape (1, H, T, d): the sequences packed "
                f"along T in a batch of 1, got {shape_str(t)}"
            )
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(
            "with cu_seqlens, q, k and v must have the same length T (each sequence attends "
            f"to itself); got q {shape_str(q)}, k {shape_str(k)}, v {shape_str(v)}"
        )
    return check_cu_seqlens(cu_seqlens, q.shape[2], q.device)


def packed_positions(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """Each token's position inside its own sequence, ``(T,)`` long, for packed
    ``cu_seqlens`` (int32 ``(N + 1,)``, see :func:`favor_attention`): ``[0, 1, .., n_0 -
    1, 0, 1, .., n_1 - 1, ...]``. ``total``: the packed length T (default
    ``cu_seqlens[-1]``, checked when given)."""
    if total is None and isinstance(cu_seqlens, Tensor) and cu_seqlens.numel():
        total = int(cu_seqlens[-1])
    device = cu_seqlens.device if isinstance(cu_seqlens, Tensor) else None
    offsets = check_cu_seqlens(cu_seqlens, total, device)
    starts = torch.tensor(offsets[:-1], device=device)
    lengths = torch.tensor(offsets, device=device).diff()
    pos = torch.arange(offsets[-1], device=device)
    return pos - starts.repeat_interleave(lengths, output_size=offsets[-1])


def _state_row(state: FavorState, i: int) -> FavorState:
    """Row ``i`` of a batched state, as a batch of one (named fields, no tuple slicing)."""
    return state._replace(**{f: t[i : i + 1] for f, t in state._asdict().items() if t is not None})


def _cat_states(states: list[FavorState]) -> FavorState:
    """States of batch 1 (or more) stacked along the batch axis. The window rings hold
    ``min(w, tokens seen)`` slots, so sequences of different lengths have rings of
    different lengths: the shorter rings are padded in front (their oldest end) with
    empty slots (``padding`` True), which the decoding step treats as keys never seen."""
    if states[0].keys is not None:
        ring = max(st.keys.shape[-2] for st in states)
        states = [_pad_ring(st, ring) for st in states]
    fields = {}
    for f in FavorState._fields:
        parts = [getattr(st, f) for st in states]
        fields[f] = None if parts[0] is None else torch.cat(parts, dim=0)
    return FavorState(**fields)


def _pad_ring(state: FavorState, ring: int) -> FavorState:
    """``state`` with its window ring (``keys: (B, H, r, d)``) grown to ``ring`` slots by
    empty slots in front."""
    extra = ring - state.keys.shape[-2]
    if extra == 0:
        return state
    return state._replace(
        keys=F.pad(state.keys, (0, 0, extra, 0)),
        values=F.pad(state.values, (0, 0, extra, 0)),
        padding=F.pad(state.padding, (extra, 0), value=True),
    )


def _empty_state(
    kernel: Kernel, projection: Tensor | None, q: Tensor, v: Tensor, window, sinks
) -> FavorState:
    """The state before any token for one sequence of packed ``q: (1, H, T, d)``."""
    fm = get_feature_map(kernel)
    heads, d, dv = q.shape[1], q.shape[-1], v.shape[-1]
    m = fm.feature_dim(projection, d)
    cdt = compute_dtype(q.dtype)
    window = _check_window(window, True, q, q)
    sinks = _check_sinks(sinks)
    if window is None and not sinks:
        kv, stab = initial_state((1, heads), m, dv, dtype=cdt, device=q.device)
        return FavorState(kv=kv, stab=stab)
    band = 0 if window is None else window
    return empty_window_state(1, heads, m, d, dv, band, dtype=cdt, device=q.device, sinks=sinks)


def _run_packed(offsets: list[int], q: Tensor, k: Tensor, v: Tensor, run) -> Tensor:
    """``run(i, q_i, k_i, v_i) -> out_i`` on each packed sequence ``i``, the tokens
    ``c_i .. c_{i+1} - 1`` of ``q, k: (1, H, T, d)``, ``v: (1, H, T, dv)``, concatenated:
    ``(1, H, T, dv)``. A sequence of length 0 adds nothing (and is not run)."""
    outs = [
        run(i, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
        for i, (s, e) in enumerate(itertools.pairwise(offsets))
        if e > s
    ]
    if not outs:
        return q.new_zeros(*q.shape[:-1], v.shape[-1])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _run_packed_favor(
    offsets: list[int],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    run,
    *,
    state: FavorState | None,
    stateful: bool,
    projection: Tensor | None,
    kernel: Kernel,
    window: int | None,
    sinks: int,
    state_name: str,
):
    """:func:`_run_packed` for FAVOR+ with one state row per sequence:
    ``run(q_i, k_i, v_i, state_i) -> (out_i, state_i)`` (``state_i`` None when not
    ``stateful``); ``state``: None or batch ``N``. Returns ``out`` (and, when
    ``stateful``, the states stacked: ``(out, state)``). A sequence of length 0 keeps its
    state (the empty state when none was given)."""
    n = len(offsets) - 1
    if state is not None:
        # Checked whole (one row per sequence, batch N) before any sequence runs, so that
        # the rows of empty sequences, which pass through, are checked and cast too.
        fm = get_feature_map(kernel)
        m = fm.feature_dim(_check_projection(projection, fm, q), q.shape[-1])
        rows = q.new_empty(n, q.shape[1], 0, q.shape[-1])
        state = _check_state(
            state,
            m,
            rows,
            v.shape[-1],
            _check_window(window, True, q, q),
            _check_sinks(sinks),
            name=state_name,
            dtype=compute_dtype(q.dtype),
        )
    rows = [None if state is None else _state_row(state, i) for i in range(n)]

    def one(i, qs, ks, vs):
        out, rows[i] = run(qs, ks, vs, rows[i])
        return out

    out = _run_packed(offsets, q, k, v, one)
    if not stateful:
        return out
    for i, row in enumerate(rows):
        if row is None:
            rows[i] = _empty_state(kernel, projection, q, v, window, sinks)
    return out, _cat_states(rows)


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
