"""Functional attention: validate the inputs, pick the op, restore shape and dtype.

Shape legend (as ``torch.nn.functional.scaled_dot_product_attention``):
``B`` batch, ``H`` heads (any leading dims after the batch are folded into ``H``),
``Lq``/``Lk`` query/key lengths, ``d`` head_dim, ``dv`` value dim, ``m`` projection rows,
``M`` features per token (``m`` or ``2m``), ``w`` the hybrid's window, ``s`` its sink
keys.
"""

from __future__ import annotations

from torch import Tensor

from ._checks import check_positive_int, shape_str
from ._dispatch import Backend, FavorCall, dispatch

# The argument checks, the stateful and packed paths and Linformer live in their own
# modules (_favor_checks, _favor_state, _linformer_functional).
from ._favor_checks import (
    _as_4d,
    _check_cu_seqlens,
    _check_decay,
    _check_far_inputs,
    _check_hybrid_lengths,
    _check_linear_factor,
    _check_sinks,
    _check_window,
    _checked_inputs,
    _expand_kv_groups,
    _far_4d,
    _prepare,
)
from ._favor_state import (
    _favor_stateful,
    _run_packed_favor,
    packed_positions,
)
from ._linformer_functional import linformer_attention
from .features import Kernel
from .ops.favor import (
    FavorState,
    favor_bidirectional,
    favor_causal,
    favor_window,
)
from .ops.favor import triton as favor_triton

__all__ = [
    "FavorState",
    "favor_attention",
    "favor_recurrent",
    "linformer_attention",
    "packed_positions",
]


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
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
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
        decay: None, or ``ln gamma`` of shape ``(H,)`` or ``()``, finite and ``<= 0``
            (a fixed setting: no gradient flows to it):
            the causal hybrid's far (feature) score of query ``i`` and key ``j`` is
            weighed by ``gamma^(i - j)`` (a retention-style decay; the exact window and
            sinks are not decayed). Bounds the far part's share of the normalizer on
            inputs longer than those it was trained on. Needs ``causal=True`` and a
            window or sinks; O(1) state per token when decoding (the state is scaled by
            ``gamma`` per token).
        far_q, far_k: None, or the queries and keys the far (feature-map) part scores,
            shaped as ``q`` and ``k`` (default: ``q`` and ``k``); the window and the
            sinks keep scoring ``q`` and ``k``. A converted rotary model passes its
            queries and keys before the rotary embedding here: the far scores then
            depend on no absolute position, and hold past the lengths they were trained
            on. Needs a window or sinks.

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
    hybrid = window is not None or bool(sinks)
    if isinstance(q, Tensor) and isinstance(k, Tensor):
        far_q, far_k = _check_far_inputs(far_q, far_k, q, k, hybrid)
    if decay is not None and not (causal and hybrid):
        _check_decay(decay, _as_4d(q) if isinstance(q, Tensor) else q, causal, hybrid)
    if cu_seqlens is not None and (decay is not None or far_q is not None or far_k is not None):
        raise ValueError(
            "decay, far_q and far_k are not supported with cu_seqlens: run the packed "
            "sequences one call each"
        )
    if cu_seqlens is None:
        # A piece of no tokens after a state passes the state on (prefill in pieces of
        # any size).
        q, k, v = _checked_inputs(q, k, v, key_padding_mask, allow_empty=initial_state is not None)
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
        decay=decay,
        far_q=far_q,
        far_k=far_k,
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
        decay=call.decay,
        far_q=call.far_q,
        far_k=call.far_k,
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


def _far_inputs(call: FavorCall, q4: Tensor, mask: Tensor | None):
    """``(far_q, far_k)`` of ``call`` as ``(B, H, L, d)`` in q4's dtype (padded far keys
    zeroed, as the keys are), or None each."""
    return [_far_4d(x, q4.dtype, mask) for x in (call.far_q, call.far_k)]


def _run_hybrid(call: FavorCall) -> Tensor:
    def op(q4, k4, v4, fm, params, mask, window, lf):
        far_q, far_k = _far_inputs(call, q4, mask)
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
            decay=_check_decay(call.decay, q4, call.causal, True),
            far_q=far_q,
            far_k=far_k,
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
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
    compile_step: bool = False,
) -> tuple[Tensor, FavorState]:
    """Causal FAVOR+ decoding step: consume ``n`` new tokens after ``state``.

    Args:
        q, k: ``(B, H, n, d)``; v: ``(B, H, n, dv)``; the ``n >= 1`` new tokens (attending
            causally among themselves and to everything in ``state``). Grouped-query
            attention: ``k, v`` (and ``far_k``) may have ``H_kv`` heads, ``H`` a multiple
            of ``H_kv`` (query head ``h`` reads key/value head ``h // (H / H_kv)``, as
            ``repeat_interleave``); with a window or sinks the state then keeps its
            ring and sink slots once per key/value head (``H / H_kv`` times less memory
            for them; without ``cu_seqlens``), the same outputs as ``k, v`` repeated.
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
        decay, far_q, far_k: as :func:`favor_attention` (the same ``decay`` at every
            step; with far inputs the state keeps the far keys of its window ring:
            :class:`FavorState` ``far_keys``, so every step must pass them). Not with
            ``cu_seqlens``.
        compile_step: hybrid only (a window or sinks): a one-token step after the window
            ring (and the sink slots) has filled runs through a ``torch.compile``'d form
            of the step (:func:`~linattn.ops.favor.window.step.compiled_step_one`): the
            same outputs up to rounding, with the step's many small tensor ops fused
            (about 3x faster on CPU for one head_dim-64 layer); the first such call
            compiles (seconds, once per process). Other steps, steps that build a
            gradient and calls inside an outer ``torch.compile`` run the eager form.

    Returns:
        ``(out: (B, H, n, dv), new_state)``. Time and memory per token do not depend on
        how many tokens the state has absorbed. Running it token by token (or ``n`` at a
        time) equals ``favor_attention(..., causal=True, window=window, sinks=sinks)``
        on the concatenated tokens, and equals
        ``favor_attention(..., causal=True, initial_state=state, output_final_state=True)``
        (the same function).
    """
    if not isinstance(compile_step, bool):
        raise TypeError(f"compile_step must be a bool, got {type(compile_step).__name__}")
    q, k, v, far_k, kv_groups = _expand_kv_groups(q, k, v, far_k)
    if cu_seqlens is not None or (window is None and not sinks):
        # No window ring to keep grouped (packed sequences: a state per query head).
        kv_groups = 1
    if cu_seqlens is not None:
        if decay is not None or far_q is not None or far_k is not None:
            raise ValueError(
                "decay, far_q and far_k are not supported with cu_seqlens: step the "
                "sequences one call each"
            )
        offsets = _check_cu_seqlens(cu_seqlens, q, k, v, key_padding_mask)
        options = dict(
            kernel=kernel,
            scale=scale,
            window=window,
            linear_factor=linear_factor,
            sinks=sinks,
            compile_step=compile_step,
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
    q, k, v = _checked_inputs(q, k, v, key_padding_mask, allow_empty=state is not None)
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
        decay=decay,
        far_q=far_q,
        far_k=far_k,
        compiled=compile_step,
        kv_groups=kv_groups,
    )
