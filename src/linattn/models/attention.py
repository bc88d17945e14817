"""Attention layers chosen by name (``"exact"``, ``"favor"``, ``"linformer"``), with one
interface: ``forward(x, key_padding_mask)`` and, for causal kinds, ``step(x, cache,
offset)`` for generation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import LinformerAttention, PerformerAttention
from ..positional import apply_rotary, rotary_angles
from .config import ModelConfig


class ExactAttention(nn.Module):
    """Exact softmax attention through ``scaled_dot_product_attention``, with a key/value
    cache for generation (the baseline the linear kinds are compared with)."""

    def __init__(self, dim: int, heads: int, *, causal: bool, rotary: bool, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.rotary, self.dropout = rotary, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor, offset: int):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary:
            cos, sin = rotary_angles(torch.arange(offset, offset + n, device=x.device),
                                     self.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def _out(self, out: Tensor) -> Tensor:
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        q, k, v = self._qkv(x, 0)
        mask = None
        if key_padding_mask is not None:
            mask = ~key_padding_mask[:, None, None, :]
            if self.causal:
                n = x.shape[1]
                mask = mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self._out(out)

    def step(self, x: Tensor, cache, offset: int):
        q, k, v = self._qkv(x, offset)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=-2), torch.cat([cache[1], v], dim=-2)
        n, total = q.shape[-2], k.shape[-2]
        if n == 1:
            # One new token sees every cached key.
            out = F.scaled_dot_product_attention(q, k, v)
        elif n == total:
            # Prefill: plain causal (keeps SDPA's flash kernel; no L x L mask).
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # New token i (absolute offset + i) sees keys up to offset + i.
            mask = torch.ones(n, total, dtype=torch.bool, device=x.device).tril(total - n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self._out(out), (k, v)


class _Adapter(nn.Module):
    """Wraps the MHA-shaped modules into ``forward(x, key_padding_mask) -> Tensor``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        return self.inner(x, key_padding_mask=key_padding_mask)[0]

    def step(self, x: Tensor, cache, offset: int):
        if not isinstance(self.inner, PerformerAttention):
            raise ValueError("step() needs causal attention ('exact' or 'favor')")
        return self.inner.step(x, cache, offset)


def build_attention(cfg: ModelConfig, layer: int, shared=None) -> nn.Module:
    """The attention layer ``layer`` of a model described by ``cfg``."""
    rotary = cfg.position == "rotary"
    if cfg.attention == "exact":
        return ExactAttention(cfg.dim, cfg.heads, causal=cfg.causal, rotary=rotary,
                              dropout=cfg.dropout)
    if cfg.attention == "favor":
        attn = PerformerAttention(
            cfg.dim, cfg.heads, num_features=cfg.num_features, kernel=cfg.kernel,
            causal=cfg.causal, window=cfg.window, redraw_interval=cfg.redraw_interval,
            seed=cfg.seed, layer_index=layer, rotary=rotary, dropout=cfg.dropout,
            batch_first=True,
        )
        # The model counts training steps itself (outside gradient checkpointing).
        attn.auto_tick = False
        return _Adapter(attn)
    return _Adapter(LinformerAttention(
        cfg.dim, cfg.heads, max_seq_len=cfg.max_seq_len, proj_dim=cfg.proj_dim,
        sharing=cfg.linformer_sharing, projection=cfg.linformer_projection,
        shared_projection=shared, dropout=cfg.dropout, seed=cfg.seed + layer,
        batch_first=True,
    ))
