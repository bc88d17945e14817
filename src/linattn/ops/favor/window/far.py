"""The far part of the window hybrid (every key outside the query's window, scored with
``phi(q_i).phi(k_j)``) under one sequence-wide key stabilizer, by block pairs with a
hand-written backward (:func:`far_blocks`, bidirectional or causal): the far state of
each query block (:func:`far_sums`: the key blocks more than ``D`` blocks away, or only
the earlier ones) plus the far pairs of the mixed blocks. The forward keeps the features
and the small graphs from the inputs to them, so the backward recomputes neither.

When the keys' log-scales spread too far for one stabilizer (:func:`spread_limit`), and
while a graph is captured, the hybrid takes the plain forms of
:mod:`~linattn.ops.favor.window.naive` instead (``far_running_max``, ``far_left``).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor

from ....features import FeatureMap, FeatureParams
from ..common import first_order_only, graph_captured, no_forward_mode
from .layout import (
    block_flags,
    block_major,
    block_major_ones,
    block_span,
    bmm_add,
    from_block_major,
    pair_offsets,
)

_LN2 = math.log(2.0)

# Largest spread of key log-scales for which one sequence-wide stabilizer is kept (exp of
# -60 / -600 stays far above the float32 / float64 underflow); beyond, the recurrence.
SPREAD_FLOAT32 = 60.0
SPREAD_FLOAT64 = 600.0


def spread_limit(dtype: torch.dtype) -> float:
    """The largest spread of key log-scales kept under one stabilizer in ``dtype``
    (:data:`SPREAD_FLOAT64` for float64, else :data:`SPREAD_FLOAT32`)."""
    return SPREAD_FLOAT64 if dtype == torch.float64 else SPREAD_FLOAT32


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
    like ``u``. Equivalent to :func:`~.naive.far_block_sums_reference`. The autograd form
    of :func:`far_sums` (:func:`far_blocks` applies the same sums in its own backward);
    the tests check the sums and their adjoint through it."""
    return _FarBlockSums.apply(u.contiguous(), reach)


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
        if fm.exp2_logits:
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
    def forward(q, k, v, weight, fm, params, window, c, spread, keep, causal, want, bias, box):
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
        if bias is not None:
            rkb = rkb + key_bias_blocks(bias, nblk, c)
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
        blocks = torch.matmul(vwb.transpose(-2, -1), fkb)
        if getattr(box, "final", None) is not None:
            box.final = final_sums(blocks, vwb, fkb, rkb, top, box.final)
        state = far_sums(blocks, reach, "left" if causal else "both")
        del blocks
        nd = torch.matmul(fq, state.transpose(-2, -1))  # [nblk, B, H, C, dv+1]
        pairs = []
        for dlt in mixed:
            span = block_span(nblk, dlt)
            if span is not None:
                ts, us = span
                p = torch.matmul(fq[ts], fkb[us].transpose(-2, -1))
                p.mul_(far_mask(c, dlt, window, q.dtype, q.device, causal))
                bmm_add(nd[ts], p, vwb[us])
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
    def jvp(ctx, *tangents):
        no_forward_mode("favor_attention with window= or sinks=")

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
        spans = [sp for sp in (block_span(nblk, dlt) for dlt in mixed) if sp is not None]
        for dlt, (ts, us), p in zip([d for d in mixed if block_span(nblk, d)], spans, pairs):
            g = gb[ts]
            bmm_add(dvw[us], p.transpose(-2, -1), g)
            dp = torch.matmul(g, vwb[us].transpose(-2, -1))
            dp.mul_(far_mask(c, dlt, window, fq.dtype, fq.device, causal))
            bmm_add(dfq[ts], dp, fk[us])
            bmm_add(dfk[us], dp.transpose(-2, -1), fq[ts])
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
        return dq, dk, dv, dw, None, None, None, None, None, None, None, None, None, None


def final_sums(
    blocks: Tensor, vwb: Tensor, fkb: Tensor, rkb: Tensor, top: Tensor, cut: int
) -> tuple[Tensor, Tensor]:
    """The far sums of the keys before ``cut`` (a decoding state's ``S``) under their own
    largest log-weight: ``(S: (B, H, M, dv + 1), m: (B, H))`` with ``S = sum_{j < cut}
    exp(r_j - m) F_j^T [v_j, 1]`` and ``m = max_{j < cut} r_j`` (``-inf``, ``S = 0``
    where no key before ``cut`` is kept), as :func:`~.step.window_final_state` keeps
    them. From the per-block sums ``blocks: (nblk, B, H, dv + 1, M)`` (under ``top: (B,
    H)``), the key log-weights ``rkb: (nblk, B, H, C)`` (``-inf`` for keys not kept)
    and, for a block that ``cut`` splits, its weighted values ``vwb: (nblk, B, H, C, dv
    + 1)`` and features ``fkb: (nblk, B, H, C, M)``."""
    c = fkb.shape[-2]
    full, rem = divmod(cut, c)
    total = blocks[:full].sum(0)
    if rem:
        total = total + vwb[full, ..., :rem, :].transpose(-2, -1) @ fkb[full, ..., :rem, :]
    nblk, bsz, heads = rkb.shape[:3]
    r = rkb.permute(1, 2, 0, 3).reshape(bsz, heads, nblk * c)[..., :cut]
    m = r.amax(-1) if cut else torch.full_like(top, -math.inf)
    shift = torch.where(torch.isfinite(m), top - m, 0.0)
    return total.transpose(-2, -1) * torch.exp(shift)[..., None, None], m


def key_bias_blocks(bias: Tensor, nblk: int, c: int) -> Tensor:
    """A per-key log-weight ``bias: (H, L)`` as ``(nblk, 1, H, C)`` (0 on the padded tail
    of the last block)."""
    heads, length = bias.shape
    b = torch.nn.functional.pad(bias, (0, nblk * c - length))
    return b.reshape(heads, nblk, c).transpose(0, 1).unsqueeze(1)


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
    key_bias: Tensor | None = None,
    final: int | None = None,
) -> tuple[Tensor, ...] | None:
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
    :func:`~linattn.ops.favor.window.naive.far_running_max`.

    ``final = cut`` (``0 <= cut <= L``): a fourth result, ``(S: (B, H, M, dv + 1), m:
    (B, H))``, the sums ``sum_{j < cut, kept} exp(r_j + bias_j - m) F_j^T [v_j, 1]``
    under their largest log-weight ``m`` (see :func:`final_sums`): a prefill's decoding
    state from the features this call computed anyway. Not differentiable (callers ask
    for it only without a gradient to build).
    """
    if graph_captured():
        # The spread test needs the data (a host sync): under torch.compile or a
        # torch.func transform the caller takes its always-valid form instead.
        return None
    c = max(1, min(block, q.shape[-2]))
    grad = torch.is_grad_enabled()
    want = tuple(grad and t is not None and t.requires_grad for t in (q, k, v, params.weight))
    if final is not None and not 0 <= final <= q.shape[-2]:
        raise ValueError(f"final must be in [0, {q.shape[-2]}], got {final}")
    box = SimpleNamespace(final=final)
    nd, rq, top, *_ = _FarBlocks.apply(
        q,
        k,
        v,
        params.weight,
        fm,
        params,
        window,
        c,
        spread,
        keep,
        causal,
        want,
        key_bias,
        box,
    )
    if nd.dim() == 0:
        return None
    if final is not None:
        return nd, rq, top, box.final
    return nd, rq, top
