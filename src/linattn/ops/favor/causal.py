"""Causal FAVOR attention: chunked prefix sums with a causal-safe key stabilizer.

The sequence is cut into chunks of ``chunk`` tokens. Inside a chunk the masked
``(chunk, chunk)`` form is computed exactly; across chunks a state
``S = sum_j exp(r_j - c) F_j^T [v_j, 1]`` is carried. The stabilizer of query ``i`` is
``c_i = max_{j <= i} r_j``, a prefix maximum: nothing after position ``i`` enters its
output, however large later keys are (a sequence-wide maximum, as in the reference
implementations, lets a huge future key underflow every earlier term). Every factor
``exp(.)`` the algorithm forms has a non-positive exponent. Derivation:
``ops/favor/README.md``.

Chunks are processed a group at a time (a "segment" of up to ``_CHUNKS_PER_SEGMENT``
chunks, batched); only the state entering each segment is stored for the backward pass,
which recomputes the segment under autograd: memory is O(L d + (L / segment) m d).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ...features import FeatureMap, FeatureParams
from .common import (
    builds_grad,
    first_order_only,
    graph_captured,
    ones_col,
    safe_denominator,
)

_CHUNKS_PER_SEGMENT = 16
_LN2 = math.log(2.0)


def _neg_floor(dtype: torch.dtype) -> float:
    # A finite "minus infinity" for stabilizers: differences of two floors are 0, not NaN.
    return torch.finfo(dtype).min


def initial_state(
    leading: tuple[int, ...], num_features: int, dv: int, *, dtype, device
) -> tuple[Tensor, Tensor]:
    """Empty causal state: ``S: (*leading, M, dv + 1)`` zeros, ``c: (*leading,)`` floor."""
    s = torch.zeros(*leading, num_features, dv + 1, dtype=dtype, device=device)
    c = torch.full(leading, _neg_floor(dtype), dtype=dtype, device=device)
    return s, c


def causal_segment(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tensor,
    stab: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    keep: Tensor | None,
    chunk: int,
    raw: bool = False,
    key_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """One segment of the causal scan; differentiable (autograd recomputes through it).

    Shapes: ``q, k: (B, H, n, d)``, ``v: (B, H, n, dv)`` with ``n`` a multiple of
    ``chunk``; ``state: (B, H, M, dv + 1)`` and ``stab: (B, H)`` for the tokens before;
    ``keep: (B, n)`` (1 = real key, 0 = padding) or None; ``key_bias: (H, n)`` or None,
    log-weights added to the keys' log-scales.
    Returns ``out: (B, H, n, dv)``, the new state and its stabilizer. With ``raw``, ``out``
    is instead the unnormalized ``[num, den]: (B, H, n, dv + 1)`` and a fourth tensor
    ``g: (B, H, n)`` is returned: ``sum_j phi(q_i).phi(k_j) [v_j, 1] = c^2 exp(g_i) out_i``
    (``c`` the map's :meth:`~linattn.features.FeatureMap.log_const`, the query's own
    scale included), which the window hybrid needs.
    """
    bsz, heads, n, _ = q.shape
    dv = v.shape[-1]
    nc = n // chunk
    inplace = not torch.is_grad_enabled()
    if raw:
        # The window hybrid weighs these scores against exact ones: keep the queries' r.
        fq, rq = fm.stabilized_query(q, params, inplace=inplace)
    else:
        fq, rq = fm.stabilized(q, params, is_query=True, inplace=inplace)
    fk, r = fm.stabilized(k, params, is_query=False, inplace=inplace)
    m = fq.shape[-1]
    if key_bias is not None:
        # Per-key log-weights (the window hybrid's far decay): [H, n] on [B, H, n].
        r = r + key_bias
    if keep is not None:
        r = r.masked_fill(keep[:, None, :] == 0, float("-inf"))
    with torch.no_grad():
        # [B, H, n] prefix maxima, never below the incoming stabilizer.
        c = torch.maximum(torch.cummax(r.detach(), dim=-1).values, stab.unsqueeze(-1))
    v1 = ones_col(v)
    fq = fq.reshape(bsz, heads, nc, chunk, m)
    fk = fk.reshape(bsz, heads, nc, chunk, m)
    v1 = v1.reshape(bsz, heads, nc, chunk, dv + 1)
    r = r.reshape(bsz, heads, nc, chunk)
    c = c.reshape(bsz, heads, nc, chunk)
    # Chunk ends' and previous chunk ends' stabilizers [B, H, nc].
    ends = c[..., -1]
    prev = torch.cat([stab.unsqueeze(-1), ends[..., :-1]], dim=-1)
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # Intra-chunk: A_ij = F_i.F_j exp(r_j - c_i) for j <= i.  [B, H, nc, C, C]
    log_d = (r.unsqueeze(-2) - c.unsqueeze(-1)).masked_fill(~tril, float("-inf"))
    scores = (fq @ fk.transpose(-2, -1)) * torch.exp(log_d)
    out = scores @ v1
    # Keys weighted relative to their chunk's end: w_j = exp(r_j - e_t) <= 1.
    vw = v1 * torch.exp(r - ends.unsqueeze(-1)).unsqueeze(-1)
    # Inter-chunk: every chunk's key sum U_t in one batched matmul, then the cheap
    # elementwise recurrence S_t = exp(e_{t-1} - e_t) S_{t-1} + U_t, then every chunk's
    # queries against the state entering it in one batched matmul. [B, H, nc, M, dv+1]
    contrib = fk.transpose(-2, -1) @ vw
    decays = torch.exp(prev - ends)[..., None, None].unbind(2)
    entering = []
    # unbind, not indexing: one backward for all chunks instead of a zero-filled
    # full-size gradient per chunk.
    for u_t, decay in zip(contrib.unbind(2), decays):
        entering.append(state)
        state = torch.addcmul(u_t, state, decay)
    inter = fq @ torch.stack(entering, dim=2)
    inter = inter * torch.exp(prev.unsqueeze(-1) - c).unsqueeze(-1)
    out = (out + inter).reshape(bsz, heads, n, dv + 1)
    if raw:
        return out, state, ends[..., -1], c.reshape(bsz, heads, n) + rq
    num, den = out[..., :dv], out[..., dv:]
    out = num / safe_denominator(den, fm.positive_features)
    last = ends[..., -1]
    return out, state, last


def _pad_to(x: Tensor, length: int) -> Tensor:
    extra = length - x.shape[-2]
    return x if extra == 0 else F.pad(x, (0, 0, 0, extra))


def _segments(length: int, chunk: int) -> list[tuple[int, int]]:
    seg = chunk * _CHUNKS_PER_SEGMENT
    return [(s, min(s + seg, length)) for s in range(0, length, seg)]


def _segment_inputs(q, k, v, keep, s, e, chunk):
    # Slices of one segment, the last padded to a whole chunk (padding is masked out).
    n = e - s
    padded = -(-n // chunk) * chunk
    qs, ks, vs = (_pad_to(t[..., s:e, :], padded) for t in (q, k, v))
    ke = None
    if keep is not None or padded != n:
        base = keep[:, s:e] if keep is not None else k.new_ones(k.shape[0], n)
        ke = F.pad(base, (0, padded - n))
    return qs, ks, vs, ke


def causal_scan(q, k, v, state, stab, fm, params, keep, chunk, *, keep_states=False):
    """Run :func:`causal_segment` over the sequence; returns ``out``, the final state,
    its stabilizer and (if ``keep_states``) the states entering each segment.

    Without autograd the fused in-place forward (:func:`_segment_forward`) runs instead;
    both compute the same thing."""
    if not torch.is_grad_enabled():
        out, _, state, stab, entering = _scan_forward(
            q, k, v, state, stab, fm, params, keep, chunk, keep_states=keep_states
        )
        return out, state, stab, entering
    outs, entering = [], []
    for s, e in _segments(q.shape[-2], chunk):
        qs, ks, vs, ke = _segment_inputs(q, k, v, keep, s, e, chunk)
        if keep_states:
            entering.append((state, stab))
        out, state, stab = causal_segment(qs, ks, vs, state, stab, fm, params, ke, chunk)
        outs.append(out[..., : e - s, :])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out, state, stab, entering


def _chunked(x: Tensor, nc: int, chunk: int) -> Tensor:
    # (B, H, n, ...) -> (B, H, nc, chunk, ...)
    return x.reshape(*x.shape[:2], nc, chunk, *x.shape[3:])


def _stabilizers(r: Tensor, stab: Tensor, nc: int, chunk: int):
    """Prefix maxima ``c: (B, H, nc, C)``, chunk ends ``(B, H, nc)``, the previous chunk
    ends ``prev: (B, H, nc)`` (``stab`` before the first) and the state decays
    ``exp(prev - ends)``, for masked key log-scales ``r: (B, H, n)`` (no gradient)."""
    c = torch.maximum(torch.cummax(r, dim=-1).values, stab.unsqueeze(-1))
    c = _chunked(c, nc, chunk)
    ends = c[..., -1]
    prev = torch.cat([stab.unsqueeze(-1), ends[..., :-1]], dim=-1)
    return c, ends, prev, torch.exp(prev - ends)


def _chunk_operands(a: Tensor, b: Tensor, r: Tensor, v: Tensor, keep, stab: Tensor, chunk: int):
    """A segment's operands cut into chunks, for :func:`_segment_forward` and
    :func:`_segment_backward` alike: query and key features ``a5, b5: (B, H, nc, C, M)``,
    key log-scales ``r5: (B, H, nc, C)`` (``-inf`` where ``keep`` is 0),
    ``v1 = [v, 1]: (B, H, nc, C, dv + 1)`` and :func:`_stabilizers`' ``c5, ends, prev,
    decay`` of those log-scales, entering with ``stab``."""
    nc = r.shape[-1] // chunk
    if keep is not None:
        r = r.masked_fill(keep[:, None, :] == 0, float("-inf"))
    c5, ends, prev, decay = _stabilizers(r, stab, nc, chunk)
    return (
        _chunked(a, nc, chunk),
        _chunked(b, nc, chunk),
        _chunked(r, nc, chunk),
        _chunked(ones_col(v), nc, chunk),
        c5,
        ends,
        prev,
        decay,
    )


def _intra_weights(r5: Tensor, c5: Tensor, chunk: int) -> Tensor:
    """``P_ij = exp(r_j - c_i)`` for ``j <= i`` in a chunk, else 0: ``(B, H, nc, C, C)``."""
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=r5.device).tril()
    log_p = r5.unsqueeze(-2) - c5.unsqueeze(-1)
    return log_p.masked_fill_(~tril, float("-inf")).exp_()


def _bmm_add(acc: Tensor, x: Tensor, y: Tensor) -> None:
    """``acc += x @ y`` in place for ``(B, H, nc, i, j)`` batches (one ``baddbmm_``)."""
    acc.view(-1, *acc.shape[-2:]).baddbmm_(
        x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:])
    )


def _segment_forward(q, k, v, state, stab, fm, params, keep, chunk):
    """:func:`causal_segment` without autograd, in place where it can be.

    Shapes as :func:`causal_segment`. Returns ``out: (B, H, n, dv)``, the safe
    denominator ``den: (B, H, n)`` (``inf`` where no key is visible), the new state
    and its stabilizer.
    """
    bsz, heads, n, _ = q.shape
    dv = v.shape[-1]
    nc = n // chunk
    a, _ = fm.stabilized(q, params, is_query=True, inplace=True)
    b, r = fm.stabilized(k, params, is_query=False, inplace=True)
    a5, b5, r5, v1, c5, ends, prev, decay = _chunk_operands(a, b, r, v, keep, stab, chunk)
    # Intra-chunk: (F_i . F_j) exp(r_j - c_i) for j <= i.
    scores = torch.matmul(a5, b5.transpose(-2, -1)).mul_(_intra_weights(r5, c5, chunk))
    nd = torch.matmul(scores, v1)
    del scores
    # Chunk sums U_t, turned in place into the states after each chunk:
    # S_t = exp(e_{t-1} - e_t) S_{t-1} + U_t.
    vw = v1 * torch.exp(r5 - ends.unsqueeze(-1)).unsqueeze(-1)
    sums = torch.matmul(b5.transpose(-2, -1), vw)
    dec = decay[..., None, None]
    sums[:, :, 0].addcmul_(state, dec[:, :, 0])
    for t in range(1, nc):
        sums[:, :, t].addcmul_(sums[:, :, t - 1], dec[:, :, t])
    new_state = sums[:, :, -1].clone()
    # Inter-chunk: queries of chunk t against the state entering it, relative to e_{t-1}.
    inter = torch.empty_like(nd)
    torch.matmul(a5[:, :, :1], state.unsqueeze(2), out=inter[:, :, :1])
    if nc > 1:
        torch.matmul(a5[:, :, 1:], sums[:, :, :-1], out=inter[:, :, 1:])
    nd.addcmul_(inter, torch.exp(prev.unsqueeze(-1) - c5).unsqueeze(-1))
    nd = nd.reshape(bsz, heads, n, dv + 1)
    den = safe_denominator(nd[..., dv], fm.positive_features)
    out = nd[..., :dv].div_(den.unsqueeze(-1))
    return out, den, new_state, ends[..., -1]


def _scan_forward(q, k, v, state, stab, fm, params, keep, chunk, *, keep_states=False):
    """:func:`causal_scan` without autograd; also returns the denominators
    ``den: (B, H, L)``. Returns ``(out, den, S, c, entering)``."""
    outs, dens, entering = [], [], []
    for s, e in _segments(q.shape[-2], chunk):
        qs, ks, vs, ke = _segment_inputs(q, k, v, keep, s, e, chunk)
        if keep_states:
            entering.append((state, stab))
        out, den, state, stab = _segment_forward(qs, ks, vs, state, stab, fm, params, ke, chunk)
        outs.append(out[..., : e - s, :])
        dens.append(den[..., : e - s])
    if len(outs) == 1:
        return outs[0], dens[0], state, stab, entering
    return torch.cat(outs, dim=-2), torch.cat(dens, dim=-1), state, stab, entering


def _segment_backward(
    q, k, v, keep, state, stab, out, den, grad, d_state, fm, params, chunk, inputs
):
    """Hand-written backward of one segment of the causal scan.

    Shapes as :func:`_segment_forward`; ``out, grad: (B, H, n, dv)`` and ``den: (B, H, n)``
    the forward's outputs and denominators and the outputs' gradient (zero on padding),
    ``d_state``: gradient of the state leaving the segment (or None). The features are
    recomputed under autograd and ``dF`` (and ``dr`` when ``r`` carries a gradient) is
    pushed through the map to ``inputs`` (leaves among ``q, k`` and the weight).
    Returns ``(grads of inputs, dv: (B, H, n, dv), dS entering the segment)``.
    Derivation: ``ops/favor/README.md``.
    """
    bsz, heads, n, _ = q.shape
    dvd = v.shape[-1]
    nc = n // chunk
    # Positive softmax maps: F = exp2(logits - max), so dlogits = ln2 * F * dF; only the
    # logits' matmul goes through autograd (ln2 is applied to the gradients at the end).
    exp2_map = fm.exp2_logits
    with torch.enable_grad():
        if exp2_map:
            fq = fm._logits2(q, params, with_norm=False)
            fk = fm._logits2(k, params, with_norm=True)
            r_g = fk.detach().amax(dim=-1)
            a = fq.detach().sub(fq.detach().amax(dim=-1, keepdim=True)).exp2_()
            b = fk.detach().sub(r_g.unsqueeze(-1)).exp2_()
            r_g = r_g.mul_(_LN2)
        else:
            fq, _ = fm.stabilized(q, params, is_query=True)
            fk, r_g = fm.stabilized(k, params, is_query=False)
            a, b = fq.detach(), fk.detach()
    r = r_g.detach()
    want_r = r_g.requires_grad
    m = a.shape[-1]
    a5, b5, r5, v1, c5, ends, prev, decay = _chunk_operands(a, b, r, v, keep, stab, chunk)
    dec = decay[..., None, None]
    # Recompute the states entering each chunk: E_0 = S, E_{t+1} = decay_t E_t + U_t.
    kw = torch.exp(r5 - ends.unsqueeze(-1)).unsqueeze(-1)
    vw = v1 * kw
    ent = torch.matmul(b5.transpose(-2, -1), vw)
    carry = state
    for t in range(nc):
        u_t = ent[:, :, t].clone() if t < nc - 1 else None
        ent[:, :, t] = carry
        if u_t is not None:
            carry = torch.addcmul(u_t, carry, dec[:, :, t])
    # g' = [g / den, -(g . out) / den]: the gradient of the unnormalized [num, den].
    g = grad / den.unsqueeze(-1)
    gp = _chunked(torch.cat([g, -(g * out).sum(-1, keepdim=True)], dim=-1), nc, chunk)
    del g
    p = _intra_weights(r5, c5, chunk)
    d_scores = torch.matmul(gp, v1.transpose(-2, -1)).mul_(p)
    da = torch.matmul(d_scores, b5)
    db = torch.matmul(d_scores.transpose(-2, -1), a5)
    scores = torch.matmul(a5, b5.transpose(-2, -1))
    dr = (d_scores * scores).sum(-2) if want_r else None
    del d_scores
    dv1 = torch.matmul(scores.mul_(p).transpose(-2, -1), gp)
    del scores, p
    # Inter-chunk: num_i += exp(e_{t-1} - c_i) F_i E_t.
    gq = gp.mul_(torch.exp(prev.unsqueeze(-1) - c5).unsqueeze(-1))
    _bmm_add(da, gq, ent.transpose(-2, -1))
    d_ent = torch.matmul(a5.transpose(-2, -1), gq)
    del gq, ent
    # Reverse recurrence, in place: d_ent[t] becomes dU_t = dS_t (state after chunk t).
    carry = d_state if d_state is not None else torch.zeros_like(state)
    for t in range(nc - 1, -1, -1):
        prev_carry = torch.addcmul(d_ent[:, :, t], carry, dec[:, :, t])
        d_ent[:, :, t] = carry
        carry = prev_carry
    # U_t = F_t^T (w [v, 1]).
    _bmm_add(db, vw, d_ent.transpose(-2, -1))
    d_vw = torch.matmul(b5, d_ent)
    del d_ent
    dv1.addcmul_(d_vw, kw)
    if want_r:
        dr.add_((d_vw * v1).sum(-1) * kw.squeeze(-1))
    da, db = da.reshape(bsz, heads, n, m), db.reshape(bsz, heads, n, m)
    if exp2_map:
        da.mul_(a)
        db.mul_(b)
    outs, grads_in = [fq, fk], [da, db]
    if want_r:
        outs.append(r_g)
        grads_in.append(dr.reshape(bsz, heads, n))
    pairs = [(o, gi) for o, gi in zip(outs, grads_in) if o.requires_grad]
    grads = ()
    if inputs and pairs:
        grads = torch.autograd.grad(
            [o for o, _ in pairs], inputs, [gi for _, gi in pairs], allow_unused=True
        )
    if exp2_map:
        grads = tuple(None if gr is None else gr.mul_(_LN2) for gr in grads)
    dv = dv1.reshape(bsz, heads, n, dvd + 1)[..., :dvd]
    return grads, dv, carry


def causal_scan_raw(q, k, v, state, stab, fm, params, keep, chunk, key_bias=None):
    """The unnormalized causal scan (``raw=True`` of :func:`causal_segment`), under plain
    autograd; ``key_bias: (H, L)`` (or None) is added to the keys' log-scales. Returns
    ``([num, den]: (B, H, L, dv + 1), g: (B, H, L), S, c)``."""
    outs, scales = [], []
    for s, e in _segments(q.shape[-2], chunk):
        qs, ks, vs, ke = _segment_inputs(q, k, v, keep, s, e, chunk)
        kb = None
        if key_bias is not None:
            kb = F.pad(key_bias[..., s:e], (0, qs.shape[-2] - (e - s)))
        out, state, stab, g = causal_segment(
            qs, ks, vs, state, stab, fm, params, ke, chunk, raw=True, key_bias=kb
        )
        outs.append(out[..., : e - s, :])
        scales.append(g[..., : e - s])
    if len(outs) == 1:
        return outs[0], scales[0], state, stab
    return torch.cat(outs, dim=-2), torch.cat(scales, dim=-1), state, stab


class _FavorCausal(torch.autograd.Function):
    # setup_context style (torch.func.grad works): the denominators and the states
    # entering each segment after the first (the first is the input state) are extra
    # outputs so that setup_context can save them.
    @staticmethod
    def forward(q, k, v, weight, state, stab, fm, params, keep, chunk):
        out, den, final, final_stab, entering = _scan_forward(
            q, k, v, state, stab, fm, params, keep, chunk, keep_states=True
        )
        flat = [t for pair in entering[1:] for t in pair]
        return out, final, final_stab, den, *flat

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, weight, state, stab, fm, params, keep, chunk = inputs
        out, _, final_stab, den, *flat = output
        ctx.fm, ctx.params, ctx.chunk = fm, params, chunk
        ctx.save_for_backward(q, k, v, weight, keep, out, den, state, stab, *flat)
        ctx.mark_non_differentiable(final_stab, den, *flat)

    @staticmethod
    @first_order_only("causal favor_attention / favor_recurrent")
    def backward(ctx, grad_out, grad_state, _grad_stab, *_grad_saved):
        q, k, v, weight, keep, out, den, *flat = ctx.saved_tensors
        fm, chunk = ctx.fm, ctx.chunk
        want = ctx.needs_input_grad
        want_w = weight is not None and want[3]
        dq = torch.empty_like(q) if want[0] else None
        dk = torch.empty_like(k) if want[1] else None
        dv = torch.empty_like(v) if want[2] else None
        dw = torch.zeros_like(weight) if want_w else None
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        d_state = grad_state
        segments = _segments(q.shape[-2], chunk)
        for idx in range(len(segments) - 1, -1, -1):
            s, e = segments[idx]
            state, stab = flat[2 * idx], flat[2 * idx + 1]
            qs, ks, vs, ke = _segment_inputs(q, k, v, keep, s, e, chunk)
            padded = qs.shape[-2]
            q_leaf = qs.detach().requires_grad_(want[0])
            k_leaf = ks.detach().requires_grad_(want[1])
            w_leaf = weight.detach().requires_grad_() if want_w else weight
            params = ctx.params.replace_weight(w_leaf)
            inputs = [t for t, on in ((q_leaf, want[0]), (k_leaf, want[1]), (w_leaf, want_w)) if on]
            grads, g_v, d_state = _segment_backward(
                q_leaf,
                k_leaf,
                vs,
                ke,
                state,
                stab,
                _pad_to(out[..., s:e, :], padded),
                F.pad(den[..., s:e], (0, padded - (e - s)), value=1.0),
                _pad_to(grad_out[..., s:e, :], padded),
                d_state,
                fm,
                params,
                chunk,
                inputs,
            )
            n = e - s
            grads = list(grads) or [None] * len(inputs)
            for acc, on in ((dq, want[0]), (dk, want[1])):
                gr = grads.pop(0) if on else None
                if acc is not None:
                    if gr is None:
                        acc[..., s:e, :] = 0
                    else:
                        acc[..., s:e, :] = gr[..., :n, :]
            if want_w and grads[0] is not None:
                dw += grads[0]
            if dv is not None:
                dv[..., s:e, :] = g_v[..., :n, :]
        d_init = d_state if want[4] else None
        return dq, dk, dv, dw, d_init, None, None, None, None, None


def favor_causal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    fm: FeatureMap,
    params: FeatureParams,
    *,
    key_padding_mask: Tensor | None = None,
    chunk_size: int = 64,
    initial: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal FAVOR attention, linear in length, with a carried state.

    Shapes: ``q, k: (B, H, L, d)`` (unscaled; ``params.scale`` applies), ``v: (B, H, L, dv)``,
    ``key_padding_mask: (B, L)`` bool (True = ignore), ``initial``: a state
    ``(S: (B, H, M, dv + 1), c: (B, H))`` for tokens before these (None: empty).
    Returns ``(out: (B, H, L, dv), S, c)``, the state after the last token.

    Equivalent to :func:`favor_naive` with ``causal=True`` (prefixed by the state's
    tokens).
    """
    bsz, heads, length, _ = q.shape
    m = fm.feature_dim(params.weight, q.shape[-1])
    if initial is None:
        initial = initial_state((bsz, heads), m, v.shape[-1], dtype=q.dtype, device=q.device)
    state, stab = initial
    keep = None if key_padding_mask is None else (~key_padding_mask).to(k.dtype)
    chunk = max(1, min(chunk_size, length))
    weight = params.weight
    needs_grad = builds_grad(q, k, v, weight, state)
    # Under torch.func (whose grad cannot run the hand-written backward: it re-enters
    # autograd) and torch.compile, the plain chunked scan; its gradient is autograd's.
    if not needs_grad or graph_captured():
        out, state, stab, _ = causal_scan(q, k, v, state, stab, fm, params, keep, chunk)
        return out, state, stab
    return _FavorCausal.apply(q, k, v, weight, state, stab, fm, params, keep, chunk)[:3]
