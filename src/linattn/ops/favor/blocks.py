"""Block-pair fast paths of the window hybrid, with hand-written backwards.

The sequence is cut into aligned blocks of ``C`` tokens, stored block-major
(``(nblk, B, H, C, e)``, :func:`block_major`: one copy of each ``(B, H, L, e)`` input,
and the features are computed in that layout). Query block ``t`` meets key block
``t + delta`` through a fixed ``(C, C)`` mask of the pairs that part counts; a range of
blocks is then a contiguous slice, so every product is one batched matmul of slices (no
padded copies, no ``unfold``, no copies for ``bmm``) and every sum and gradient is
accumulated in place (``baddbmm_``) into preallocated block tensors:

* :func:`band_blocks`: the exact scores inside the window (what
  :func:`~linattn.ops.favor.window.band_attention` computes, its plain reference);
* :func:`far_blocks`: the far part (bidirectional, or causal) under one sequence-wide
  key stabilizer: the far state of each query block (:func:`far_sums`, the key blocks
  more than ``D`` blocks away, or only the earlier ones) plus the far pairs of the mixed
  blocks. The forward keeps the features and the small graphs from the inputs to them,
  so the backward recomputes neither. References:
  :func:`~linattn.ops.favor.window.far_running_max` (bidirectional) and
  :func:`~linattn.ops.favor.window.far_left` (causal), which the hybrid also falls back
  to when the keys' log-scales spread too far for one stabilizer.

Derivations: ``ops/favor/README.md`` (sliding-window hybrid).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from ...features import FeatureMap, FeatureParams, _PositiveSoftmax
from .common import first_order_only, graph_captured

_LN2 = math.log(2.0)


def block_major(x: Tensor, nblk: int, c: int) -> Tensor:
    """``(B, H, L, e) -> (nblk, B, H, C, e)``: a contiguous copy, zero-padded at the end."""
    bsz, heads, length, e = x.shape
    if nblk * c > length:
        x = F.pad(x, (0, 0, 0, nblk * c - length))
    # Always a new tensor (never a view of x: callers write into it).
    return (
        x.reshape(bsz, heads, nblk, c, e)
        .permute(2, 0, 1, 3, 4)
        .clone(memory_format=torch.contiguous_format)
    )


def block_major_ones(v: Tensor, nblk: int, c: int) -> Tensor:
    """``[v, 1]`` block-major (:func:`block_major` of ``ones_col(v)``) in one copy; the
    padded tail is 0 in every column."""
    bsz, heads, length, dv = v.shape
    out = v.new_empty(nblk, bsz, heads, c, dv + 1)
    flat = out.view(nblk, bsz, heads, c * (dv + 1))
    full = length // c
    out[:full, ..., :dv] = (
        v[:, :, : full * c].reshape(bsz, heads, full, c, dv).permute(2, 0, 1, 3, 4)
    )
    out[:full, ..., dv] = 1.0
    if full < nblk:
        flat[full:].zero_()
        out[full, :, :, : length - full * c, :dv] = v[:, :, full * c :]
        out[full, :, :, : length - full * c, dv] = 1.0
    return out


def from_block_major(y: Tensor, length: int) -> Tensor:
    """The inverse of :func:`block_major`: ``(nblk, B, H, C, e) -> (B, H, L, e)``."""
    nblk, bsz, heads, c, e = y.shape
    return y.permute(1, 2, 0, 3, 4).reshape(bsz, heads, nblk * c, e)[:, :, :length]


def block_flags(keep: Tensor | None, bsz: int, length: int, nblk: int, c: int, device) -> Tensor:
    """``keep: (B, L)`` bool (None = all True) as ``(nblk, B, 1, C)``, False on the
    padded tail of the last block."""
    if keep is None:
        keep = torch.ones(bsz, length, dtype=torch.bool, device=device)
    # Padded, not written into a fresh tensor: under torch.func.vmap keep is batched.
    flags = F.pad(keep, (0, nblk * c - length), value=False)
    return flags.reshape(bsz, nblk, c).transpose(0, 1).unsqueeze(2)


def _span(nblk: int, dlt: int) -> tuple[slice, slice] | None:
    # Query blocks t with a key block t + dlt inside the sequence, and those key blocks.
    t0, t1 = max(0, -dlt), min(nblk, nblk - dlt)
    if t1 <= t0:
        return None
    return slice(t0, t1), slice(t0 + dlt, t1 + dlt)


def _bmm_add(acc: Tensor, x: Tensor, y: Tensor) -> None:
    # acc += x @ y in place; all three block-major slices (leading dims merge as views).
    if graph_captured():
        # torch.func.vmap has no batching rule for baddbmm_ (a slow per-sample loop).
        acc.add_(torch.matmul(x, y))
        return
    acc.view(-1, *acc.shape[-2:]).baddbmm_(
        x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:])
    )


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


def band_spans(
    nblk: int, window: int, c: int, causal: bool
) -> list[tuple[int, tuple[slice, slice]]]:
    """``(offset, (query blocks, key blocks))`` for every block offset holding a near
    pair (:func:`band_deltas`) whose blocks lie inside the sequence."""
    spans = ((dlt, _span(nblk, dlt)) for dlt in band_deltas(window, c, causal))
    return [(dlt, sp) for dlt, sp in spans if sp is not None]


class _BandBlocks(torch.autograd.Function):
    # setup_context style with a generated vmap rule (torch.func.vmap / grad): the forward
    # is plain tensor code without data-dependent branches, its buffers are made *_like
    # the (batched) inputs, and what the backward needs (the block-major inputs and the
    # exp-scores, O(L (w + C)): recomputing them costs a matmul and an exp per block
    # pair) is returned as extra outputs for setup_context to save.
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, keep, window, causal, scale, c):
        bsz, _, length, _ = q.shape
        nblk = -(-length // c)
        # The scale folded into the queries (an (L, d) pass instead of one per score).
        qb, kb = block_major(q, nblk, c).mul_(scale), block_major(k, nblk, c)
        v1b = block_major_ones(v, nblk, c)
        validb = block_flags(keep, bsz, length, nblk, c, q.device).unsqueeze(-2)
        mx = torch.full_like(qb[..., 0], -math.inf)  # [nblk, B, H, C]
        es = []
        spans = band_spans(nblk, window, c, causal)
        for dlt, (ts, us) in spans:
            s = torch.matmul(qb[ts], kb[us].transpose(-2, -1))
            allowed = near_mask(c, dlt, window, causal, q.device) & validb[us]
            s.masked_fill_(~allowed, -math.inf)
            mx[ts] = torch.maximum(mx[ts], s.amax(-1))
            es.append(s)
        mx_safe = torch.where(torch.isfinite(mx), mx, 0.0).unsqueeze(-1)
        nd = torch.zeros_like(v1b)
        for (_, (ts, us)), e in zip(spans, es):
            e.sub_(mx_safe[ts]).exp_()
            _bmm_add(nd[ts], e, v1b[us])
        mx = from_block_major(mx.unsqueeze(-1), length).squeeze(-1)
        return from_block_major(nd, length), mx, qb, kb, v1b, *es

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, _, _, _, window, causal, scale, c = inputs
        _, mx, qb, kb, v1b, *es = output
        ctx.spans = [sp for _, sp in band_spans(qb.shape[0], window, c, causal)]
        ctx.scale, ctx.length = scale, q.shape[-2]
        ctx.save_for_backward(qb, kb, v1b, *es)
        ctx.mark_non_differentiable(mx, qb, kb, v1b, *es)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(
            "favor_attention with window= has no forward-mode derivative (torch.func.jvp, "
            "jacfwd, torch.autograd.forward_ad): the exact band's backward is hand-written. "
            "Use reverse mode (backward(), torch.func.grad, vjp, jacrev)."
        )

    @staticmethod
    @first_order_only("favor_attention with window=")
    def backward(ctx, grad_nd, _grad_mx, *_grad_saved):
        qb, kb, v1b, *es = ctx.saved_tensors
        length, nblk, c = ctx.length, qb.shape[0], qb.shape[3]
        gb = block_major(grad_nd, nblk, c)
        want = ctx.needs_input_grad
        dq = torch.zeros_like(qb) if want[0] else None
        dk = torch.zeros_like(kb) if want[1] else None
        dv1 = torch.zeros_like(v1b) if want[2] else None
        for (ts, us), e in zip(ctx.spans, es):
            g = gb[ts]
            if dv1 is not None:
                _bmm_add(dv1[us], e.transpose(-2, -1), g)
            ds = torch.matmul(g, v1b[us].transpose(-2, -1)).mul_(e)
            if dq is not None:
                _bmm_add(dq[ts], ds, kb[us])
            if dk is not None:
                _bmm_add(dk[us], ds.transpose(-2, -1), qb[ts])
        dq = None if dq is None else from_block_major(dq.mul_(ctx.scale), length)
        dk = None if dk is None else from_block_major(dk, length)
        dv1 = None if dv1 is None else from_block_major(dv1[..., :-1], length)
        return dq, dk, dv1, None, None, None, None, None


def band_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    window: int,
    causal: bool,
    scale: float,
    block: int,
) -> tuple[Tensor, Tensor]:
    """Exact scores inside the window by aligned block pairs, hand-written backward.

    Shapes: ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``, ``keep: (B, L)`` bool (True =
    real key) or None. Returns ``nd: (B, H, L, dv + 1)`` and ``mx: (B, H, L)`` (no
    gradient) with ``sum_{j near i, kept} exp(scale q_i.k_j) [v_j, 1] = exp(mx_i) nd_i``;
    ``mx = -inf`` and ``nd = 0`` where no key is near. Memory O(L (w + C)): the
    exp-scores of the block pairs are kept for the backward. Equivalent to
    :func:`~linattn.ops.favor.window.band_attention` (same ``window``, ``causal``).
    """
    bsz, heads, length, _ = q.shape
    if not band_deltas(window, 1, causal):
        return (
            q.new_zeros(bsz, heads, length, v.shape[-1] + 1),
            q.new_full((bsz, heads, length), -math.inf),
        )
    c = max(1, min(block, length))
    return _BandBlocks.apply(q, k, v, keep, window, causal, scale, c)[:2]


def far_sums(u: Tensor, reach: int, side: str = "both") -> Tensor:
    """``F_t = sum_{|s - t| > reach} u_s`` along dim 0 (no autograd); ``side="left"``:
    only ``s < t - reach``, ``"right"``: only ``s > t + reach`` (the adjoint of
    ``"left"``; ``"both"`` is symmetric, its own adjoint). Running sums from the left
    (copied into ``F``) and from the right (added, or copied where nothing came from the
    left), in place on contiguous slices; no pass zeroes all of ``F``."""
    n = u.shape[0]
    out = torch.empty_like(u)
    left, right = side in ("both", "left"), side in ("both", "right")
    # Blocks that no pass writes.
    lo = reach + 1 if left else 0
    hi = n - reach - 1 if right else n
    if not right:
        out[: min(n, lo)].zero_()
    elif not left:
        out[max(0, hi) :].zero_()
    else:
        out[max(0, hi) : lo].zero_()
    if n <= reach + 1:
        return out
    acc = u[0].clone() if left else u[n - 1].clone()
    if left:
        out[reach + 1].copy_(acc)
        for t in range(reach + 2, n):
            acc.add_(u[t - reach - 1])
            out[t].copy_(acc)
        if right:
            acc.copy_(u[n - 1])
    if right:
        for t in range(n - reach - 2, -1, -1):
            if t < n - reach - 2:
                acc.add_(u[t + reach + 1])
            if left and t > reach:
                out[t].add_(acc)
            else:
                out[t].copy_(acc)
    return out


def far_deltas(window: int, c: int, causal: bool = False) -> tuple[int, list[int]]:
    """``D`` (key blocks more than ``D`` blocks away, before the query's block when
    causal, are wholly far) and the offsets of the mixed blocks (some far pair, and some
    near or future one). Far: ``|j - i| > w``; causal ``j - i <= -w``."""
    if causal:
        reach = -(-(window - 1) // c) if window > 1 else 0
        return reach, list(range(-reach, min(0, (c - 1 - window) // c) + 1))
    reach = -(-window // c) if window >= 0 else 0
    lo = (window + 1) // c
    return reach, [dlt for dlt in range(-reach, reach + 1) if abs(dlt) >= lo]


def far_mask(c: int, dlt: int, window: int, dtype, device, causal: bool = False) -> Tensor:
    """``(C, C)`` 0/1 of ``dtype``: the far pairs of block offset ``dlt``."""
    rel = pair_offsets(c, dlt, device)
    return (rel <= -window if causal else rel.abs() > window).to(dtype)


def _features(fm: FeatureMap, params: FeatureParams, x: Tensor, graph: bool, query: bool = False):
    """Features ``F, r`` of ``x`` with their true scale (keys: ``is_query=False``; queries:
    :meth:`~linattn.features.FeatureMap.stabilized_query`), detached, and (with ``graph``)
    the autograd graph that maps their gradient back: ``(F, r, out, r_out, exp2)``; send
    ``dF`` into ``out`` as :func:`_grad_of` says and ``dr`` into ``r_out`` (None when ``r``
    carries no gradient)."""
    if not graph:
        if query:
            feats, r = fm.stabilized_query(x, params)
        else:
            feats, r = fm.stabilized(x, params, is_query=False, inplace=True)
        return feats, r, None, None, False
    with torch.enable_grad():
        if isinstance(fm, _PositiveSoftmax):
            # F = exp2(logits - max): dlogits = ln2 F dF; only the logits' matmul is
            # differentiated by autograd (max, the stabilizer, is a constant). F takes
            # the logits' memory: the matmul's backward does not need its output.
            logits = fm._logits2(x, params, with_norm=True, query=query)
            r2 = logits.detach().amax(dim=-1, keepdim=True)
            feats = logits.detach().sub_(r2).exp2_()
            return feats, r2.squeeze(-1).mul_(_LN2), logits, None, True
        if query:
            feats, r = fm.stabilized_query(x, params)
        else:
            feats, r = fm.stabilized(x, params, is_query=False)
        return (feats.detach(), r.detach(), feats, r if r.requires_grad else None, False)


def _grad_of(feats: Tensor, dfeats: Tensor, exp2: bool) -> Tensor:
    # The gradient of _features' ``out`` (the exp2 maps' logits, or F itself).
    return dfeats.mul_(feats).mul_(_LN2) if exp2 else dfeats


class _FarBlocks(torch.autograd.Function):
    # The forward keeps the features F (O(L M)) and the small autograd graphs from the
    # inputs to them (the logits' matmul), so the backward recomputes neither.
    # setup_context style: the tensors the backward needs are extra outputs; the graphs
    # (which must keep their history) and the configuration travel in ``box``, an
    # input. No vmap rule: the forward decides its path from the data (the spread test),
    # so far_blocks is not called while a graph is captured (torch.func, compile).
    @staticmethod
    def forward(q, k, v, weight, fm, params, window, c, spread, keep, causal, want, box):
        bsz, length = q.shape[0], q.shape[-2]
        nblk = -(-length // c)
        want_w = weight is not None and want[3]
        graph = want[0] or want[1] or want_w
        q_leaf = block_major(q, nblk, c).requires_grad_(want[0])
        k_leaf = block_major(k, nblk, c).requires_grad_(want[1])
        w_leaf = weight.detach().requires_grad_() if want_w else weight
        fparams = params.replace_weight(w_leaf)
        fkb, rkb, k_out, rk_out, exp2 = _features(fm, fparams, k_leaf, graph)
        real = block_flags(keep, bsz, length, nblk, c, q.device)  # [nblk, B, 1, C]
        rkb = rkb.masked_fill(~real, -math.inf)
        top = rkb.amax(-1).amax(0)  # [B, H]
        low = rkb.masked_fill(~real, math.inf).amin(-1).amin(0)
        top = torch.where(torch.isfinite(top), top, 0.0)
        if not bool(((top - low) < spread).all()):
            # Too wide a spread for one stabilizer: the caller takes the running maxima.
            return q.new_zeros(()), q.new_zeros(()), top
        reach, mixed = far_deltas(window, c, causal)
        fq, rq, q_out, rq_out, _ = _features(fm, fparams, q_leaf, graph, query=True)
        # [nblk, B, H, C, 1]: exp(r_j - top) <= 1, 0 for padding (r = -inf) and sinks.
        wk = torch.exp(rkb - top.unsqueeze(-1)).unsqueeze(-1)
        v1b = block_major_ones(v, nblk, c)
        vwb = v1b * wk
        # The block states transposed, [nblk, B, H, dv+1, M] ([v, 1]^T F: the faster
        # layout for these short-contraction batched matmuls).
        state = far_sums(
            torch.matmul(vwb.transpose(-2, -1), fkb), reach, "left" if causal else "both"
        )
        nd = torch.matmul(fq, state.transpose(-2, -1))  # [nblk, B, H, C, dv+1]
        pairs = []
        for dlt in mixed:
            span = _span(nblk, dlt)
            if span is not None:
                ts, us = span
                p = torch.matmul(fq[ts], fkb[us].transpose(-2, -1))
                p.mul_(far_mask(c, dlt, window, q.dtype, q.device, causal))
                _bmm_add(nd[ts], p, vwb[us])
                pairs.append(p)
        box.conf = (window, c, length, exp2, want_w, causal)
        box.graph = (q_leaf, k_leaf, w_leaf, q_out, rq_out, k_out, rk_out) if graph else None
        rq = from_block_major(rq.unsqueeze(-1), length).squeeze(-1)
        return from_block_major(nd, length), rq, top, fq, fkb, v1b, wk, state, *pairs

    @staticmethod
    def setup_context(ctx, inputs, output):
        box = inputs[-1]
        _, _, top, *saved = output
        ctx.mark_non_differentiable(top, *saved)
        if saved:
            ctx.conf, ctx.graph = box.conf, box.graph
            ctx.save_for_backward(*saved)

    @staticmethod
    @first_order_only("favor_attention with window=")
    def backward(ctx, grad_nd, grad_rq, _grad_top, *_grad_saved):
        fq, fk, v1b, wk, state, *pairs = ctx.saved_tensors
        window, c, length, exp2, want_w, causal = ctx.conf
        want = ctx.needs_input_grad
        nblk = fq.shape[0]
        reach, mixed = far_deltas(window, c, causal)
        vwb = v1b * wk
        gb = block_major(grad_nd, nblk, c)
        # Queries: nd = F_q state; the state sums the far key blocks (a symmetric map).
        dfq = torch.matmul(gb, state)  # [nblk, B, H, C, M]
        d_state = far_sums(
            torch.matmul(gb.transpose(-2, -1), fq), reach, "right" if causal else "both"
        )  # [nblk, B, H, dv+1, M]
        dfk = torch.matmul(vwb, d_state)
        dvw = torch.matmul(fk, d_state.transpose(-2, -1))  # [nblk, B, H, C, dv+1]
        del d_state
        spans = [sp for sp in (_span(nblk, dlt) for dlt in mixed) if sp is not None]
        for dlt, (ts, us), p in zip([d for d in mixed if _span(nblk, d)], spans, pairs):
            g = gb[ts]
            _bmm_add(dvw[us], p.transpose(-2, -1), g)
            dp = torch.matmul(g, vwb[us].transpose(-2, -1))
            dp.mul_(far_mask(c, dlt, window, fq.dtype, fq.device, causal))
            _bmm_add(dfq[ts], dp, fk[us])
            _bmm_add(dfk[us], dp.transpose(-2, -1), fq[ts])
        dv = from_block_major(dvw[..., :-1] * wk, length) if want[2] else None
        dq = dk = dw = None
        if ctx.graph is not None:
            q_leaf, k_leaf, w_leaf, q_out, rq_out, k_out, rk_out = ctx.graph
            outs, grads = [], []
            if q_out.requires_grad:
                outs.append(q_out)
                grads.append(_grad_of(fq, dfq, exp2))
            if rq_out is not None and grad_rq is not None:
                outs.append(rq_out)
                grads.append(block_major(grad_rq.unsqueeze(-1), nblk, c).squeeze(-1))
            if k_out.requires_grad:
                outs.append(k_out)
                grads.append(_grad_of(fk, dfk, exp2))
            if rk_out is not None:
                # nd depends on r_j through w_j = exp(r_j - top).
                outs.append(rk_out)
                grads.append((dvw * v1b).sum(-1) * wk.squeeze(-1))
            inputs = [t for t, on in ((q_leaf, want[0]), (k_leaf, want[1]), (w_leaf, want_w)) if on]
            res = list(
                torch.autograd.grad(outs, inputs, grads, allow_unused=True, retain_graph=True)
            )
            res = [torch.zeros_like(t) if r is None else r for t, r in zip(inputs, res)]
            dq = from_block_major(res.pop(0), length) if want[0] else None
            dk = from_block_major(res.pop(0), length) if want[1] else None
            dw = res.pop(0) if want_w else None
        return dq, dk, dv, dw, None, None, None, None, None, None, None, None, None


def far_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    keep: Tensor | None,
    fm: FeatureMap,
    params: FeatureParams,
    window: int,
    block: int,
    spread: float,
    causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The far part under one key stabilizer, by block pairs.

    Shapes: ``q, k: (B, H, L, d)``, ``v: (B, H, L, dv)``, ``keep: (B, L)`` bool (True =
    a key this part sees: not padding, not a sink) or None. ``window = -1``: every key
    is far. Returns None when the keys' log-scales ``r`` spread by ``spread`` or more
    (one stabilizer could underflow some weight ``exp(r_j - max r)``; the caller then
    uses the running-maximum form; also None, without looking, while a graph is captured:
    :func:`~linattn.ops.favor.common.graph_captured`), else ``nd: (B, H, L, dv + 1)``,
    ``rq: (B, H, L)``
    and ``top: (B, H)`` with
    ``sum_{|j - i| > w, kept} phi(q_i).phi(k_j) [v_j, 1] = c^2 exp(rq_i + top) nd_i``
    (causal: the keys ``j <= i - w``)
    (``c`` the map's :meth:`~linattn.features.FeatureMap.log_const`); differentiable in
    ``q, k, v`` and the projection. Memory O(L (M + C) + (L / C) M dv). Equivalent to
    :func:`~linattn.ops.favor.window.far_running_max`.
    """
    if graph_captured():
        # The spread test needs the data (a host sync): under torch.compile or a
        # torch.func transform the caller takes its always-valid form instead.
        return None
    c = max(1, min(block, q.shape[-2]))
    grad = torch.is_grad_enabled()
    want = tuple(grad and t is not None and t.requires_grad for t in (q, k, v, params.weight))
    nd, rq, top, *_ = _FarBlocks.apply(
        q, k, v, params.weight, fm, params, window, c, spread, keep, causal, want, SimpleNamespace()
    )
    if nd.dim() == 0:
        return None
    return nd, rq, top
