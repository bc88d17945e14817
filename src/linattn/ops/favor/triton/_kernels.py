"""Triton kernels for FAVOR+ with the positive (and hyperbolic) softmax features.

Imported lazily (only when triton is installed and a Triton path was selected). Every
kernel recomputes the features from ``x`` and the folded projection ``W'`` (``(M, d)``,
``sqrt(scale) * log2(e)`` folded in, ``[W, -W]`` for the hyperbolic map) inside its tile
loop; no ``(L, M)`` feature matrix is ever written to memory.

Feature logits (log2 units): ``Lx = x W'^T - hn |x|^2`` (``hn = log2(e) scale / 2`` for
keys, 0 for queries, whose norm term cancels). A kernel forms ``F = exp2(Lx - ref)`` with a
per-row reference ``ref`` chosen by the caller so that every exponent is ``<= 0``
(see ``README.md`` in this folder). Tiles: ``BL`` rows, ``BM`` features, ``BD >= d`` and
``BDV >= dv`` (powers of two, masked). ``DT`` is the dtype of ``tl.dot`` operands (the
input's half dtype on GPU, float32 otherwise); accumulation is always float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

LN2 = 0.6931471805599453


@triton.jit
def _logits(
    x,
    w_ptr,
    f0,
    M,
    d,
    BM: tl.constexpr,
    BD: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # x: (BL, BD) -> x @ W'[f0:f0+BM]^T (BL, BM) float32; features >= M get -inf.
    # SPLIT (half inputs): x is exact in its dtype; W' = hi + lo, both in x's dtype, and two
    # tensor-core dots give the logits to ~16 bits (an error in a logit is a relative
    # error in its feature, so one rounding of W' to 8 bits would cost ~1%).
    offs_f = f0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    w = tl.load(
        w_ptr + offs_f[:, None] * d + offs_d[None, :],
        mask=(offs_f[:, None] < M) & (offs_d[None, :] < d),
        other=0.0,
    )
    if SPLIT:
        w_hi = w.to(x.dtype)
        w_lo = (w - w_hi.to(tl.float32)).to(x.dtype)
        lg = tl.dot(x, tl.trans(w_hi))
        lg = tl.dot(x, tl.trans(w_lo), lg)
    else:
        lg = tl.dot(x.to(DT), tl.trans(w).to(DT), input_precision=PREC)
    return tl.where((offs_f < M)[None, :], lg, float("-inf")), w


@triton.jit
def rowmax_kernel(
    X,
    W,
    R,
    L,
    M,
    d,
    hn,
    w_head_stride,
    H,
    BL: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """R[bh, i] = max_f (x_i W'^T)_f - hn |x_i|^2.  grid (BH, cdiv(L, BL))."""
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B H L d can pass 2**31
    rows = tl.program_id(1) * BL + tl.arange(0, BL)
    offs_d = tl.arange(0, BD)
    valid = rows < L
    x = tl.load(
        X + bh * L * d + rows[:, None] * d + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < d),
        other=0.0,
    )
    w_ptr = W + (bh % H) * w_head_stride
    best = tl.full((BL,), float("-inf"), tl.float32)
    for f0 in range(0, M, BM):
        lg, _ = _logits(x, w_ptr, f0, M, d, BM, BD, DT, PREC, SPLIT)
        best = tl.maximum(best, tl.max(lg, axis=1))
    xf = x.to(tl.float32)
    best = best - hn * tl.sum(xf * xf, axis=1)
    tl.store(R + bh * L + rows, best, mask=valid)


@triton.jit
def state_kernel(
    X,
    Y,
    YS,
    Y1,
    REF,
    W,
    S_OUT,
    Z_OUT,
    L,
    M,
    d,
    dv,
    rows_per_split,
    hn,
    w_head_stride,
    H,
    HAS_YS: tl.constexpr,
    HAS_Y1: tl.constexpr,
    BL: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Partial sums over one split of rows, for one tile of features:
    ``S[split, bh] = sum_i F_i^T (ys_i y_i)``, ``Z[split, bh] = sum_i F_i y1_i`` with
    ``F_i = exp2(Lx_i - ref_i)``.  grid (BH, cdiv(M, BM), num_splits).

    Key state (forward): x = k, y = v, y1 = 1. Query-side gradient state (backward):
    x = q, y = dout, ys = 1 / den, y1 = -(dout . out) / den.
    """
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B H L d can pass 2**31
    f0 = tl.program_id(1) * BM
    split = tl.program_id(2)
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    offs_f = f0 + tl.arange(0, BM)
    w_ptr = W + (bh % H) * w_head_stride
    acc = tl.zeros((BM, BDV), tl.float32)
    accz = tl.zeros((BM,), tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, L)
    for r0 in range(start, stop, BL):
        rows = r0 + tl.arange(0, BL)
        valid = rows < stop
        x = tl.load(
            X + bh * L * d + rows[:, None] * d + offs_d[None, :],
            mask=valid[:, None] & (offs_d[None, :] < d),
            other=0.0,
        )
        lg, _ = _logits(x, w_ptr, f0, M, d, BM, BD, DT, PREC, SPLIT)
        xf = x.to(tl.float32)
        ref = tl.load(REF + bh * L + rows, mask=valid, other=float("inf"))
        lg = lg - (hn * tl.sum(xf * xf, axis=1) + ref)[:, None]
        feats = tl.exp2(lg)
        feats = tl.where(valid[:, None], feats, 0.0)
        y = tl.load(
            Y + bh * L * dv + rows[:, None] * dv + offs_v[None, :],
            mask=valid[:, None] & (offs_v[None, :] < dv),
            other=0.0,
        ).to(tl.float32)
        if HAS_YS:
            y = y * tl.load(YS + bh * L + rows, mask=valid, other=0.0)[:, None]
        acc += tl.dot(tl.trans(feats.to(DT)), y.to(DT), input_precision=PREC)
        if HAS_Y1:
            y1 = tl.load(Y1 + bh * L + rows, mask=valid, other=0.0)
            accz += tl.sum(feats * y1[:, None], axis=0)
        else:
            accz += tl.sum(feats, axis=0)
    out = split * tl.num_programs(0) + bh
    tl.store(
        S_OUT + out * M * dv + offs_f[:, None] * dv + offs_v[None, :],
        acc,
        mask=(offs_f[:, None] < M) & (offs_v[None, :] < dv),
    )
    tl.store(Z_OUT + out * M + offs_f, accz, mask=offs_f < M)


@triton.jit
def apply_kernel(
    X,
    REF,
    W,
    S,
    Z,
    OUT,
    DEN,
    L,
    M,
    d,
    dv,
    w_head_stride,
    H,
    BL: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Bidirectional output: ``out_i = (F_i S) / (F_i . z)`` with ``F_i = exp2(q_i W'^T -
    ref_i)``; rows with ``den == 0`` get 0. Stores ``out`` (OUT's dtype) and ``den``.
    grid (BH, cdiv(L, BL))."""
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B H L d can pass 2**31
    rows = tl.program_id(1) * BL + tl.arange(0, BL)
    valid = rows < L
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    w_ptr = W + (bh % H) * w_head_stride
    x = tl.load(
        X + bh * L * d + rows[:, None] * d + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < d),
        other=0.0,
    )
    ref = tl.load(REF + bh * L + rows, mask=valid, other=0.0)
    num = tl.zeros((BL, BDV), tl.float32)
    den = tl.zeros((BL,), tl.float32)
    for f0 in range(0, M, BM):
        offs_f = f0 + tl.arange(0, BM)
        lg, _ = _logits(x, w_ptr, f0, M, d, BM, BD, DT, PREC, SPLIT)
        feats = tl.exp2(lg - ref[:, None])
        s = tl.load(
            S + bh * M * dv + offs_f[:, None] * dv + offs_v[None, :],
            mask=(offs_f[:, None] < M) & (offs_v[None, :] < dv),
            other=0.0,
        )
        z = tl.load(Z + bh * M + offs_f, mask=offs_f < M, other=0.0)
        num += tl.dot(feats.to(DT), s.to(DT), input_precision=PREC)
        den += tl.sum(feats * z[None, :], axis=1)
    out = tl.where((den > 0)[:, None], num / tl.where(den > 0, den, 1.0)[:, None], 0.0)
    tl.store(
        OUT + bh * L * dv + rows[:, None] * dv + offs_v[None, :],
        out.to(OUT.dtype.element_ty),
        mask=valid[:, None] & (offs_v[None, :] < dv),
    )
    tl.store(DEN + bh * L + rows, den, mask=valid)


@triton.jit
def grad_kernel(
    X,
    REF,
    Y,
    YS,
    Y1,
    W,
    S,
    Z,
    DX,
    DY,
    L,
    M,
    d,
    dv,
    hn,
    w_head_stride,
    H,
    HAS_YS: tl.constexpr,
    HAS_Y1: tl.constexpr,
    WANT_DY: tl.constexpr,
    BL: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Gradient through ``F_i = exp2(Lx_i - ref_i)`` given a state ``(S, z)``:
    ``dF = (ys y) S^T + y1 z^T``, ``dLx = ln2 F dF``, ``dx = dLx W' - 2 hn x rowsum(dLx)``
    and (``WANT_DY``) ``dy = F S``.  grid (BH, cdiv(L, BL)).

    Queries: x = q, y = dout, ys = 1/den, y1 = -(dout . out)/den, (S, z) the key state.
    Keys: x = k, y = v, (S, z) = the gradient state (dS, dz); dy = dv.
    """
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B H L d can pass 2**31
    rows = tl.program_id(1) * BL + tl.arange(0, BL)
    valid = rows < L
    offs_d = tl.arange(0, BD)
    offs_v = tl.arange(0, BDV)
    w_ptr = W + (bh % H) * w_head_stride
    x = tl.load(
        X + bh * L * d + rows[:, None] * d + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < d),
        other=0.0,
    )
    xf = x.to(tl.float32)
    ref = tl.load(REF + bh * L + rows, mask=valid, other=float("inf"))
    ref = ref + hn * tl.sum(xf * xf, axis=1)
    y = tl.load(
        Y + bh * L * dv + rows[:, None] * dv + offs_v[None, :],
        mask=valid[:, None] & (offs_v[None, :] < dv),
        other=0.0,
    ).to(tl.float32)
    if HAS_YS:
        y = y * tl.load(YS + bh * L + rows, mask=valid, other=0.0)[:, None]
    if HAS_Y1:
        y1 = tl.load(Y1 + bh * L + rows, mask=valid, other=0.0)
    else:
        y1 = tl.where(valid, 1.0, 0.0)
    dx = tl.zeros((BL, BD), tl.float32)
    rs = tl.zeros((BL,), tl.float32)
    dy = tl.zeros((BL, BDV), tl.float32)
    for f0 in range(0, M, BM):
        offs_f = f0 + tl.arange(0, BM)
        lg, w = _logits(x, w_ptr, f0, M, d, BM, BD, DT, PREC, SPLIT)
        feats = tl.where(valid[:, None], tl.exp2(lg - ref[:, None]), 0.0)
        s = tl.load(
            S + bh * M * dv + offs_f[:, None] * dv + offs_v[None, :],
            mask=(offs_f[:, None] < M) & (offs_v[None, :] < dv),
            other=0.0,
        )
        z = tl.load(Z + bh * M + offs_f, mask=offs_f < M, other=0.0)
        dfeat = tl.dot(y.to(DT), tl.trans(s).to(DT), input_precision=PREC)
        dfeat += y1[:, None] * z[None, :]
        dlg = LN2 * feats * dfeat
        dx += tl.dot(dlg.to(DT), w.to(DT), input_precision=PREC)
        rs += tl.sum(dlg, axis=1)
        if WANT_DY:
            dy += tl.dot(feats.to(DT), s.to(DT), input_precision=PREC)
    dx -= (2.0 * hn) * xf * rs[:, None]
    tl.store(
        DX + bh * L * d + rows[:, None] * d + offs_d[None, :],
        dx.to(DX.dtype.element_ty),
        mask=valid[:, None] & (offs_d[None, :] < d),
    )
    if WANT_DY:
        tl.store(
            DY + bh * L * dv + rows[:, None] * dv + offs_v[None, :],
            dy.to(DY.dtype.element_ty),
            mask=valid[:, None] & (offs_v[None, :] < dv),
        )


@triton.jit
def _chunk_feats(
    Q,
    K,
    RQ,
    C,
    KEY_WEIGHT,
    w_ptr,
    bh,
    b,
    rows,
    valid,
    f0,
    L,
    M,
    d,
    hn,
    HAS_MASK: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # Query features Qf = exp2(q W'^T - rq) and key features relative to their own prefix
    # maximum Kc = exp2(Lk - c) (both <= 1; 0 on rows >= L and on padded keys).
    offs_d = tl.arange(0, BD)
    xm = valid[:, None] & (offs_d[None, :] < d)
    q = tl.load(Q + bh * L * d + rows[:, None] * d + offs_d[None, :], mask=xm, other=0.0)
    k = tl.load(K + bh * L * d + rows[:, None] * d + offs_d[None, :], mask=xm, other=0.0)
    rq = tl.load(RQ + bh * L + rows, mask=valid, other=0.0)
    c = tl.load(C + bh * L + rows, mask=valid, other=0.0)
    lq, w = _logits(q, w_ptr, f0, M, d, BM, BD, DT, PREC, SPLIT)
    qf = tl.where(valid[:, None], tl.exp2(lq - rq[:, None]), 0.0)
    lk, _ = _logits(k, w_ptr, f0, M, d, BM, BD, DT, PREC, SPLIT)
    kf32 = k.to(tl.float32)
    keep = valid
    if HAS_MASK:
        # KEY_WEIGHT: (B, L) float, 1 for a real key, 0 for padding.
        keep = keep & (tl.load(KEY_WEIGHT + b * L + rows, mask=valid, other=0.0) > 0)
    lk = lk - (hn * tl.sum(kf32 * kf32, axis=1) + c)[:, None]
    kf = tl.where(keep[:, None], tl.exp2(lk), 0.0)
    return kf32, c, qf, kf, w


@triton.jit
def causal_fwd_kernel(
    Q,
    K,
    V,
    RQ,
    C,
    KEY_WEIGHT,
    W,
    S_IN,
    Z_IN,
    E_IN,
    NUM,
    DEN,
    L,
    M,
    d,
    dv,
    seg_len,
    hn,
    w_head_stride,
    H,
    heads,
    HAS_MASK: tl.constexpr,
    CH: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Causal forward for one feature tile over one segment, chunk by chunk; the state
    ``(S, z)`` (relative to the stabilizer ``e``) is carried in registers. Partial
    numerators/denominators of the feature tile are added into NUM/DEN (float32).
    grid (BH, cdiv(M, BM), num_segments)."""
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B H L d can pass 2**31
    f0 = tl.program_id(1) * BM
    seg = tl.program_id(2)
    nseg = tl.num_programs(2)
    b = bh // heads
    w_ptr = W + (bh % H) * w_head_stride
    offs_f = f0 + tl.arange(0, BM)
    offs_v = tl.arange(0, BDV)
    ar = tl.arange(0, CH)
    sidx = bh * nseg + seg
    st = tl.load(
        S_IN + sidx * M * dv + offs_f[:, None] * dv + offs_v[None, :],
        mask=(offs_f[:, None] < M) & (offs_v[None, :] < dv),
        other=0.0,
    )
    zt = tl.load(Z_IN + sidx * M + offs_f, mask=offs_f < M, other=0.0)
    e = tl.load(E_IN + sidx)
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, L)
    for r0 in range(start, stop, CH):
        rows = r0 + ar
        valid = rows < stop
        _kf32, c, qf, kf, _w = _chunk_feats(
            Q,
            K,
            RQ,
            C,
            KEY_WEIGHT,
            w_ptr,
            bh,
            b,
            rows,
            valid,
            f0,
            L,
            M,
            d,
            hn,
            HAS_MASK,
            BM,
            BD,
            DT,
            PREC,
            SPLIT,
        )
        v = tl.load(
            V + bh * L * dv + rows[:, None] * dv + offs_v[None, :],
            mask=valid[:, None] & (offs_v[None, :] < dv),
            other=0.0,
        )
        tri = (ar[None, :] <= ar[:, None]) & valid[:, None] & valid[None, :]
        decay = tl.exp2(tl.where(tri, c[None, :] - c[:, None], float("-inf")))
        a = tl.dot(qf.to(DT), tl.trans(kf).to(DT), input_precision=PREC) * decay
        num = tl.dot(a.to(DT), v.to(DT), input_precision=PREC)
        den = tl.sum(a, axis=1)
        fi = tl.where(valid, tl.exp2(e - c), 0.0)
        num += fi[:, None] * tl.dot(qf.to(DT), st.to(DT), input_precision=PREC)
        den += fi * tl.sum(qf * zt[None, :], axis=1)
        tl.atomic_add(
            NUM + bh * L * dv + rows[:, None] * dv + offs_v[None, :],
            num,
            mask=valid[:, None] & (offs_v[None, :] < dv),
        )
        tl.atomic_add(DEN + bh * L + rows, den, mask=valid)
        e_new = tl.max(tl.where(valid, c, float("-inf")), axis=0)
        kw = kf * tl.where(valid, tl.exp2(c - e_new), 0.0)[:, None]
        dec = tl.exp2(e - e_new)
        st = st * dec + tl.dot(tl.trans(kw).to(DT), v.to(DT), input_precision=PREC)
        zt = zt * dec + tl.sum(kw, axis=0)
        e = e_new


@triton.jit
def causal_dq_kernel(
    Q,
    K,
    V,
    G,
    YS,
    GD,
    RQ,
    C,
    KEY_WEIGHT,
    W,
    S_IN,
    Z_IN,
    E_IN,
    DQ,
    L,
    M,
    d,
    dv,
    seg_len,
    hn,
    w_head_stride,
    H,
    heads,
    HAS_MASK: tl.constexpr,
    CH: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Causal backward, queries: forward scan re-forming the states; with
    ``P_ij = g_i . v_j + gd_i`` (``g = dout / den``, ``gd = -(dout . out) / den``),
    ``dQf_i = sum_{j<=i, chunk} P_ij exp2(c_j - c_i) Kc_j + exp2(e - c_i) (g_i S^T + gd_i z)``
    and ``dq += ln2 (Qf * dQf) W'`` added into DQ (float32). grid as the forward."""
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B H L d can pass 2**31
    f0 = tl.program_id(1) * BM
    seg = tl.program_id(2)
    nseg = tl.num_programs(2)
    b = bh // heads
    w_ptr = W + (bh % H) * w_head_stride
    offs_f = f0 + tl.arange(0, BM)
    offs_v = tl.arange(0, BDV)
    offs_d = tl.arange(0, BD)
    ar = tl.arange(0, CH)
    sidx = bh * nseg + seg
    st = tl.load(
        S_IN + sidx * M * dv + offs_f[:, None] * dv + offs_v[None, :],
        mask=(offs_f[:, None] < M) & (offs_v[None, :] < dv),
        other=0.0,
    )
    zt = tl.load(Z_IN + sidx * M + offs_f, mask=offs_f < M, other=0.0)
    e = tl.load(E_IN + sidx)
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, L)
    for r0 in range(start, stop, CH):
        rows = r0 + ar
        valid = rows < stop
        _kf32, c, qf, kf, w = _chunk_feats(
            Q,
            K,
            RQ,
            C,
            KEY_WEIGHT,
            w_ptr,
            bh,
            b,
            rows,
            valid,
            f0,
            L,
            M,
            d,
            hn,
            HAS_MASK,
            BM,
            BD,
            DT,
            PREC,
            SPLIT,
        )
        vm = valid[:, None] & (offs_v[None, :] < dv)
        v = tl.load(V + bh * L * dv + rows[:, None] * dv + offs_v[None, :], mask=vm, other=0.0)
        g = tl.load(G + bh * L * dv + rows[:, None] * dv + offs_v[None, :], mask=vm, other=0.0).to(
            tl.float32
        )
        g = g * tl.load(YS + bh * L + rows, mask=valid, other=0.0)[:, None]
        gd = tl.load(GD + bh * L + rows, mask=valid, other=0.0)
        tri = (ar[None, :] <= ar[:, None]) & valid[:, None] & valid[None, :]
        decay = tl.exp2(tl.where(tri, c[None, :] - c[:, None], float("-inf")))
        p = tl.dot(g.to(DT), tl.trans(v).to(DT), input_precision=PREC) + gd[:, None]
        dqf = tl.dot((p * decay).to(DT), kf.to(DT), input_precision=PREC)
        fi = tl.where(valid, tl.exp2(e - c), 0.0)
        inter = tl.dot(g.to(DT), tl.trans(st).to(DT), input_precision=PREC)
        dqf += fi[:, None] * (inter + gd[:, None] * zt[None, :])
        dlq = LN2 * qf * dqf
        dq = tl.dot(dlq.to(DT), w.to(DT), input_precision=PREC)
        tl.atomic_add(
            DQ + bh * L * d + rows[:, None] * d + offs_d[None, :],
            dq,
            mask=valid[:, None] & (offs_d[None, :] < d),
        )
        e_new = tl.max(tl.where(valid, c, float("-inf")), axis=0)
        kw = kf * tl.where(valid, tl.exp2(c - e_new), 0.0)[:, None]
        dec = tl.exp2(e - e_new)
        st = st * dec + tl.dot(tl.trans(kw).to(DT), v.to(DT), input_precision=PREC)
        zt = zt * dec + tl.sum(kw, axis=0)
        e = e_new


@triton.jit
def causal_dkv_kernel(
    Q,
    K,
    V,
    G,
    YS,
    GD,
    RQ,
    C,
    KEY_WEIGHT,
    W,
    D_IN,
    DZ_IN,
    B_IN,
    DK,
    DV,
    L,
    M,
    d,
    dv,
    seg_len,
    hn,
    w_head_stride,
    H,
    heads,
    HAS_MASK: tl.constexpr,
    CH: tl.constexpr,
    BM: tl.constexpr,
    BD: tl.constexpr,
    BDV: tl.constexpr,
    DT: tl.constexpr,
    PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Causal backward, keys and values: reverse scan over the segment's chunks carrying
    ``D = sum_{i later} exp2(bn - c_i) Qf_i^T g_i`` and ``Dz`` (same with ``gd``), relative
    to ``bn``, the prefix maximum at the start of the next chunk. Adds the feature tile's
    part of dk and dv into DK/DV (float32). grid as the forward."""
    bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: B H L d can pass 2**31
    f0 = tl.program_id(1) * BM
    seg = tl.program_id(2)
    nseg = tl.num_programs(2)
    b = bh // heads
    w_ptr = W + (bh % H) * w_head_stride
    offs_f = f0 + tl.arange(0, BM)
    offs_v = tl.arange(0, BDV)
    offs_d = tl.arange(0, BD)
    ar = tl.arange(0, CH)
    sidx = bh * nseg + seg
    dt_ = tl.load(
        D_IN + sidx * M * dv + offs_f[:, None] * dv + offs_v[None, :],
        mask=(offs_f[:, None] < M) & (offs_v[None, :] < dv),
        other=0.0,
    )
    dzt = tl.load(DZ_IN + sidx * M + offs_f, mask=offs_f < M, other=0.0)
    bn = tl.load(B_IN + sidx)
    start = seg * seg_len
    stop = tl.minimum(start + seg_len, L)
    nch = tl.cdiv(stop - start, CH)
    for t in range(0, nch):
        r0 = start + (nch - 1 - t) * CH
        rows = r0 + ar
        valid = rows < stop
        kf32, c, qf, kf, w = _chunk_feats(
            Q,
            K,
            RQ,
            C,
            KEY_WEIGHT,
            w_ptr,
            bh,
            b,
            rows,
            valid,
            f0,
            L,
            M,
            d,
            hn,
            HAS_MASK,
            BM,
            BD,
            DT,
            PREC,
            SPLIT,
        )
        vm = valid[:, None] & (offs_v[None, :] < dv)
        v = tl.load(V + bh * L * dv + rows[:, None] * dv + offs_v[None, :], mask=vm, other=0.0)
        g = tl.load(G + bh * L * dv + rows[:, None] * dv + offs_v[None, :], mask=vm, other=0.0).to(
            tl.float32
        )
        g = g * tl.load(YS + bh * L + rows, mask=valid, other=0.0)[:, None]
        gd = tl.load(GD + bh * L + rows, mask=valid, other=0.0)
        # Rows j (keys), columns i (queries): j <= i.
        tri = (ar[:, None] <= ar[None, :]) & valid[:, None] & valid[None, :]
        decay = tl.exp2(tl.where(tri, c[:, None] - c[None, :], float("-inf")))
        at = tl.dot(kf.to(DT), tl.trans(qf).to(DT), input_precision=PREC) * decay
        hj = tl.where(valid, tl.exp2(c - bn), 0.0)
        dvp = tl.dot(at.to(DT), g.to(DT), input_precision=PREC)
        dvp += hj[:, None] * tl.dot(kf.to(DT), dt_.to(DT), input_precision=PREC)
        pt = tl.dot(v.to(DT), tl.trans(g).to(DT), input_precision=PREC) + gd[None, :]
        dkf = tl.dot((pt * decay).to(DT), qf.to(DT), input_precision=PREC)
        dkf += hj[:, None] * (
            tl.dot(v.to(DT), tl.trans(dt_).to(DT), input_precision=PREC) + dzt[None, :]
        )
        dlk = LN2 * kf * dkf
        dk = tl.dot(dlk.to(DT), w.to(DT), input_precision=PREC)
        dk -= (2.0 * hn) * kf32 * tl.sum(dlk, axis=1)[:, None]
        tl.atomic_add(
            DK + bh * L * d + rows[:, None] * d + offs_d[None, :],
            dk,
            mask=valid[:, None] & (offs_d[None, :] < d),
        )
        tl.atomic_add(DV + bh * L * dv + rows[:, None] * dv + offs_v[None, :], dvp, mask=vm)
        bt = tl.min(tl.where(valid, c, float("inf")), axis=0)
        qw = qf * tl.where(valid, tl.exp2(bt - c), 0.0)[:, None]
        dec = tl.exp2(bt - bn)
        dt_ = dt_ * dec + tl.dot(tl.trans(qw).to(DT), g.to(DT), input_precision=PREC)
        dzt = dzt * dec + tl.sum(qw * gd[:, None], axis=0)
        bn = bt
