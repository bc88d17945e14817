"""The hybrid itself: the parts (band, sinks, far) of each query row combined under one
normalizer, bidirectional (:func:`hybrid_bidirectional`) and causal
(:func:`hybrid_causal`) side by side, and the public entry :func:`favor_window`, which
on CPU runs over groups of (batch, head) pairs (:func:`window_groups`).

Query ``i`` scores the keys ``j`` of its window (``|i - j| <= w``, or ``i - w < j <= i``
when causal) with ``exp(scale q_i.k_j)`` and every other unpadded key with
``lambda_h phi(q_i).phi(k_j)``, under one normalizer; each part returns ``(nd, g)`` with
its sum ``exp(g) nd`` and :func:`combine` adds them under the true maximum of their
normalizers. No subtraction ``all - near`` is ever formed: every sum only adds positive
terms (positive maps), so the denominators stay accurate in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ....features import FeatureMap, FeatureParams
from ..common import safe_denominator
from .band import band_block, band_blocks
from .far import far_block, far_blocks, spread_limit
from .naive import far_left, far_running_max
from .sinks import sink_part


def combine(parts: list[tuple[Tensor, Tensor]], positive: bool) -> Tensor:
    """``out = sum_p exp(g_p) nd_p[:dv] / sum_p exp(g_p) nd_p[dv]``; ``parts``: ``(nd:
    (B, H, n, dv + 1), g: (B, H, n))``. Rows with nothing visible are 0.

    Stabilized by the true maximum over the parts present in each row: part ``p``'s
    magnitude is ``exp(a_p)`` with ``a_p = g_p + ln max_c |nd_p[c]|`` (over the
    numerators and the normalizer), and a part with ``nd_p = 0`` (no key in it: the far
    part of the first ``w`` causal rows, or of a row whose far keys are all padding or
    sinks) is left out. A signed kernel's (softmax_trig, softmax_hyp) part may have a
    normalizer of exactly 0, or a subnormal one, and numerators that are not: it is kept,
    and scaled by its largest entry, not by the normalizer. ``g_p`` alone is only the
    part's nominal scale (0 for hedgehog, relu, elu): stabilizing by it loses a row's
    exact scores once they are all below ``-87`` (float32). Each part is divided by its
    own magnitude before it is scaled by ``exp(a_p - max a) <= 1``, so no factor
    overflows even where a part's entries are tiny against its scale.
    """
    dv = parts[0][0].shape[-1] - 1
    scaled = []
    for nd, g in parts:
        with torch.no_grad():
            # max(|nd[dv]|, max |nd[:dv]|): every entry of nd / mag is in [-1, 1].
            mag = nd.abs().amax(-1)
            present = mag > 0
            mag = torch.where(present, mag, 1.0)
            log_mag = torch.where(present, torch.log(mag), -math.inf)
        scaled.append((nd / mag.unsqueeze(-1), g + log_mag))
    top = scaled[0][1].detach()
    for _, a in scaled[1:]:
        top = torch.maximum(top, a.detach())
    top = torch.where(torch.isfinite(top), top, 0.0)
    total = None
    for nd, a in scaled:
        term = nd * torch.exp(a - top).unsqueeze(-1)
        total = term if total is None else total + term
    return total[..., :dv] / safe_denominator(total[..., dv], positive).unsqueeze(-1)


def decay_bias(log_decay: Tensor, heads: int, length: int, dtype, device) -> Tensor:
    """``(H, L)``: ``i ln(gamma_h)`` for positions ``i < L`` (``log_decay: (H,)`` or ``()``,
    ``ln gamma <= 0``). The far score of query ``i`` and key ``j`` is weighed by
    ``gamma^(i - j) = exp(bias_i - bias_j)``: queries add ``bias``, keys ``-bias``."""
    pos = torch.arange(length, device=device, dtype=torch.float64)
    ld = log_decay.to(device=device, dtype=torch.float64).reshape(-1, 1).expand(heads, 1)
    return (ld * pos).to(dtype)


def factor_shape(linear_factor: Tensor | None) -> Tensor | None:
    if linear_factor is None:
        return None
    return linear_factor.reshape(1, -1, 1, 1) if linear_factor.dim() else linear_factor


def keep_in_graph(out: Tensor, *unused: Tensor | None) -> Tensor:
    """``out`` plus ``0 *`` the sum of each ``unused`` tensor that requires a gradient:
    a part that this call skipped (no far key when the window covers the sequence) still
    gives its parameters a zero gradient, not None. DistributedDataParallel needs every
    rank to use the same parameters at every step, and ranks' batches differ in length."""
    if not torch.is_grad_enabled():
        return out
    for t in unused:
        if t is not None and t.requires_grad:
            out = out + 0.0 * t.sum().to(out.dtype)
    return out


@dataclass(frozen=True)
class HybridCall:
    """The options of one hybrid call, as :func:`favor_window` takes them (see there);
    ``window`` is ``w >= 0``, or None for no band."""

    window: int | None
    causal: bool
    linear_factor: Tensor | None = None
    key_padding_mask: Tensor | None = None
    chunk_size: int = 64
    block_size: int | None = None
    sinks: int = 0
    decay: Tensor | None = None

    def group(self, bs: slice, hs: slice) -> HybridCall:
        """The options of the (batch, head) pairs ``[bs, hs]``: the per-head factor and
        the per-sequence mask sliced."""
        lf, mask, dec = self.linear_factor, self.key_padding_mask, self.decay
        return replace(
            self,
            linear_factor=lf[hs] if lf is not None and lf.dim() == 1 else lf,
            key_padding_mask=None if mask is None else mask[bs],
            decay=dec[hs] if dec is not None and dec.dim() == 1 else dec,
        )


#: CPU only: the window hybrid runs over groups of (batch, head) pairs so that its
#: largest per-call tensors (features ``(L, M)``, far block states ``(L / C, M, dv + 1)``,
#: the band's exp-scores per block offset ``(L, C_band)``, per pair) stay under this many
#: bytes. glibc serves larger blocks with ``mmap`` and
#: returns them on free, so every call would pay page faults on hundreds of MB of fresh
#: memory (measured: about a third of the time at L = 16384, m = 256, 8 heads); under
#: it freed memory is reused. CUDA's caching allocator has no such cost: one call there.
CPU_GROUP_BYTES = 24 << 20


def window_groups(
    shape: tuple[int, ...], m: int, block: int, itemsize: int, band: int = 0
) -> tuple[int, int]:
    """``(batch rows, heads)`` per call under :data:`CPU_GROUP_BYTES` for ``shape = (B, H,
    L, dv)``, ``M = m`` features per token, far blocks of ``block`` tokens and band blocks
    of ``band`` query rows: all heads of as many sequences as fit, else one sequence and
    as many heads as fit (at least one)."""
    bsz, heads, length = shape[0], shape[1], shape[2]
    if bsz == 0 or heads == 0:
        return bsz, heads
    nblk = -(-length // max(1, block))
    per_pair = max(length * max(m, band), nblk * m * (shape[3] + 1)) * itemsize
    fit = max(1, CPU_GROUP_BYTES // max(1, per_pair))
    if fit >= heads:
        return min(bsz, fit // heads), heads
    return 1, fit


def _slice_params(params: FeatureParams, shape: tuple[int, int], bs: slice, hs: slice):
    # The per-(batch, head) parts of ``params`` for the pairs ``[bs, hs]``.
    def part(t: Tensor | None) -> Tensor | None:
        if t is None or t.dim() < 2:
            return t
        return t.expand(*shape, *t.shape[2:])[bs, hs]

    weight = params.weight
    if weight is not None and weight.dim() == 3:
        weight = weight[hs]
    return FeatureParams(
        weight, params.scale, part(params.opt_a), part(params.opt_b), part(params.opt_shift)
    )


def favor_window(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    window: int | None,
    causal: bool,
    linear_factor: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    chunk_size: int = 64,
    block_size: int | None = None,
    sinks: int = 0,
    decay: Tensor | None = None,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
    final_state: bool = False,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Sliding-window hybrid FAVOR attention with optional sink keys, O(L (w + M + s))
    time and memory.

    Shapes: ``q, k: (B, H, L, d)`` (raw; ``params.scale`` applies), ``v: (B, H, L, dv)``,
    ``key_padding_mask: (B, L)`` bool (True = ignore; padded keys and values must be
    finite, callers zero them), ``linear_factor: (H,)`` or ``()`` or None (= 1).
    ``window``: ``w >= 0``, or None for no band (then ``sinks`` should be > 0: the sinks
    are the only exact keys). ``sinks``: the first ``sinks`` unpadded keys of each
    sequence are scored exactly by every query that sees them. ``decay``: ``ln gamma:
    (H,)`` or ``()`` (causal only): far scores weighed by ``gamma^(i - j)``. ``far_q,
    far_k``: the far part's own queries and keys (shapes as ``q``, ``k``; default ``q``,
    ``k``). Returns ``(B, H, L, dv)``.

    ``final_state`` (causal, no gradient to build): returns ``(out, far)``, ``far`` the
    far sums of a decoding state after these tokens, ``(S: (B, H, M, dv + 1), c: (B,
    H))`` as :func:`~.step.window_final_state` computes them (the real non-sink keys
    older than the last ``w``, in the frame of position ``L``), taken from the far
    part's own features; None where the far part took another form (then
    ``window_final_state`` computes them).

    On CPU the (batch, head) pairs go in groups (:func:`window_groups`), without the page
    faults of very large temporaries: heads and sequences are independent, so the result
    is one call's up to rounding (a group whose keys' log-scales spread too far takes
    the running-maximum far part alone, where one call takes it for every pair).
    Equivalent to :func:`favor_naive` with ``window``, ``linear_factor`` and ``sinks``.

    Composability: ``torch.func.vmap`` and ``torch.func.grad`` work, and so does
    ``torch.compile(fullgraph=True)``: while a graph is captured
    (:func:`~linattn.ops.favor.common.graph_captured`) the far part takes its
    running-maximum form, which needs no data-dependent decision. Not supported: forward-
    mode derivatives (``torch.func.jvp``, ``jacfwd``; the band's backward is hand-written,
    a clear error is raised) and second derivatives (likewise).
    """
    if window is not None:
        # w >= L is exact attention within the sequence: clamped, the cost never depends
        # on w beyond L (window=10**12 would otherwise cost O(w) Python work and memory).
        window = min(window, q.shape[-2])
    call = HybridCall(
        window, causal, linear_factor, key_padding_mask, chunk_size, block_size, sinks, decay
    )
    bsz, heads = q.shape[0], q.shape[1]
    rows, group = bsz, heads
    if q.device.type == "cpu":
        length = max(q.shape[-2], k.shape[-2])
        m = fm.feature_dim(params.weight, q.shape[-1])
        w = -1 if window is None else window
        band = 0 if w < 0 else block_size or band_block(w, length, causal=causal)
        rows, group = window_groups(
            (bsz, heads, length, v.shape[-1]), m, far_block(w, length), q.element_size(), band
        )
    # One group (every pair) is the whole call: full slices are views of the inputs.
    row_slices = [slice(b, b + rows) for b in range(0, bsz, max(1, rows))] or [slice(None)]
    head_slices = [slice(h, h + group) for h in range(0, heads, max(1, group))] or [slice(None)]

    if final_state and not causal:
        raise ValueError("final_state needs causal=True")

    def run(bs: slice, hs: slice):
        sub = _slice_params(params, (bsz, heads), bs, hs)
        far = [None if x is None else x[bs, hs] for x in (far_q, far_k)]
        args = (q[bs, hs], k[bs, hs], v[bs, hs], fm, sub, call.group(bs, hs), *far)
        if final_state:
            return hybrid_causal(*args, final_state=True)
        return hybrid_call(*args)

    results = [[run(bs, hs) for hs in head_slices] for bs in row_slices]
    if not final_state:
        return _cat([_cat(row, 1) for row in results], 0)
    out = _cat([_cat([r[0] for r in row], 1) for row in results], 0)
    finals = [r[1] for row in results for r in row]
    if any(f is None for f in finals):
        return out, None
    sums, stab = (_cat([_cat([r[1][i] for r in row], 1) for row in results], 0) for i in (0, 1))
    return out, (sums, stab)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def hybrid_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    call: HybridCall,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
) -> Tensor:
    """:func:`favor_window` in one call over every (batch, head) pair given."""
    if call.causal:
        return hybrid_causal(q, k, v, fm, params, call, far_q, far_k)
    if call.decay is not None:
        raise ValueError("decay needs causal=True")
    return hybrid_bidirectional(q, k, v, fm, params, call, far_q, far_k)


def hybrid_bidirectional(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    call: HybridCall,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
) -> Tensor:
    """Bidirectional hybrid by blocks of ``C`` tokens (see ``ops/favor/README.md``).

    Shapes: ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``, ``call.key_padding_mask: (B,
    L)`` (padded keys and values finite), ``call.linear_factor: (H,)``, ``()`` or None.
    ``window=None``: no band (the empty ``|i - j| <= -1``). ``sinks``: the first
    ``sinks`` real keys are scored exactly (:func:`~.sinks.sink_part`) and left out of
    the far part. Returns ``(B, H, L, dv)``.

    For query block ``t``, key blocks ``u`` with ``|u - t| > D = ceil(w / C)`` are wholly
    far: they enter through the far states of :func:`~.far.far_blocks` (or the prefix
    and suffix sums of :func:`~.naive.far_running_max`); the blocks with
    ``floor((w + 1) / C) <= |u - t| <= D`` are mixed and scored pair by pair; the near
    pairs are :func:`~.band.band_blocks`'. Equivalent to :func:`favor_naive` with
    ``window`` (``causal=False``).
    """
    window = -1 if call.window is None else call.window
    length = q.shape[-2]
    mask = call.key_padding_mask
    keep = None if mask is None else ~mask
    block = call.block_size or band_block(window, length)
    near = band_blocks(q, k, v, keep, window, False, params.scale, block)
    if window + 1 >= length:
        # Every key is inside every window (sinks included): exact attention.
        return keep_in_graph(
            combine([near], fm.positive_features), params.weight, call.linear_factor, far_q, far_k
        )
    # No band (window=None): no part (a constant empty part trips inductor).
    parts = [near] if window >= 0 else []
    if call.sinks:
        keep, part = sink_part(q, k, v, keep, call.sinks, window, False, params.scale)
        parts.append(part)
    lc = fm.log_const(params)
    if isinstance(lc, Tensor):
        lc = lc.unsqueeze(-1)
    spread = spread_limit(q.dtype)
    fq_in = q if far_q is None else far_q
    fk_in = k if far_k is None else far_k
    fast = far_blocks(fq_in, fk_in, v, keep, fm, params, window, far_block(window, length), spread)
    if fast is not None:
        far, rq, top = fast
        scale_far = rq + top.unsqueeze(-1) + 2 * lc
    else:
        far, scale_far = far_running_max(fq_in, fk_in, v, keep, fm, params, window)
        scale_far = scale_far + 2 * lc
    lf = factor_shape(call.linear_factor)
    if lf is not None:
        far = far * lf
    return combine([*parts, (far, scale_far)], fm.positive_features)


def hybrid_causal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    call: HybridCall,
    far_q: Tensor | None = None,
    far_k: Tensor | None = None,
    final_state: bool = False,
) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Causal hybrid: the band ``i - w < j <= i``, the sinks ``j <= i - w`` and the far
    keys ``j <= i - w`` that are not sinks. Shapes as :func:`hybrid_bidirectional`;
    ``window=None``: no band (window 0). The far part is :func:`~.far.far_blocks`
    (causal) under one stabilizer when the keys' log-scales allow it (then only rounding
    depends on later keys), else the leak-free prefix-maximum scan
    :func:`~.naive.far_left`. Equivalent to :func:`favor_naive` with ``window`` and
    ``causal=True``. ``final_state``: ``(out, far sums or None)`` as
    :func:`favor_window`.
    """
    out, final = _hybrid_causal(q, k, v, fm, params, call, far_q, far_k, final_state)
    return (out, final) if final_state else out


def _hybrid_causal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    call: HybridCall,
    far_q: Tensor | None,
    far_k: Tensor | None,
    final_state: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    # hybrid_causal's body: (out, the far sums of the decoding state or None).
    window = 0 if call.window is None else call.window
    length = q.shape[-2]
    mask = call.key_padding_mask
    keep = None if mask is None else ~mask
    block = call.block_size or band_block(window, length, causal=True)
    near = band_blocks(q, k, v, keep, window, True, params.scale, block)
    # No band (window 0): no part (a constant empty part only costs, and trips inductor).
    parts = [near] if window > 0 else []
    keep_far = keep
    if call.sinks:
        keep_far, part = sink_part(q, k, v, keep, call.sinks, window, True, params.scale)
        parts.append(part)
    if length - window <= 0:
        # No key is far from any query: exact attention (and the sinks).
        out = combine(parts or [near], fm.positive_features)
        return keep_in_graph(out, params.weight, call.linear_factor, far_q, far_k), None
    spread = spread_limit(q.dtype)
    kb = qb = None
    if call.decay is not None:
        qb = decay_bias(call.decay, q.shape[1], length, q.dtype, q.device)
        kb = -qb
    fq_in = q if far_q is None else far_q
    fk_in = k if far_k is None else far_k
    fast = far_blocks(
        fq_in,
        fk_in,
        v,
        keep_far,
        fm,
        params,
        window,
        far_block(window, length),
        spread,
        causal=True,
        key_bias=kb,
        # The decoding state sums the keys older than the last w (all far from the next
        # query).
        final=length - window if final_state else None,
    )
    final = None
    if fast is not None:
        nd, rq, top = fast[:3]
        if final_state:
            # Keys weighed by exp(r_j - j ln gamma - m): in the frame of position L
            # (gamma^(L - j)) the stabilizer is m + L ln gamma; an empty state keeps the
            # floor of causal.initial_state (the dtype's minimum).
            sums, m = fast[3]
            if qb is not None:
                m = m + (qb[:, -1] + call.decay.to(m.dtype))
            final = (sums, torch.clamp_min(m, torch.finfo(m.dtype).min))
        lc = fm.log_const(params)
        if isinstance(lc, Tensor):
            lc = lc.unsqueeze(-1)
        g = rq + top.unsqueeze(-1) + 2 * lc
        if qb is not None:
            g = g + qb
    else:
        keep_f = None if keep_far is None else keep_far.to(q.dtype)
        nd, g, _, _ = far_left(
            fq_in,
            fk_in,
            v,
            keep_f,
            fm,
            params,
            -window,
            call.chunk_size,
            key_bias=kb,
            query_bias=qb,
        )
    lf = factor_shape(call.linear_factor)
    if lf is not None:
        nd = nd * lf
    return combine([*parts, (nd, g)], fm.positive_features), final
