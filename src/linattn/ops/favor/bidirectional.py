"""Bidirectional FAVOR attention in O(L m d) time and O(block) extra memory.

Keys are consumed block by block into ``S = phi(K)^T [V, 1]`` (``(M, dv + 1)``, the
normalizer rides along as the last column of ``V``) with an online key stabilizer;
queries are then applied block by block. The backward pass recomputes each block's
features instead of storing the ``(L, M)`` feature matrices. Derivations:
``ops/favor/README.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...features import FeatureMap, FeatureParams
from .common import (
    builds_grad,
    first_order_only,
    graph_captured,
    ones_col,
    safe_denominator,
)

# Elements of one (B, H, block, M) feature block: about 8 MB in float32, which keeps the
# temporaries in cache-friendly sizes and the matmuls large enough to run at full rate.
_BLOCK_ELEMENTS = 1 << 21


def block_rows(leading: int, num_features: int, length: int, override: int | None = None) -> int:
    """Rows per block for ``leading`` (batch*heads) sequences of ``num_features``."""
    if override is not None:
        return max(1, min(override, length))
    rows = _BLOCK_ELEMENTS // max(1, leading * num_features)
    return max(64, min(length, rows))


def _mask_r(r: Tensor, keep: Tensor | None) -> Tensor:
    # Padding gets log-scale -inf: it takes no part in stabilizers and weighs exactly 0.
    return r if keep is None else r.masked_fill(keep == 0, float("-inf"))


def _key_weights(r: Tensor, stab: Tensor, keep: Tensor | None) -> Tensor:
    # [B, H, n]: exp(r - stab) per key, 0 for padding (masked before the exp, so a padded
    # key never makes inf * 0).
    return torch.exp(_mask_r(r, keep) - stab.unsqueeze(-1))


def _keep_block(keep: Tensor | None, s: int, e: int) -> Tensor | None:
    # key_padding_mask (B, L) -> keep factor (B, 1, n) broadcasting over heads.
    return None if keep is None else keep[:, None, s:e]


def key_state(
    k: Tensor, v: Tensor, fm: FeatureMap, params: FeatureParams, keep: Tensor | None, rows: int
) -> tuple[Tensor, Tensor]:
    """``S = sum_j w_j F_j^T [v_j, 1]`` and its stabilizer ``c`` (plain tensor code:
    differentiable by autograd, in place only while grad mode is off).

    Shapes: ``k: (B, H, Lk, d)``, ``v: (B, H, Lk, dv)``, ``keep: (B, Lk)`` float (1 =
    real key) or None. Returns ``S: (B, H, M, dv + 1)``, ``c: (B, H)`` with
    ``phi(k_j) = const * F_j * exp(r_j)`` and ``w_j = exp(r_j - c)``.
    """
    lk = k.shape[-2]
    inplace = not torch.is_grad_enabled()
    state = None
    stab = torch.full(k.shape[:-2], torch.finfo(k.dtype).min, dtype=k.dtype, device=k.device)
    for s in range(0, lk, rows):
        e = min(s + rows, lk)
        kb = _keep_block(keep, s, e)
        feats, r = fm.stabilized(k[..., s:e, :], params, is_query=False, inplace=inplace)
        new_stab = torch.maximum(stab, _mask_r(r, kb).amax(-1))
        vw = ones_col(v[..., s:e, :]) * _key_weights(r, new_stab, kb).unsqueeze(-1)
        contrib = feats.transpose(-2, -1) @ vw
        if state is None:
            state = contrib
        else:
            # Online stabilizer: rescale what was summed under the old constant.
            state = state * torch.exp(stab - new_stab)[..., None, None] + contrib
        stab = new_stab
    return state, stab


def query_apply(
    q: Tensor, state: Tensor, fm: FeatureMap, params: FeatureParams, rows: int
) -> tuple[Tensor, Tensor]:
    """``out = (F_q S)[:dv] / (F_q S)[dv]`` block by block (plain tensor code, as
    :func:`key_state`).

    Shapes: ``q: (B, H, Lq, d)``, ``state: (B, H, M, dv + 1)``. Returns
    ``out: (B, H, Lq, dv)`` and ``den: (B, H, Lq)`` (``inf`` where no key is visible, so
    that those rows are exactly 0).
    """
    lq, dv = q.shape[-2], state.shape[-1] - 1
    inplace = not torch.is_grad_enabled()
    # Blocks gathered and joined (no out= writes: torch.func.vmap has no rule for them).
    outs, dens = [], []
    for s in range(0, lq, rows):
        e = min(s + rows, lq)
        feats, _ = fm.stabilized(q[..., s:e, :], params, is_query=True, inplace=inplace)
        o = feats @ state
        d = safe_denominator(o[..., dv], fm.positive_features)
        dens.append(d)
        num = o[..., :dv]
        outs.append(num.div_(d.unsqueeze(-1)) if inplace else num / d.unsqueeze(-1))
    if len(outs) == 1:
        return outs[0], dens[0]
    return torch.cat(outs, dim=-2), torch.cat(dens, dim=-1)


class _FavorBidirectional(torch.autograd.Function):
    # setup_context style (torch.func.grad works); the state, stabilizer and denominators
    # are extra outputs so that setup_context can save them.
    @staticmethod
    def forward(q, k, v, weight, fm, params, keep, rows_q, rows_k):
        state, stab = key_state(k, v, fm, params, keep, rows_k)
        out, den = query_apply(q, state, fm, params, rows_q)
        return out, state, stab, den

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, weight, fm, params, keep, rows_q, rows_k = inputs
        out, state, stab, den = output
        ctx.fm, ctx.params, ctx.rows = fm, params, (rows_q, rows_k)
        ctx.save_for_backward(q, k, v, weight, keep, state, stab, out, den)
        ctx.mark_non_differentiable(state, stab, den)

    @staticmethod
    @first_order_only("favor_attention")
    def backward(ctx, grad_out, _grad_state, _grad_stab, _grad_den):
        q, k, v, weight, keep, state, stab, out, den = ctx.saved_tensors
        fm, rows_q, rows_k = ctx.fm, *ctx.rows
        params = ctx.params.replace_weight(weight)
        want_w = weight is not None and ctx.needs_input_grad[3]
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(weight) if want_w else None
        d_state = torch.zeros_like(state)
        # Queries: out_i = (F_i S)[:dv] / (F_i S)[dv]; g' = [g / den, -(g . out) / den].
        for s in range(0, q.shape[-2], rows_q):
            e = min(s + rows_q, q.shape[-2])
            g = grad_out[..., s:e, :] / den[..., s:e, None]
            g_den = -(g * out[..., s:e, :]).sum(-1, keepdim=True)
            g1 = torch.cat([g, g_den], dim=-1)
            with torch.enable_grad():
                qb = q[..., s:e, :].detach().requires_grad_(dq is not None)
                w_leaf = weight.detach().requires_grad_() if want_w else None
                feats, _ = fm.stabilized(
                    qb, params.replace_weight(w_leaf if want_w else weight), is_query=True
                )
                d_state += feats.detach().transpose(-2, -1) @ g1
                inputs = [t for t in (qb if dq is not None else None, w_leaf) if t is not None]
                if inputs:
                    grads = torch.autograd.grad(feats, inputs, g1 @ state.transpose(-2, -1))
                    if dq is not None:
                        dq[..., s:e, :] = grads[0]
                    if want_w:
                        dw += grads[-1]
        dk = torch.empty_like(k) if ctx.needs_input_grad[1] else None
        dv_ = torch.empty_like(v) if ctx.needs_input_grad[2] else None
        dvdim = v.shape[-1]
        # Keys: S = sum_j F_j^T (w_j [v_j, 1]).
        for s in range(0, k.shape[-2], rows_k):
            e = min(s + rows_k, k.shape[-2])
            kb_keep = _keep_block(keep, s, e)
            with torch.enable_grad():
                kb = k[..., s:e, :].detach().requires_grad_(dk is not None)
                w_leaf = weight.detach().requires_grad_() if want_w else None
                feats, r = fm.stabilized(
                    kb, params.replace_weight(w_leaf if want_w else weight), is_query=False
                )
                wts = _key_weights(r.detach(), stab, kb_keep)
                v1 = ones_col(v[..., s:e, :])
                d_vw = feats.detach() @ d_state
                if dv_ is not None:
                    dv_[..., s:e, :] = d_vw[..., :dvdim] * wts.unsqueeze(-1)
                outs, grads_in = [feats], [(v1 * wts.unsqueeze(-1)) @ d_state.transpose(-2, -1)]
                if r.requires_grad:
                    outs.append(r)
                    grads_in.append((d_vw * v1).sum(-1) * wts)
                inputs = [t for t in (kb if dk is not None else None, w_leaf) if t is not None]
                if inputs:
                    grads = torch.autograd.grad(outs, inputs, grads_in, allow_unused=True)
                    if dk is not None:
                        dk[..., s:e, :] = grads[0]
                    if want_w and grads[-1] is not None:
                        dw += grads[-1]
        return dq, dk, dv_, dw, None, None, None, None, None


def favor_bidirectional(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    key_padding_mask: Tensor | None = None,
    block_size: int | None = None,
) -> Tensor:
    """Bidirectional FAVOR attention, linear in length.

    Shapes: ``q: (B, H, Lq, d)``, ``k: (B, H, Lk, d)`` (unscaled; ``params.scale`` applies),
    ``v: (B, H, Lk, dv)``, ``key_padding_mask: (B, Lk)`` bool. Returns ``(B, H, Lq, dv)``.
    Computes in the inputs' dtype (callers upcast half precision).

    Equivalent to :func:`favor_naive` with ``causal=False``.
    """
    keep = None if key_padding_mask is None else (~key_padding_mask).to(k.dtype)
    m = fm.feature_dim(params.weight, q.shape[-1])
    lead = q.shape[0] * q.shape[1]
    rows_q = block_rows(lead, m, q.shape[-2], block_size)
    rows_k = block_rows(lead, m, k.shape[-2], block_size)
    weight = params.weight
    needs_grad = builds_grad(q, k, v, weight)
    # Under torch.func (whose grad cannot run the hand-written backward: it re-enters
    # autograd) and torch.compile, the plain form; its gradient is autograd's.
    if not needs_grad or graph_captured():
        state, _ = key_state(k, v, fm, params, keep, rows_k)
        return query_apply(q, state, fm, params, rows_q)[0]
    return _FavorBidirectional.apply(q, k, v, weight, fm, params, keep, rows_q, rows_k)[0]
