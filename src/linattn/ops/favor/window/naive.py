"""Plain-autograd forms of the window hybrid's parts: the references of the block-pair
fast paths (``band.py``, ``far.py``), also run where those cannot: the decoding step's
band (queries at an offset), the far part when the keys' log-scales spread too far for
one stabilizer, and while a graph is captured (torch.compile, torch.func).

* :func:`band_attention`: the exact band by an ``unfold`` of the keys;
* :func:`far_left`: the causal far part (keys ``j <= i - w``) by the chunked causal scan
  of ``causal.py`` over the key sequence shifted ``w`` places right;
* :func:`far_running_max`: the bidirectional far part under running-maximum block
  stabilizers (prefix and suffix block sums);
* :func:`far_block_sums_reference`: the far block sums by an ``n x n`` mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ....features import FeatureMap, FeatureParams
from ..causal import causal_scan_raw, initial_state
from ..common import ones_col
from .band import band_block
from .far import far_block
from .layout import padded_blocks, shifted


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
    *,
    key_bias: Tensor | None = None,
    query_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear scores of query ``a`` against the keys at positions ``j <= a + start``.

    Shapes: ``q: (B, H, n, d)``, ``k: (B, H, Lk, d)``, ``v: (B, H, Lk, dv)``, ``keep:
    (B, Lk)`` float (1 = real key) or None; ``initial``: a causal state for keys before
    position 0. ``key_bias: (H, Lk)``, ``query_bias: (H, n)``: log-weights added to the
    keys' and the queries' log-scales (the far part's decay), or None. Returns ``nd: (B,
    H, n, dv + 1)``, ``g: (B, H, n)`` (the true sum ``sum_j exp(qb_a + kb_j)
    phi(q_a).phi(k_j) [v_j, 1] = exp(g_a) nd_a``) and the state ``(S, c)`` after the keys
    ``j <= n - 1 + start``.
    """
    bsz, heads, n, _ = q.shape
    ks, vs = shifted(k, start, n), shifted(v, start, n)
    kept = keep if keep is not None else k.new_ones(k.shape[0], k.shape[-2])
    ke = shifted(kept, start, n, dim=-1)
    kb = None if key_bias is None else shifted(key_bias, start, n, dim=-1)
    if initial is None:
        m = fm.feature_dim(params.weight, q.shape[-1])
        initial = initial_state((bsz, heads), m, v.shape[-1], dtype=q.dtype, device=q.device)
    nd, g, state, stab = causal_scan_raw(
        q, ks, vs, initial[0], initial[1], fm, params, ke, max(1, min(chunk, n)), key_bias=kb
    )
    lc = fm.log_const(params)
    if isinstance(lc, Tensor):
        lc = lc.unsqueeze(-1)
    g = g + 2 * lc
    if query_bias is not None:
        g = g + query_bias
    return nd, g, state, stab


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
    of :func:`~linattn.ops.favor.window.far.far_blocks`.

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
    fkb = padded_blocks(fk, nblk, c, pad)  # [B, H, nblk + 2 pad, C, M]
    rkb = padded_blocks(rk, nblk, c, pad)
    realb = padded_blocks(real.unsqueeze(1), nblk, c, pad)  # [B, 1, nblk + 2 pad, C]
    rkb = rkb.masked_fill(~realb, -math.inf)
    v1b = padded_blocks(ones_col(v), nblk, c, pad)
    fqb = padded_blocks(fq, nblk, c, 0)  # [B, H, nblk, C, M]
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


def far_block_sums_reference(u: Tensor, reach: int) -> Tensor:
    """``F_t = sum_{|s - t| > reach} u_s`` along dim 2, by an ``n x n`` mask (the oracle
    of :func:`far_block_sums`). Shapes: ``u: (B, H, n, ...)``, result like ``u``."""
    n = u.shape[2]
    idx = torch.arange(n, device=u.device)
    far = ((idx[:, None] - idx[None, :]).abs() > reach).to(u.dtype)  # [t, s]
    return torch.einsum("ts,bhs...->bht...", far, u)
