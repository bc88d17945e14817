"""Block-pair fast paths of the window hybrid, with hand-written backwards.

The sequence is cut into aligned blocks of ``C`` tokens (viewed, not copied, when ``C``
divides ``L``). Query block ``t`` meets key block ``t + delta`` through a fixed
``(C, C)`` mask of the pairs that part counts, so every product is a batched matmul of
slices of the same block views (no padded copies, no ``unfold``), and every gradient is
accumulated in place into preallocated block tensors:

* :func:`band_blocks`: the exact scores inside the window (what
  :func:`~linattn.ops.favor.window.band_attention` computes, its plain reference);
* :func:`far_blocks`: the bidirectional far part under one sequence-wide key
  stabilizer: the far state of each query block (:func:`far_sums`, the key blocks more
  than ``D`` blocks away) plus the far pairs of the mixed blocks. Its backward recomputes
  the features (as ``_FavorBidirectional`` does) instead of saving their autograd graph.
  Reference: the autograd form in ``favor_window_bidirectional``.

Derivations: ``ops/favor/README.md`` (sliding-window hybrid).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...features import FeatureMap, FeatureParams, _PositiveSoftmax
from .common import first_order_only, ones_col

_LN2 = math.log(2.0)


def to_blocks(x: Tensor, nblk: int, c: int) -> Tensor:
    """``(B, H, L, e) -> (B, H, nblk, C, e)``, zero-padded at the end (a copy) only when
    ``nblk * C > L``; a view otherwise."""
    extra = nblk * c - x.shape[2]
    if extra:
        x = F.pad(x, (0, 0, 0, extra))
    return x.reshape(x.shape[0], x.shape[1], nblk, c, x.shape[-1])


def _span(nblk: int, dlt: int) -> tuple[slice, slice] | None:
    # Query blocks t with a key block t + dlt inside the sequence, and those key blocks.
    t0, t1 = max(0, -dlt), min(nblk, nblk - dlt)
    if t1 <= t0:
        return None
    return slice(t0, t1), slice(t0 + dlt, t1 + dlt)


def pair_offsets(c: int, dlt: int, device) -> Tensor:
    """``(C, C)`` long: ``j - i`` for query ``a`` of block ``t`` and key ``b`` of block
    ``t + dlt``."""
    a = torch.arange(c, device=device)
    return dlt * c + a[None, :] - a[:, None]


def band_deltas(window: int, c: int, causal: bool) -> list[int]:
    """Block offsets that hold a near pair (``|j - i| <= w``; causal ``-w < j - i <= 0``)."""
    if causal:
        return list(range((1 - window) // c, 1)) if window > 0 else []
    if window < 0:
        return []
    reach = -(-window // c)
    return list(range(-reach, reach + 1))


def near_mask(c: int, dlt: int, window: int, causal: bool, device) -> Tensor:
    """``(C, C)`` bool: the pairs of block offset ``dlt`` inside the window."""
    rel = pair_offsets(c, dlt, device)
    if causal:
        return (rel <= 0) & (rel > -window)
    return rel.abs() <= window


class _BandBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, valid, window, causal, scale, c):
        bsz, heads, length, _ = q.shape
        dvd = v.shape[-1]
        nblk = -(-length // c)
        qb, kb = to_blocks(q, nblk, c), to_blocks(k, nblk, c)
        v1b = to_blocks(ones_col(v), nblk, c)
        # [B, 1, nblk, 1, C]: real keys (the padded tail of the last block is not).
        validb = valid.new_zeros(bsz, nblk * c)
        validb[:, :length] = valid
        validb = validb.reshape(bsz, 1, nblk, 1, c)
        mx = q.new_full((bsz, heads, nblk, c), -math.inf)
        pieces = []
        for dlt in band_deltas(window, c, causal):
            span = _span(nblk, dlt)
            if span is None:
                continue
            ts, us = span
            s = torch.matmul(qb[:, :, ts], kb[:, :, us].transpose(-2, -1)).mul_(scale)
            allowed = near_mask(c, dlt, window, causal, q.device) & validb[:, :, us]
            s.masked_fill_(~allowed, -math.inf)
            mx[:, :, ts] = torch.maximum(mx[:, :, ts], s.amax(-1))
            pieces.append((dlt, ts, us, s))
        mx_safe = torch.where(torch.isfinite(mx), mx, 0.0)
        nd = q.new_zeros(bsz, heads, nblk, c, dvd + 1)
        es = []
        for dlt, ts, us, s in pieces:
            e = s.sub_(mx_safe[:, :, ts].unsqueeze(-1)).exp_()
            nd[:, :, ts] += torch.matmul(e, v1b[:, :, us])
            es.append(e)
        ctx.spans, ctx.c, ctx.scale = [(ts, us) for _, ts, us, _ in pieces], c, scale
        ctx.shapes = (length, dvd)
        # The exp-scores (O(L w)) are kept: the backward needs them, and recomputing
        # costs a matmul and an exp per pair block.
        ctx.save_for_backward(q, k, v, *es)
        nd = nd.reshape(bsz, heads, nblk * c, dvd + 1)[:, :, :length]
        mx = mx.reshape(bsz, heads, nblk * c)[:, :, :length]
        ctx.mark_non_differentiable(mx)
        return nd, mx

    @staticmethod
    @first_order_only("favor_attention with window=")
    def backward(ctx, grad_nd, _grad_mx):
        q, k, v, *es = ctx.saved_tensors
        c, scale, (length, dvd) = ctx.c, ctx.scale, ctx.shapes
        nblk = -(-length // c)
        qb, kb = to_blocks(q, nblk, c), to_blocks(k, nblk, c)
        v1b = to_blocks(ones_col(v), nblk, c)
        gb = to_blocks(grad_nd.contiguous(), nblk, c)
        want = ctx.needs_input_grad
        dq = torch.zeros_like(qb) if want[0] else None
        dk = torch.zeros_like(kb) if want[1] else None
        dv1 = torch.zeros_like(v1b) if want[2] else None
        for (ts, us), e in zip(ctx.spans, es):
            g = gb[:, :, ts]
            if dv1 is not None:
                dv1[:, :, us] += torch.matmul(e.transpose(-2, -1), g)
            ds = torch.matmul(g, v1b[:, :, us].transpose(-2, -1)).mul_(e)
            if dq is not None:
                dq[:, :, ts] += torch.matmul(ds, kb[:, :, us])
            if dk is not None:
                dk[:, :, us] += torch.matmul(ds.transpose(-2, -1), qb[:, :, ts])

        def flat(x, cols):
            return x.reshape(*x.shape[:2], nblk * c, x.shape[-1])[:, :, :length, :cols]

        dq = None if dq is None else flat(dq.mul_(scale), q.shape[-1])
        dk = None if dk is None else flat(dk.mul_(scale), k.shape[-1])
        dv1 = None if dv1 is None else flat(dv1, dvd)
        return dq, dk, dv1, None, None, None, None, None


def band_blocks(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, window: int, causal: bool,
    scale: float, block: int,
) -> tuple[Tensor, Tensor]:
    """Exact scores inside the window by aligned block pairs (hand-written backward; the
    exp-scores are kept for it, O(L (w + C)) memory).

    Shapes: ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``, ``keep: (B, L)`` bool (True =
    real key) or None. Returns ``nd: (B, H, L, dv + 1)`` and ``mx: (B, H, L)`` (no
    gradient) with ``sum_{j near i, kept} exp(scale q_i.k_j) [v_j, 1] = exp(mx_i) nd_i``;
    ``mx = -inf`` and ``nd = 0`` where no key is near. Equivalent to
    :func:`~linattn.ops.favor.window.band_attention` (same ``window``, ``causal``).
    """
    bsz, heads, length, _ = q.shape
    if not band_deltas(window, 1, causal):
        return (q.new_zeros(bsz, heads, length, v.shape[-1] + 1),
                q.new_full((bsz, heads, length), -math.inf))
    if keep is None:
        keep = torch.ones(bsz, length, dtype=torch.bool, device=q.device)
    c = max(1, min(block, length))
    return _BandBlocks.apply(q, k, v, keep, window, causal, scale, c)


def far_sums(u: Tensor, reach: int) -> Tensor:
    """``F_t = sum_{|s - t| > reach} u_s`` along dim 2 (no autograd): running sums from
    the left and from the right, written into one output, in place on contiguous block
    slices (``cumsum`` over a middle axis is several times slower). The map is symmetric,
    so it is also its own adjoint."""
    n = u.shape[2]
    out = torch.zeros_like(u)
    if n <= reach + 1:
        return out
    acc = u[:, :, 0].clone()
    out[:, :, reach + 1].copy_(acc)
    for t in range(reach + 2, n):
        acc.add_(u[:, :, t - reach - 1])
        out[:, :, t].copy_(acc)
    acc.copy_(u[:, :, n - 1])
    out[:, :, n - reach - 2].add_(acc)
    for t in range(n - reach - 3, -1, -1):
        acc.add_(u[:, :, t + reach + 1])
        out[:, :, t].add_(acc)
    return out


def far_deltas(window: int, c: int) -> tuple[int, list[int]]:
    """``D`` (key blocks farther than ``D`` blocks are wholly far) and the offsets of the
    mixed blocks (some far pair, some near one or the query's own block)."""
    reach = -(-window // c) if window >= 0 else 0
    lo = (window + 1) // c
    return reach, [dlt for dlt in range(-reach, reach + 1) if abs(dlt) >= lo]


def _features(fm: FeatureMap, params: FeatureParams, x: Tensor):
    """Key-style features of ``x`` (``is_query=False``) under autograd, for a backward
    pass: ``(out, r_out, F, exp2)``. ``F`` is detached; the gradient of ``F`` goes into
    ``out`` as :func:`_grad_of` says; ``r_out`` is ``r`` when it carries a gradient (else
    None)."""
    with torch.enable_grad():
        if isinstance(fm, _PositiveSoftmax):
            # F = exp2(logits - max): dlogits = ln2 F dF; only the logits' matmul is
            # differentiated by autograd (max, the stabilizer, is a constant).
            logits = fm._logits2(x, params, with_norm=True)
            r2 = logits.detach().amax(dim=-1, keepdim=True)
            return logits, None, logits.detach().sub(r2).exp2_(), True
        feats, r = fm.stabilized(x, params, is_query=False)
        return feats, (r if r.requires_grad else None), feats.detach(), False


def _grad_of(feats: Tensor, dfeats: Tensor, exp2: bool) -> Tensor:
    # The gradient of _features' ``out`` (the exp2 maps' logits, or F itself).
    return dfeats.mul_(feats).mul_(_LN2) if exp2 else dfeats


class _FarBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weight, fm, params, fk, rk, top, window, c):
        bsz, heads, length, _ = q.shape
        dvd = v.shape[-1]
        nblk = -(-length // c)
        reach, mixed = far_deltas(window, c)
        fq, rq = fm.stabilized(q, params, is_query=False, inplace=True)
        # [B, H, L]: exp(r_j - top) <= 1, 0 for padding (r = -inf) and sinks.
        wk = torch.exp(rk - top.unsqueeze(-1))
        fqb, fkb = to_blocks(fq, nblk, c), to_blocks(fk, nblk, c)
        vwb = to_blocks(ones_col(v).mul_(wk.unsqueeze(-1)), nblk, c)
        state = far_sums(torch.matmul(fkb.transpose(-2, -1), vwb), reach)
        nd = torch.matmul(fqb, state)  # [B, H, nblk, C, dv+1]
        for dlt in mixed:
            span = _span(nblk, dlt)
            if span is None:
                continue
            ts, us = span
            far = (pair_offsets(c, dlt, q.device).abs() > window).to(q.dtype)
            p = torch.matmul(fqb[:, :, ts], fkb[:, :, us].transpose(-2, -1)).mul_(far)
            nd[:, :, ts] += torch.matmul(p, vwb[:, :, us])
        ctx.fm, ctx.params, ctx.conf = fm, params, (window, c, length)
        ctx.save_for_backward(q, k, v, weight, rk, top, state)
        nd = nd.reshape(bsz, heads, nblk * c, dvd + 1)[:, :, :length]
        return nd, rq

    @staticmethod
    @first_order_only("favor_attention with window=")
    def backward(ctx, grad_nd, grad_rq):
        q, k, v, weight, rk, top, state = ctx.saved_tensors
        fm, (window, c, length) = ctx.fm, ctx.conf
        want = ctx.needs_input_grad
        want_w = weight is not None and want[3]
        nblk = -(-length // c)
        reach, mixed = far_deltas(window, c)
        q_leaf = q.detach().requires_grad_(want[0])
        k_leaf = k.detach().requires_grad_(want[1])
        w_leaf = weight.detach().requires_grad_() if want_w else weight
        params = ctx.params.replace_weight(w_leaf)
        grad_feats = want[0] or want[1] or want_w
        if grad_feats:
            q_out, rq_out, fq, exp2 = _features(fm, params, q_leaf)
            k_out, rk_out, fk, _ = _features(fm, params, k_leaf)
        else:
            fq, _ = fm.stabilized(q, params, is_query=False, inplace=True)
            fk, _ = fm.stabilized(k, params, is_query=False, inplace=True)
            rq_out = rk_out = None
        wk = torch.exp(rk - top.unsqueeze(-1)).unsqueeze(-1)
        v1 = ones_col(v)
        fqb, fkb = to_blocks(fq, nblk, c), to_blocks(fk, nblk, c)
        v1b = to_blocks(v1, nblk, c)
        vwb = to_blocks(v1 * wk, nblk, c)
        gb = to_blocks(grad_nd.contiguous(), nblk, c)
        # Queries: nd = F_q state; the state: every far key block's sum, symmetric.
        dfq = torch.matmul(gb, state.transpose(-2, -1))  # [B, H, nblk, C, M]
        d_state = far_sums(torch.matmul(fqb.transpose(-2, -1), gb), reach)
        dfk = torch.matmul(vwb, d_state.transpose(-2, -1))
        dvw = torch.matmul(fkb, d_state)  # [B, H, nblk, C, dv+1]
        del d_state
        for dlt in mixed:
            span = _span(nblk, dlt)
            if span is None:
                continue
            ts, us = span
            far = (pair_offsets(c, dlt, q.device).abs() > window).to(q.dtype)
            g = gb[:, :, ts]
            p = torch.matmul(fqb[:, :, ts], fkb[:, :, us].transpose(-2, -1)).mul_(far)
            dvw[:, :, us] += torch.matmul(p.transpose(-2, -1), g)
            dp = torch.matmul(g, vwb[:, :, us].transpose(-2, -1)).mul_(far)
            dfq[:, :, ts] += torch.matmul(dp, fkb[:, :, us])
            dfk[:, :, us] += torch.matmul(dp.transpose(-2, -1), fqb[:, :, ts])
        m = fq.shape[-1]
        dfq = dfq.reshape(*q.shape[:2], nblk * c, m)[:, :, :length]
        dfk = dfk.reshape(*k.shape[:2], nblk * c, m)[:, :, :length]
        dvw = dvw.reshape(*v.shape[:2], nblk * c, v1.shape[-1])[:, :, :length]
        dv = dvw[..., :-1] * wk if want[2] else None
        dq = dk = dw = None
        if grad_feats:
            outs, grads = [], []
            if q_out.requires_grad:
                outs.append(q_out)
                grads.append(_grad_of(fq, dfq, exp2))
            if rq_out is not None and grad_rq is not None:
                outs.append(rq_out)
                grads.append(grad_rq)
            if k_out.requires_grad:
                outs.append(k_out)
                grads.append(_grad_of(fk, dfk, exp2))
            if rk_out is not None:
                # nd depends on r_j through w_j = exp(r_j - top).
                outs.append(rk_out)
                grads.append((dvw * v1).sum(-1) * wk.squeeze(-1))
            inputs = [t for t, on in ((q_leaf, want[0]), (k_leaf, want[1]), (w_leaf, want_w))
                      if on]
            res = list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))
            res = [torch.zeros_like(t) if r is None else r for t, r in zip(inputs, res)]
            dq = res.pop(0) if want[0] else None
            dk = res.pop(0) if want[1] else None
            dw = res.pop(0) if want_w else None
        return dq, dk, dv, dw, None, None, None, None, None, None, None


def far_blocks(
    q: Tensor, k: Tensor, v: Tensor, fm: FeatureMap, params: FeatureParams, fk: Tensor,
    rk: Tensor, top: Tensor, window: int, block: int,
) -> tuple[Tensor, Tensor]:
    """The bidirectional far part under one key stabilizer ``top``, by block pairs.

    Shapes: ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``; ``fk: (B, H, L, M)``, ``rk:
    (B, H, L)`` the keys' stabilized features and log-scales (no gradient; ``rk = -inf``
    on keys the part must not see: padding, sinks), ``top: (B, H)`` with ``rk - top``
    never far below ``-60`` (float32). ``window = -1``: every key is far. Returns
    ``nd: (B, H, L, dv + 1)`` and ``rq: (B, H, L)`` with
    ``sum_{|j - i| > w} F_qi.F_kj exp(rk_j - top) [v_j, 1] = nd_i`` (so the true far sum
    is ``exp(rq_i + top + 2 ln c) nd_i``); differentiable in ``q, k, v`` and the
    projection. Equivalent to the block form of ``favor_window_bidirectional`` with
    its single stabilizer.
    """
    c = max(1, min(block, q.shape[-2]))
    return _FarBlocks.apply(q, k, v, params.weight, fm, params, fk, rk, top, window, c)
