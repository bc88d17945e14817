"""Linformer's compressions and the attention over the compressed keys.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``n`` maximum length (columns of
the projections), ``proj_dim`` compressed length, ``d`` channels.

Padding: :func:`compact_padding` moves each sequence's real tokens to the front (in
order) and zeros the rest. The j-th real token then meets column j of the projection,
so a sequence's result does not depend on how much padding it had, on which side, or
on what the padding held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compact_padding(x: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Real tokens first, padding zeroed.

    Shapes: ``x: (B, ..., L, d)``, ``key_padding_mask: (B, L)`` bool (True = padding).
    Returns ``(x', lengths: (B,))``; ``x'`` has the same shape (``lengths`` is None
    without a mask).
    """
    if key_padding_mask is None:
        return x, None
    keep = ~key_padding_mask
    # Stable sort puts real tokens (key 0) first, in their order.
    order = torch.sort(key_padding_mask.to(torch.uint8), dim=-1, stable=True).indices
    lengths = keep.sum(-1)
    lead = x.dim() - 2
    idx = order.view(order.shape[0], *([1] * (lead - 1)), order.shape[1], 1)
    moved = torch.gather(x, -2, idx.expand(*x.shape[:-2], -1, x.shape[-1]))
    live = torch.arange(x.shape[-2], device=x.device)[None] < lengths[:, None]
    live = live.view(live.shape[0], *([1] * (lead - 1)), live.shape[1], 1)
    # A select, not a product: NaN * 0 is NaN, and padding may hold anything.
    return moved.masked_fill(~live, 0), lengths


def linear_compress(x: Tensor, proj: Tensor) -> Tensor:
    """``proj[..., :L] @ x``: ``x: (B, H, L, d)``, ``proj: (proj_dim, n)`` or
    ``(H, proj_dim, n)`` with ``L <= n``; returns ``(B, H, proj_dim, d)``."""
    return proj[..., : x.shape[-2]] @ x


def pool_matrix(length: int, proj_dim: int, n: int, *, dtype=None, device=None) -> Tensor:
    """Mean pooling of the first ``length`` of ``n`` positions into ``proj_dim`` windows,
    as a ``(proj_dim, n)`` matrix (so mean pooling is a linear projection).

    Window ``i`` is ``[floor(i L / k), ceil((i + 1) L / k))``, never empty (as adaptive
    pooling): exactly ``proj_dim`` windows for every length, with no floor surprises when
    ``proj_dim`` does not divide ``L``.
    """
    i = torch.arange(proj_dim, device=device, dtype=torch.float64)
    starts = torch.floor(i * length / proj_dim)
    ends = torch.maximum(torch.ceil((i + 1) * length / proj_dim), starts + 1)
    j = torch.arange(n, device=device, dtype=torch.float64)
    inside = (j >= starts[:, None]) & (j < ends[:, None]) & (j < length)
    return (inside / (ends - starts)[:, None]).to(dtype or torch.get_default_dtype())


def pool_compress(x: Tensor, proj_dim: int, mode: str, lengths: Tensor | None = None) -> Tensor:
    """Mean or max pooling of ``x: (B, H, L, d)`` (compacted) to ``(B, H, proj_dim, d)``,
    windows over each sequence's real length (``lengths: (B,)``, default ``L``)."""
    length = x.shape[-2]
    if lengths is None:
        groups = [(slice(None), length)]
    else:
        uniq = torch.unique(lengths).tolist()
        groups = [((lengths == n).nonzero().squeeze(-1), int(n)) for n in uniq]
    out = x.new_zeros(*x.shape[:-2], proj_dim, x.shape[-1])
    for rows, n in groups:
        if n == 0:
            continue
        xs = x[rows][..., :n, :]
        flat = xs.transpose(-2, -1).reshape(-1, xs.shape[-1], n)
        pool = F.adaptive_avg_pool1d if mode == "mean" else F.adaptive_max_pool1d
        pooled = pool(flat, proj_dim)
        out[rows] = pooled.reshape(*xs.shape[:-2], xs.shape[-1], proj_dim).transpose(-2, -1)
    return out


def conv_compress(x: Tensor, weight: Tensor, proj_dim: int) -> Tensor:
    """Depthwise strided convolution along the sequence to exactly ``proj_dim`` positions.

    ``x: (B, H, L, d)`` (compacted), ``weight: (H * d, 1, s)`` with ``s`` the kernel and
    stride (``ceil(n / proj_dim)``). The sequence is zero-padded to ``proj_dim * s``.
    Returns ``(B, H, proj_dim, d)``.
    """
    b, h, length, d = x.shape
    s = weight.shape[-1]
    if length > proj_dim * s:
        raise ValueError(f"sequence length {length} exceeds proj_dim * stride = {proj_dim * s}")
    chans = x.permute(0, 1, 3, 2).reshape(b, h * d, length)
    chans = F.pad(chans, (0, proj_dim * s - length))
    out = F.conv1d(chans, weight, stride=s, groups=h * d)
    return out.reshape(b, h, d, proj_dim).permute(0, 1, 3, 2)


def projected_attention(
    q: Tensor, kc: Tensor, vc: Tensor, scale: float | None, *, dropout_p: float = 0.0
) -> Tensor:
    """Exact softmax attention over the ``proj_dim`` compressed positions.

    ``q: (B, H, Lq, d)``, ``kc: (B, H, proj_dim, d)``, ``vc: (B, H, proj_dim, dv)``;
    ``dropout_p`` on the attention weights (pass 0 in evaluation). NaN and inf propagate as in
    ``softmax(q @ kc^T * scale) @ vc``.
    """
    if q.device.type == "cpu":
        # SDPA's CPU kernels swallow NaN scores (a single key, or all-NaN rows in float64,
        # return finite numbers); the formula propagates NaN and inf as the reference does.
        # proj_dim is small, so the (Lq, proj_dim) weights are cheap.
        s = (q @ kc.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        att = torch.softmax(s, dim=-1)
        if dropout_p > 0:
            att = F.dropout(att, dropout_p)
        return att @ vc
    return F.scaled_dot_product_attention(q, kc, vc, dropout_p=dropout_p, scale=scale)
