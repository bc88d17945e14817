"""Layouts shared by the window hybrid's parts: shifted sequences, block-major copies
(``(nblk, B, H, C, e)``: query block ``t`` meets key block ``t + delta`` as contiguous
slices) and zero-padded block views."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import graph_captured


def shifted(x: Tensor, start: int, total: int, dim: int = -2) -> Tensor:
    """``y`` of length ``total`` along ``dim`` with ``y[p] = x[p + start]``, zeros where
    ``p + start`` falls outside ``x``."""
    n = x.shape[dim]
    lo, hi = max(0, start), min(n, start + total)
    dim = dim % x.dim()
    if hi <= lo:
        shape = list(x.shape)
        shape[dim] = total
        return x.new_zeros(shape)
    part = x.narrow(dim, lo, hi - lo)
    left = lo - start
    right = total - left - (hi - lo)
    pad = [0, 0] * (x.dim() - 1 - dim) + [left, right]
    return F.pad(part, pad)


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


def block_span(nblk: int, dlt: int) -> tuple[slice, slice] | None:
    # Query blocks t with a key block t + dlt inside the sequence, and those key blocks.
    t0, t1 = max(0, -dlt), min(nblk, nblk - dlt)
    if t1 <= t0:
        return None
    return slice(t0, t1), slice(t0 + dlt, t1 + dlt)


def bmm_add(acc: Tensor, x: Tensor, y: Tensor) -> None:
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


def padded_blocks(x: Tensor, nblk: int, c: int, pad_blocks: int) -> Tensor:
    # (B, H, L, ...) -> (B, H, nblk + 2 pad, C, ...) zero-padded by ``pad_blocks`` blocks
    # on both sides (so that block t + delta is index pad + t + delta).
    y = shifted(x, -pad_blocks * c, (nblk + 2 * pad_blocks) * c, dim=2)
    return y.reshape(*y.shape[:2], nblk + 2 * pad_blocks, c, *y.shape[3:])
