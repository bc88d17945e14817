"""Sliding-window hybrid: exact softmax scores near the diagonal, FAVOR features beyond.

Query ``i`` scores the keys ``j`` of its window (``|i - j| <= w``, or ``i - w < j <= i``
when causal) with ``exp(scale q_i.k_j)`` and every other unpadded key with
``lambda_h phi(q_i).phi(k_j)``, under one normalizer. Nothing ``L x L`` is formed:

* near part (:func:`~linattn.ops.favor.blocks.band_blocks`): queries in aligned blocks
  of ``C`` against the key blocks that hold their windows, exact scores masked to the
  band, stabilized by the row maximum, hand-written backward. :func:`band_attention`
  (an ``unfold`` of the keys, plain autograd) is its reference, and the decoding step's
  band (queries at an offset);
* far part, when one stabilizer for the whole sequence is exact (the keys' log-scales
  spread by less than 60 in float32, 600 in float64: hedgehog and typical inputs):
  :func:`~linattn.ops.favor.blocks.far_blocks`, block states summed over the key blocks
  wholly outside each query block's window (both sides; causal: the earlier ones) plus
  the far pairs of the mixed blocks, hand-written backward;
* far part otherwise, and the references of the above: causal :func:`far_left` (the
  keys ``j <= i - s`` of query ``i`` are, after shifting the key sequence ``s = w``
  places to the right, exactly the causal keys ``j' <= i``, so the chunked causal scan
  of ``causal.py`` with its leak-free prefix stabilizer gives them, unnormalized, with
  their log-scale), bidirectional :func:`far_running_max` (prefix and suffix block sums
  under running maxima). No subtraction ``all - near`` is ever formed: every sum only
  adds positive terms (positive maps), so the denominators stay accurate in float32;
* sinks (:func:`sink_attention`, ``sinks=s``): the first ``s`` unpadded keys of each
  sequence are scored exactly by every query that sees them; they are gathered
  (``(B, H, s, d)``), scored against every query where they are outside its window
  (inside it the band has them), and taken out of the far parts;
* :func:`combine`: the parts, each ``exp(scale_p) * [num_p, den_p]``, are added under
  their common maximum log-scale.

Derivation and stabilizers: ``ops/favor/README.md``. Gradients: hand-written for the
block-pair paths (``blocks.py``), plain autograd for the sinks, :func:`combine` and the
running-maximum fallbacks; memory O(L (w + M + s)) plus the far block states, O((L / C) M dv).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...features import FeatureMap, FeatureParams
from .blocks import band_blocks, far_blocks, far_sums
from .causal import causal_scan_raw, initial_state
from .common import ones_col, safe_denominator


def shifted(x: Tensor, start: int, total: int, dim: int = -2) -> Tensor:
    """``y`` of length ``total`` along ``dim`` with ``y[p] = x[p + start]``, zeros where
    ``p + start`` falls outside ``x``."""
    n = x.shape[dim]
    lo, hi = max(0, start), min(n, start + total)
    dim = dim % x.dim()
    if hi <= lo:
        shape = list(x.shape)
        shape[dim] = total
        return x.new_zeros(shape)
    part = x.narrow(dim, lo, hi - lo)
    left = lo - start
    right = total - left - (hi - lo)
    pad = [0, 0] * (x.dim() - 1 - dim) + [left, right]
    return F.pad(part, pad)


def band_block(window: int, length: int, causal: bool = False) -> int:
    """Query rows per block of the exact band: about ``w`` (``w / 2`` causal, whose
    offsets ``-1`` and ``0`` are both triangles: smaller blocks waste less), clamped to
    ``[16, 128]`` (measured at ``w = 64``)."""
    rows = (window + 1) // 2 if causal else window
    return max(1, min(length, max(16, min(rows, 128))))


def band_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    window: int,
    causal: bool,
    scale: float,
    *,
    q_offset: int = 0,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact scores inside the window.

    Shapes: ``q: (B, H, Lq, d)``, query ``a`` sitting at key position ``q_offset + a``;
    ``k: (B, H, Lk, d)``, ``v: (B, H, Lk, dv)``, ``keep: (B, Lk)`` bool (True = real key)
    or None. Returns ``nd: (B, H, Lq, dv + 1)`` and ``mx: (B, H, Lq)`` with
    ``sum_{j near i, kept} exp(scale q_i.k_j) [v_j, 1] = exp(mx_i) nd_i``; ``mx`` is
    ``-inf`` (and ``nd`` 0) where no key is near.
    """
    bsz, heads, lq, _ = q.shape
    dv = v.shape[-1]
    # A window past every key changes nothing: its cost stays O(L) whatever w is.
    window = min(window, q_offset + lq if causal else max(q_offset + lq, k.shape[-2]))
    width = window if causal else 2 * window + 1
    # No band: causal window 0, or the empty bidirectional band of window=None (w = -1).
    if width <= 0:
        return q.new_zeros(bsz, heads, lq, dv + 1), q.new_full((bsz, heads, lq), -math.inf)
    b = block or band_block(window, lq)
    nblk = -(-lq // b)
    win = b + width - 1
    total = (nblk - 1) * b + win
    # Key column c of block t sits at key position t*b + start + c.
    start = q_offset - window + (1 if causal else 0)
    kw = shifted(k, start, total).unfold(-2, win, b)  # [B, H, nblk, d, win]
    vw = shifted(ones_col(v), start, total).unfold(-2, win, b)  # [B, H, nblk, dv+1, win]
    valid = torch.ones(k.shape[0], k.shape[-2], dtype=torch.bool, device=k.device)
    if keep is not None:
        valid = keep
    valid = shifted(valid, start, total, dim=-1).unfold(-1, win, b)  # [B, nblk, win]
    a = torch.arange(b, device=q.device)[:, None]
    c = torch.arange(win, device=q.device)[None, :]
    rel = (c - a >= 0) & (c - a < width)  # [b, win]
    allowed = rel & valid[:, None, :, None, :]  # [B, 1, nblk, b, win]
    qb = shifted(q, 0, nblk * b).reshape(bsz, heads, nblk, b, q.shape[-1])
    scores = (qb @ kw) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    mx = scores.detach().amax(-1)
    mx_safe = torch.where(torch.isfinite(mx), mx, 0.0)
    e = torch.exp(scores - mx_safe.unsqueeze(-1))
    nd = (e @ vw.transpose(-2, -1)).reshape(bsz, heads, nblk * b, dv + 1)[..., :lq, :]
    return nd, mx.reshape(bsz, heads, nblk * b)[..., :lq]


def sink_slots(
    keep: Tensor | None, bsz: int, length: int, sinks: int, device
) -> tuple[Tensor, Tensor, Tensor]:
    """The sink keys of each sequence: its first ``sinks`` unpadded keys.

    Shapes: ``keep: (B, L)`` bool (True = real key) or None. Returns ``is_sink: (B, L)``
    bool, ``idx: (B, s')`` long and ``valid: (B, s')`` bool with ``s' = min(sinks, L)``:
    slot ``r`` holds the position of the ``r``-th real key where ``valid`` (a sequence
    with fewer than ``sinks`` real keys has invalid slots at the end).
    """
    if keep is None:
        keep = torch.ones(bsz, length, dtype=torch.bool, device=device)
    is_sink = keep & (keep.long().cumsum(-1) <= sinks)
    return (is_sink, *first_true(is_sink, min(sinks, length)))


def first_true(flags: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``idx: (B, count)`` the positions of the first ``count`` True entries of ``flags:
    (B, n)`` in order (stable sort), and ``valid: (B, count)`` whether each is True."""
    order = torch.sort((~flags).to(torch.uint8), dim=-1, stable=True).indices[:, :count]
    return order, flags.gather(-1, order)


def gather_slots(x: Tensor, idx: Tensor) -> Tensor:
    """``x: (B, H, L, e)`` at the positions ``idx: (B, s)`` of each sequence:
    ``(B, H, s, e)``."""
    index = idx[:, None, :, None].expand(x.shape[0], x.shape[1], idx.shape[-1], x.shape[-1])
    return x.gather(-2, index)


def sink_attention(
    q: Tensor, ks: Tensor, vs: Tensor, allowed: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Exact scores of every query against gathered sink keys.

    Shapes: ``q: (B, H, n, d)``, ``ks: (B, H, s, d)``, ``vs: (B, H, s, dv)``,
    ``allowed: (B, 1, n, s)`` bool (the pairs this part counts). Returns ``nd: (B, H, n,
    dv + 1)`` and ``mx: (B, H, n)`` with ``sum_{allowed} exp(scale q.k) [v, 1] =
    exp(mx) nd`` (``mx = -inf``, ``nd = 0`` where nothing is allowed), as
    :func:`band_attention`.
    """
    scores = (q @ ks.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~allowed, -math.inf)
    mx = scores.detach().amax(-1)
    mx_safe = torch.where(torch.isfinite(mx), mx, 0.0)
    e = torch.exp(scores - mx_safe.unsqueeze(-1))
    return e @ ones_col(vs), mx


def sink_part(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    sinks: int,
    window: int,
    causal: bool,
    scale: float,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The sinks of a whole sequence (parallel form).

    Shapes: ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``, ``keep: (B, L)`` or None.
    Returns ``keep_far: (B, L)`` bool (real keys that are not sinks: what the far parts
    see) and the part ``(nd, mx)`` of :func:`sink_attention` over the sinks outside each
    query's window (``|i - j| > w``; causal ``j <= i - w``; ``w = -1``: every sink).
    """
    bsz, _, length, _ = k.shape
    is_sink, idx, valid = sink_slots(keep, bsz, length, sinks, k.device)
    far = keep if keep is not None else torch.ones_like(is_sink)
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    pos = idx[:, None, :]  # [B, 1, s']
    outside = (pos <= i - window) if causal else ((i - pos).abs() > window)  # [B, n, s']
    allowed = (valid[:, None, :] & outside).unsqueeze(1)  # [B, 1, n, s']
    part = sink_attention(q, gather_slots(k, idx), gather_slots(v, idx), allowed, scale)
    return far & ~is_sink, part


def far_left(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    fm: FeatureMap,
    params: FeatureParams,
    start: int,
    chunk: int,
    initial: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear scores of query ``a`` against the keys at positions ``j <= a + start``.

    Shapes: ``q: (B, H, n, d)``, ``k: (B, H, Lk, d)``, ``v: (B, H, Lk, dv)``, ``keep:
    (B, Lk)`` float (1 = real key) or None; ``initial``: a causal state for keys before
    position 0. Returns ``nd: (B, H, n, dv + 1)``, ``g: (B, H, n)`` (the true sum
    ``sum_j phi(q_a).phi(k_j) [v_j, 1] = exp(g_a) nd_a``) and the state ``(S, c)`` after
    the keys ``j <= n - 1 + start``.
    """
    bsz, heads, n, _ = q.shape
    ks, vs = shifted(k, start, n), shifted(v, start, n)
    kept = keep if keep is not None else k.new_ones(k.shape[0], k.shape[-2])
    ke = shifted(kept, start, n, dim=-1)
    if initial is None:
        m = fm.feature_dim(params.weight, q.shape[-1])
        initial = initial_state((bsz, heads), m, v.shape[-1], dtype=q.dtype, device=q.device)
    nd, g, state, stab = causal_scan_raw(
        q, ks, vs, initial[0], initial[1], fm, params, ke, max(1, min(chunk, n))
    )
    lc = fm.log_const(params)
    if isinstance(lc, Tensor):
        lc = lc.unsqueeze(-1)
    return nd, g + 2 * lc, state, stab


def combine(parts: list[tuple[Tensor, Tensor]], positive: bool) -> Tensor:
    """``out = sum_p exp(g_p) nd_p[:dv] / sum_p exp(g_p) nd_p[dv]``; ``parts``: ``(nd:
    (B, H, n, dv + 1), g: (B, H, n))``. Rows with nothing visible are 0.

    Stabilized by the true maximum over the parts present in each row: part ``p``'s
    normalizer is ``exp(a_p)`` with ``a_p = g_p + ln |nd_p[dv]|``, and a part with
    ``nd_p[dv] = 0`` (no key in it: the far part of the first ``w`` causal rows, or of a
    row whose far keys are all padding or sinks) is left out. ``g_p`` alone is only the
    part's nominal scale (0 for hedgehog, relu, elu): stabilizing by it loses a row's
    exact scores once they are all below ``-87`` (float32). Each part is divided by its
    own normalizer before it is scaled by ``exp(a_p - max a) <= 1``, so no factor
    overflows even where a part's normalizer is tiny against its scale.
    """
    dv = parts[0][0].shape[-1] - 1
    scaled = []
    for nd, g in parts:
        with torch.no_grad():
            mag = nd[..., dv].abs()
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


def _factor(linear_factor: Tensor | None) -> Tensor | None:
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
) -> Tensor:
    """Sliding-window hybrid FAVOR attention with optional sink keys, O(L (w + M + s))
    time and memory.

    Shapes: ``q, k: (B, H, L, d)`` (raw; ``params.scale`` applies), ``v: (B, H, L, dv)``,
    ``key_padding_mask: (B, L)`` bool (True = ignore; padded keys and values must be
    finite, callers zero them), ``linear_factor: (H,)`` or ``()`` or None (= 1).
    ``window``: ``w >= 0``, or None for no band (then ``sinks`` should be > 0: the sinks
    are the only exact keys). ``sinks``: the first ``sinks`` unpadded keys of each
    sequence are scored exactly by every query that sees them. Returns ``(B, H, L, dv)``.

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
    bsz, heads = q.shape[0], q.shape[1]
    if window is not None:
        # w >= L is exact attention within the sequence: clamped, the cost never depends
        # on w beyond L (window=10**12 would otherwise cost O(w) Python work and memory).
        window = min(window, q.shape[-2])
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

    def call(bs: slice, hs: slice) -> Tensor:
        lf = linear_factor
        if lf is not None and lf.dim() == 1:
            lf = lf[hs]
        return _favor_window_call(
            q[bs, hs],
            k[bs, hs],
            v[bs, hs],
            fm,
            _slice_params(params, (bsz, heads), bs, hs),
            window=window,
            causal=causal,
            linear_factor=lf,
            key_padding_mask=None if key_padding_mask is None else key_padding_mask[bs],
            chunk_size=chunk_size,
            block_size=block_size,
            sinks=sinks,
        )

    return _cat([_cat([call(bs, hs) for hs in head_slices], 1) for bs in row_slices], 0)


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _favor_window_call(
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
) -> Tensor:
    """:func:`favor_window` in one call over every (batch, head) pair given."""
    if window is None:
        # No band: causal window 0 is empty; bidirectionally |i - j| <= -1 is.
        window = 0 if causal else -1
    if not causal:
        return favor_window_bidirectional(
            q,
            k,
            v,
            fm,
            params,
            window=window,
            linear_factor=linear_factor,
            key_padding_mask=key_padding_mask,
            block_size=block_size,
            sinks=sinks,
        )
    length = q.shape[-2]
    keep = None if key_padding_mask is None else ~key_padding_mask
    near = band_blocks(
        q,
        k,
        v,
        keep,
        window,
        True,
        params.scale,
        block_size or band_block(window, length, causal=True),
    )
    # No band (window 0): no part (a constant empty part only costs, and trips inductor).
    parts = [near] if window > 0 else []
    keep_far = keep
    if sinks:
        keep_far, part = sink_part(q, k, v, keep, sinks, window, True, params.scale)
        parts.append(part)
    lf = _factor(linear_factor)
    # Far keys of query i: j <= i - w. One stabilizer for the sequence when the keys'
    # log-scales allow it (then only rounding depends on later keys), else the
    # leak-free prefix-maximum scan.
    if length - window > 0:
        spread = SPREAD_FLOAT64 if q.dtype == torch.float64 else SPREAD_FLOAT32
        fast = far_blocks(
            q, k, v, keep_far, fm, params, window, far_block(window, length), spread, causal=True
        )
        if fast is not None:
            nd, rq, top = fast
            lc = fm.log_const(params)
            if isinstance(lc, Tensor):
                lc = lc.unsqueeze(-1)
            g = rq + top.unsqueeze(-1) + 2 * lc
        else:
            keep_f = None if keep_far is None else keep_far.to(q.dtype)
            nd, g, _, _ = far_left(q, k, v, keep_f, fm, params, -window, chunk_size)
        if lf is not None:
            nd = nd * lf
        parts.append((nd, g))
    else:
        # No key is far from any query: exact attention (and the sinks).
        return keep_in_graph(
            combine(parts or [near], fm.positive_exp), params.weight, linear_factor
        )
    return combine(parts, fm.positive_exp)


def favor_window_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    window: int,
    state: tuple[Tensor, ...],
    linear_factor: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    sinks: int = 0,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Causal hybrid decoding: consume ``n`` new tokens after ``state``.

    Shapes: ``q, k: (B, H, n, d)``, ``v: (B, H, n, dv)``, ``key_padding_mask: (B, n)``;
    ``state = (S: (B, H, M, dv + 1), c: (B, H), keys: (B, H, r, d), values:
    (B, H, r, dv), padding: (B, r) bool)``: the linear state of every key older than the
    window and the last ``r = min(w, tokens so far)`` keys/values (padding True for
    empty slots); the new ring has ``min(w, r + n)`` slots. With
    ``sinks = s > 0`` four more: ``sink_keys: (B, H, s, d)``, ``sink_values: (B, H, s,
    dv)``, ``sink_padding: (B, s)`` bool (True = empty slot), the sinks that have left
    the window (``S`` never holds a sink), and ``seen: (B,)`` long, the real keys consumed
    so far. Returns ``(out: (B, H, n, dv), new_state)``; stepping equals
    :func:`favor_window` (causal, same ``sinks``) on the concatenated tokens.
    """
    kv, stab, wk, wv, wpad = state[:5]
    n = q.shape[-2]
    # The ring holds the last min(w, tokens so far) tokens: it is not full (ring < w)
    # until w tokens have been consumed, and never larger than what can be seen.
    ring = wk.shape[-2]
    pad = key_padding_mask
    if pad is None:
        pad = torch.zeros(q.shape[0], n, dtype=torch.bool, device=q.device)
    kc, vc = torch.cat([wk, k], dim=-2), torch.cat([wv, v], dim=-2)
    padc = torch.cat([wpad, pad], dim=-1)
    keep = ~padc
    near = band_attention(q, kc, vc, keep, window, True, params.scale, q_offset=ring)
    parts = [near]
    keep_far = keep
    if sinks:
        keep_far, part, sink_state = _step_sinks(
            q, kc, vc, keep, state[5:], n, sinks, params.scale, window
        )
        parts.append(part)
    # Query a sits at position ring + a of kc; its far keys are j <= ring + a - w.
    nd, g, kv, stab = far_left(
        q, kc, vc, keep_far.to(q.dtype), fm, params, max(ring - window, -n), 64, initial=(kv, stab)
    )
    lf = _factor(linear_factor)
    if lf is not None:
        nd = nd * lf
    parts.append((nd, g))
    out = combine(parts, fm.positive_exp)
    keep_from = max(0, ring + n - window)
    new = (kv, stab, kc[..., keep_from:, :], vc[..., keep_from:, :], padc[:, keep_from:])
    if sinks:
        new = new + sink_state
    return out, new


def _step_sinks(
    q: Tensor,
    kc: Tensor,
    vc: Tensor,
    keep: Tensor,
    state: tuple[Tensor, ...],
    n: int,
    sinks: int,
    scale: float,
    window: int,
) -> tuple[Tensor, tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The sinks of one decoding step (:func:`favor_window_step`).

    Shapes: ``kc: (B, H, w + n, d)``, ``vc``, ``keep: (B, w + n)`` over the window's keys
    then the ``n`` new ones; ``state = (sink_keys, sink_values, sink_padding, seen)``.
    Returns ``keep_far: (B, w + n)`` (real, not a sink), the sink part ``(nd, mx)`` and
    the new ``(sink_keys, sink_values, sink_padding, seen)``. The sinks in the state are
    older than every key of ``kc``, so every new query scores them; slot ``p`` of ``kc``
    leaves the window for the queries ``a >= p + shift``, ``shift = window - ring`` (the
    ring, the first ``len(kc) - n`` slots, holds fewer than ``window`` tokens until it
    is full)."""
    sk, sv, spad, seen = state
    w = kc.shape[-2] - n
    shift = window - w
    leave = max(0, n - shift)
    real = keep.long()
    total = seen + real[:, w:].sum(-1)  # [B]
    # Rank (0-based, among real keys) of slot p = real keys before it.
    rank = total[:, None] - real.flip(-1).cumsum(-1).flip(-1)
    is_sink = keep & (rank < sinks)
    idx, valid = first_true(is_sink[:, :leave], min(sinks, leave))
    a = torch.arange(n, device=q.device)[:, None]
    leaving = valid[:, None, :] & (idx[:, None, :] + shift <= a)  # [B, n, s']
    old = (~spad)[:, None, :].expand(-1, n, -1)  # [B, n, s]
    allowed = torch.cat([old, leaving], dim=-1).unsqueeze(1)
    ck = torch.cat([sk, gather_slots(kc, idx)], dim=-2)
    cv = torch.cat([sv, gather_slots(vc, idx)], dim=-2)
    part = sink_attention(q, ck, cv, allowed, scale)
    # After the step every candidate has left the window: at most `sinks` are real.
    keep_slots, kept = first_true(torch.cat([~spad, valid], dim=-1), sinks)
    new = (gather_slots(ck, keep_slots), gather_slots(cv, keep_slots), ~kept, total)
    return keep & ~is_sink, part, new


def _blocks(x: Tensor, nblk: int, c: int, pad_blocks: int) -> Tensor:
    # (B, H, L, ...) -> (B, H, nblk + 2 pad, C, ...) zero-padded by ``pad_blocks`` blocks
    # on both sides (so that block t + delta is index pad + t + delta).
    y = shifted(x, -pad_blocks * c, (nblk + 2 * pad_blocks) * c, dim=2)
    return y.reshape(*y.shape[:2], nblk + 2 * pad_blocks, c, *y.shape[3:])


def _scan_states(u: Tensor, e: Tensor, floor: float, reverse: bool) -> tuple[Tensor, Tensor]:
    """Inclusive prefix (or suffix) sums of block states under running maxima.

    ``u: (B, H, n, M, dv + 1)`` with ``u_t`` stored relative to ``exp(e_t)``, ``e: (B, H, n)``.
    Returns ``P: (B, H, n, M, dv + 1)``, ``p: (B, H, n)`` with ``P_t exp(p_t) = sum_{s <= t}
    u_s exp(e_s)`` (``s >= t`` if ``reverse``); every factor is ``exp`` of a number <= 0.
    """
    if reverse:
        u, e = u.flip(2), e.flip(2)
    p = torch.cummax(e, dim=-1).values
    prev = torch.cat([torch.full_like(p[..., :1], floor), p[..., :-1]], dim=-1)
    decay = torch.exp(prev - p)[..., None, None].unbind(2)
    weight = torch.exp(e - p)[..., None, None].unbind(2)
    out, state = [], None
    for u_t, d_t, w_t in zip(u.unbind(2), decay, weight):
        state = u_t * w_t if state is None else torch.addcmul(u_t * w_t, state, d_t)
        out.append(state)
    res = torch.stack(out, dim=2)
    return (res.flip(2), p.flip(-1)) if reverse else (res, p)


def far_block_sums_reference(u: Tensor, reach: int) -> Tensor:
    """``F_t = sum_{|s - t| > reach} u_s`` along dim 2, by an ``n x n`` mask (the oracle
    of :func:`far_block_sums`). Shapes: ``u: (B, H, n, ...)``, result like ``u``."""
    n = u.shape[2]
    idx = torch.arange(n, device=u.device)
    far = ((idx[:, None] - idx[None, :]).abs() > reach).to(u.dtype)  # [t, s]
    return torch.einsum("ts,bhs...->bht...", far, u)


class _FarBlockSums(torch.autograd.Function):
    # The map u -> F is linear and symmetric (s is far from t iff t is far from s), so its
    # backward is the same map applied to the incoming gradient.
    @staticmethod
    def forward(u: Tensor, reach: int) -> Tensor:
        return far_sums(u.movedim(2, 0).contiguous(), reach).movedim(0, 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.reach = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _FarBlockSums.apply(grad.contiguous(), ctx.reach), None


def far_block_sums(u: Tensor, reach: int) -> Tensor:
    """``F_t = sum_{|s - t| > reach} u_s`` along dim 2 (the far state of every block) in
    O(n) block additions, forward and backward. Shapes: ``u: (B, H, n, ...)``, result
    like ``u``. Equivalent to :func:`far_block_sums_reference`."""
    return _FarBlockSums.apply(u.contiguous(), reach)


# Largest spread of key log-scales for which one sequence-wide stabilizer is kept (exp of
# -60 / -600 stays far above the float32 / float64 underflow); beyond, the recurrence.
SPREAD_FLOAT32 = 60.0
SPREAD_FLOAT64 = 600.0


def far_block(window: int, length: int) -> int:
    """Rows per block of the far part (block states every ``C`` keys).

    ``C`` dividing ``w`` or ``w + 1`` leaves only the two (bidirectional; causal: one)
    triangular mixed offsets; ``C = 64`` measured best for ``w = 64`` (smaller blocks
    cost more in block states than they save in pairs) and is used for small windows."""
    c = 64
    if 32 <= window <= 128:
        c = window
    elif window > 128:
        c = next((c for c in range(128, 31, -1) if window % c == 0 or (window + 1) % c == 0), 64)
    return max(1, min(length, c))


def favor_window_bidirectional(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    window: int,
    linear_factor: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    block_size: int | None = None,
    sinks: int = 0,
) -> Tensor:
    """Bidirectional hybrid by blocks of ``C`` tokens (see ``ops/favor/README.md``).

    Shapes: ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``, ``key_padding_mask: (B, L)``
    (padded keys and values finite), ``linear_factor: (H,)``, ``()`` or None.
    ``window = -1``: no band (the empty ``|i - j| <= -1``). ``sinks``: the first ``sinks``
    real keys are scored exactly (:func:`sink_part`) and left out of the far part.
    Returns ``(B, H, L, dv)``.

    For query block ``t``, key blocks ``u`` with ``|u - t| > D = ceil(w / C)`` are wholly
    far: they enter through the prefix sums ``P_{t-D-1}`` and suffix sums ``S_{t+D+1}`` of
    the block states ``U_u = sum_{j in u} phi_j^T [v_j, 1]``; the blocks with
    ``floor((w + 1) / C) <= |u - t| <= D`` are mixed and scored pair by pair; the near
    pairs are :func:`band_attention`'s. Equivalent to :func:`favor_naive` with
    ``window`` (``causal=False``).
    """
    length = q.shape[-2]
    keep = None if key_padding_mask is None else ~key_padding_mask
    near = band_blocks(
        q, k, v, keep, window, False, params.scale, block_size or band_block(window, length)
    )
    if window + 1 >= length:
        # Every key is inside every window (sinks included): exact attention.
        return keep_in_graph(combine([near], fm.positive_exp), params.weight, linear_factor)
    # No band (window=None, -1 here): no part (a constant empty part trips inductor).
    parts = [near] if window >= 0 else []
    if sinks:
        keep, part = sink_part(q, k, v, keep, sinks, window, False, params.scale)
        parts.append(part)
    lc = fm.log_const(params)
    if isinstance(lc, Tensor):
        lc = lc.unsqueeze(-1)
    spread = SPREAD_FLOAT64 if q.dtype == torch.float64 else SPREAD_FLOAT32
    fast = far_blocks(q, k, v, keep, fm, params, window, far_block(window, length), spread)
    if fast is not None:
        far, rq, top = fast
        scale_far = rq + top.unsqueeze(-1) + 2 * lc
    else:
        far, scale_far = far_running_max(q, k, v, keep, fm, params, window)
        scale_far = scale_far + 2 * lc
    lf = _factor(linear_factor)
    if lf is not None:
        far = far * lf
    return combine([*parts, (far, scale_far)], fm.positive_exp)


def far_running_max(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    fm: FeatureMap,
    params: FeatureParams,
    window: int,
) -> tuple[Tensor, Tensor]:
    """The bidirectional far part under running-maximum block stabilizers (plain
    autograd, no data-dependent branch): for keys whose log-scales spread too far for one
    stabilizer, while a graph is captured (torch.compile, torch.func), and the reference
    of :func:`~linattn.ops.favor.blocks.far_blocks`.

    Shapes: ``keep: (B, L)`` bool (True = a key the far part sees) or None. Returns
    ``nd: (B, H, L, dv + 1)`` and ``g: (B, H, L)`` with the far sum
    ``sum_{|j - i| > w} F_qi.F_kj exp(r_qi + r_kj) [v_j, 1] = exp(g_i) nd_i``.
    """
    bsz, heads, length, _ = q.shape
    dv = v.shape[-1]
    c = far_block(window, length)
    nblk = -(-length // c)
    big = -(-window // c) if window >= 0 else 0  # D
    lo = (window + 1) // c
    mixed = [dlt for dlt in range(-big, big + 1) if abs(dlt) >= lo]
    floor = torch.finfo(q.dtype).min
    fq, rq = fm.stabilized_query(q, params)
    fk, rk = fm.stabilized(k, params, is_query=False)
    real = torch.ones(bsz, length, dtype=torch.bool, device=q.device) if keep is None else keep
    rk = rk.masked_fill(~real[:, None, :], -math.inf)
    pad = big + 1
    fkb = _blocks(fk, nblk, c, pad)  # [B, H, nblk + 2 pad, C, M]
    rkb = _blocks(rk, nblk, c, pad)
    realb = _blocks(real.unsqueeze(1), nblk, c, pad)  # [B, 1, nblk + 2 pad, C]
    rkb = rkb.masked_fill(~realb, -math.inf)
    v1b = _blocks(ones_col(v), nblk, c, pad)
    fqb = _blocks(fq, nblk, c, 0)  # [B, H, nblk, C, M]
    with torch.no_grad():
        e = rkb.amax(-1)  # [B, H, nblk + 2 pad]
        e = torch.where(torch.isfinite(e), e, floor)
    wk = torch.exp(rkb - e.unsqueeze(-1))  # 0 for padding
    u = fkb.transpose(-2, -1) @ (v1b * wk.unsqueeze(-1))  # [B, H, nblk + 2 pad, M, dv+1]
    pre, p = _scan_states(u, e, floor, reverse=False)
    suf, s = _scan_states(u, e, floor, reverse=True)
    # Query block t (index pad + t in the padded stacks): P at pad + t - D - 1 = t,
    # S at pad + t + D + 1 = t + 2 pad.
    left, pl = pre[:, :, :nblk], p[..., :nblk]
    right, pr = suf[:, :, 2 * pad :], s[..., 2 * pad :]
    with torch.no_grad():
        g = torch.maximum(pl, pr)
        for dlt in mixed:
            g = torch.maximum(g, e[..., pad + dlt : pad + dlt + nblk])
    state = left * torch.exp(pl - g)[..., None, None] + right * torch.exp(pr - g)[..., None, None]
    far = fqb @ state  # [B, H, nblk, C, dv+1]
    a = torch.arange(c, device=q.device)
    for dlt in mixed:
        sl = slice(pad + dlt, pad + dlt + nblk)
        # Pair (a, b): query t C + a, key (t + dlt) C + b; far when |dlt C + b - a| > w.
        is_far = (dlt * c + a[None, :] - a[:, None]).abs() > window  # [C, C]
        wts = torch.exp(rkb[:, :, sl] - g.unsqueeze(-1)).unsqueeze(-2)  # [B, H, nblk, 1, C]
        sc = (fqb @ fkb[:, :, sl].transpose(-2, -1)) * wts
        sc = sc.masked_fill(~is_far, 0.0)
        far = far + sc @ v1b[:, :, sl]
    far = far.reshape(bsz, heads, nblk * c, dv + 1)[:, :, :length]
    return far, rq + g.repeat_interleave(c, dim=-1)[..., :length]
