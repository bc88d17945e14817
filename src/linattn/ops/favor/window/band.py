"""The exact band of the window hybrid: scores ``exp(scale q_i.k_j)`` of the keys inside
each query's window (``|i - j| <= w``; causal ``i - w < j <= i``), by aligned block pairs
with a hand-written backward (:func:`band_blocks`). Its plain reference, also the
decoding step's band, is :func:`~linattn.ops.favor.window.naive.band_attention`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..common import first_order_only, no_forward_mode
from .layout import (
    block_flags,
    block_major,
    block_major_ones,
    block_span,
    bmm_add,
    from_block_major,
    pair_offsets,
)


def band_block(window: int, length: int, causal: bool = False) -> int:
    """Query rows per block of the exact band: about ``w`` (``w / 2`` causal, whose
    offsets ``-1`` and ``0`` are both triangles: smaller blocks waste less), clamped to
    ``[16, 128]`` (measured at ``w = 64``)."""
    rows = (window + 1) // 2 if causal else window
    return max(1, min(length, max(16, min(rows, 128))))


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
    spans = ((dlt, block_span(nblk, dlt)) for dlt in band_deltas(window, c, causal))
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
            bmm_add(nd[ts], e, v1b[us])
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
        no_forward_mode("favor_attention with window=")

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
                bmm_add(dv1[us], e.transpose(-2, -1), g)
            ds = torch.matmul(g, v1b[us].transpose(-2, -1)).mul_(e)
            if dq is not None:
                bmm_add(dq[ts], ds, kb[us])
            if dk is not None:
                bmm_add(dk[us], ds.transpose(-2, -1), qb[ts])
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
    :func:`~linattn.ops.favor.window.naive.band_attention` (same ``window``, ``causal``).
    """
    bsz, heads, length, _ = q.shape
    if not band_deltas(window, 1, causal):
        return (
            q.new_zeros(bsz, heads, length, v.shape[-1] + 1),
            q.new_full((bsz, heads, length), -math.inf),
        )
    c = max(1, min(block, length))
    return _BandBlocks.apply(q, k, v, keep, window, causal, scale, c)[:2]
