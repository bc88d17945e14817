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

import torch
import torch.nn.functional as F
from torch import Tensor

from ...features import FeatureMap, FeatureParams
from .common import ones_col, safe_denominator

_CHUNKS_PER_SEGMENT = 16


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
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """One segment of the causal scan; differentiable (autograd recomputes through it).

    Shapes: ``q, k: (B, H, n, d)``, ``v: (B, H, n, dv)`` with ``n`` a multiple of
    ``chunk``; ``state: (B, H, M, dv + 1)`` and ``stab: (B, H)`` for the tokens before;
    ``keep: (B, n)`` (1 = real key, 0 = padding) or None.
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
    fq, rq = fm.stabilized(q, params, is_query=not raw, inplace=inplace)
    fk, r = fm.stabilized(k, params, is_query=False, inplace=inplace)
    m = fq.shape[-1]
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
    out = num / safe_denominator(den, fm.positive_exp)
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
    its stabilizer and (if ``keep_states``) the states entering each segment."""
    outs, entering = [], []
    for s, e in _segments(q.shape[-2], chunk):
        qs, ks, vs, ke = _segment_inputs(q, k, v, keep, s, e, chunk)
        if keep_states:
            entering.append((state, stab))
        out, state, stab = causal_segment(qs, ks, vs, state, stab, fm, params, ke, chunk)
        outs.append(out[..., : e - s, :])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out, state, stab, entering


def causal_scan_raw(q, k, v, state, stab, fm, params, keep, chunk):
    """The unnormalized causal scan (``raw=True`` of :func:`causal_segment`), under plain
    autograd. Returns ``([num, den]: (B, H, L, dv + 1), g: (B, H, L), S, c)``."""
    outs, scales = [], []
    for s, e in _segments(q.shape[-2], chunk):
        qs, ks, vs, ke = _segment_inputs(q, k, v, keep, s, e, chunk)
        out, state, stab, g = causal_segment(
            qs, ks, vs, state, stab, fm, params, ke, chunk, raw=True
        )
        outs.append(out[..., : e - s, :])
        scales.append(g[..., : e - s])
    if len(outs) == 1:
        return outs[0], scales[0], state, stab
    return torch.cat(outs, dim=-2), torch.cat(scales, dim=-1), state, stab


class _FavorCausal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weight, state, stab, fm, params, keep, chunk):
        out, final, final_stab, entering = causal_scan(
            q, k, v, state, stab, fm, params, keep, chunk, keep_states=True
        )
        ctx.fm, ctx.params, ctx.chunk = fm, params, chunk
        ctx.num_segments = len(entering)
        flat = [t for pair in entering for t in pair]
        ctx.save_for_backward(q, k, v, weight, keep, *flat)
        ctx.mark_non_differentiable(final_stab)
        return out, final, final_stab

    @staticmethod
    def backward(ctx, grad_out, grad_state, _grad_stab):
        q, k, v, weight, keep, *flat = ctx.saved_tensors
        fm, chunk = ctx.fm, ctx.chunk
        want = ctx.needs_input_grad
        want_w = weight is not None and want[3]
        dq = torch.zeros_like(q) if want[0] else None
        dk = torch.zeros_like(k) if want[1] else None
        dv = torch.zeros_like(v) if want[2] else None
        dw = torch.zeros_like(weight) if want_w else None
        d_state = grad_state
        segments = _segments(q.shape[-2], chunk)
        for idx in range(len(segments) - 1, -1, -1):
            s, e = segments[idx]
            state, stab = flat[2 * idx], flat[2 * idx + 1]
            qs, ks, vs, ke = _segment_inputs(q, k, v, keep, s, e, chunk)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (qs, ks, vs)]
                state_leaf = state.detach().requires_grad_()
                w_leaf = weight.detach().requires_grad_() if want_w else weight
                params = ctx.params.replace_weight(w_leaf)
                out, new_state, _ = causal_segment(
                    *leaves, state_leaf, stab, fm, params, ke, chunk
                )
                g = _pad_to(grad_out[..., s:e, :], out.shape[-2])
                outs, grads_in = [out], [g]
                if d_state is not None:
                    outs.append(new_state)
                    grads_in.append(d_state)
                inputs = [*leaves, state_leaf] + ([w_leaf] if want_w else [])
                grads = torch.autograd.grad(outs, inputs, grads_in, allow_unused=True)
            n = e - s
            for acc, gr in ((dq, grads[0]), (dk, grads[1]), (dv, grads[2])):
                if acc is not None and gr is not None:
                    acc[..., s:e, :] = gr[..., :n, :]
            d_state = grads[3]
            if want_w and grads[4] is not None:
                dw += grads[4]
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
    m = fm.num_features(params.weight, q.shape[-1])
    if initial is None:
        initial = initial_state((bsz, heads), m, v.shape[-1], dtype=q.dtype, device=q.device)
    state, stab = initial
    keep = None if key_padding_mask is None else (~key_padding_mask).to(k.dtype)
    chunk = max(1, min(chunk_size, length))
    weight = params.weight
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, weight, state)
    )
    if not needs_grad:
        out, state, stab, _ = causal_scan(q, k, v, state, stab, fm, params, keep, chunk)
        return out, state, stab
    return _FavorCausal.apply(q, k, v, weight, state, stab, fm, params, keep, chunk)
