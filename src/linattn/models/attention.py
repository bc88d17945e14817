"""Attention layers chosen by name (``"exact"``, ``"favor"``, ``"linformer"``), with one
interface: ``forward(x, key_padding_mask)`` and, for causal kinds, ``step(x, cache,
offset)`` for generation."""

from __future__ import annotations

from torch import Tensor, nn

from ..nn import ExactAttention, LinformerAttention, PerformerAttention
from .config import ModelConfig


class _Adapter(nn.Module):
    """Wraps the MHA-shaped modules into ``forward(x, key_padding_mask) -> Tensor``. Every
    kind sits under the same name (``inner``), so the shared parameters (``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj``) keep their ``state_dict`` keys across kinds."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        if cu_seqlens is None:
            return self.inner(x, key_padding_mask=key_padding_mask)[0]
        return self.inner(x, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)[0]

    def step(self, x: Tensor, cache, offset: int):
        if not isinstance(self.inner, (ExactAttention, PerformerAttention)):
            raise ValueError("step() needs causal attention ('exact' or 'favor')")
        return self.inner.step(x, cache, offset)


def build_attention(cfg: ModelConfig, layer: int, shared=None) -> nn.Module:
    """The attention layer ``layer`` of a model described by ``cfg``."""
    rotary = cfg.position == "rotary"
    if cfg.attention == "exact":
        return _Adapter(
            ExactAttention(
                cfg.dim,
                cfg.heads,
                causal=cfg.causal,
                rotary=rotary,
                dropout=cfg.dropout,
                batch_first=True,
            )
        )
    if cfg.attention == "favor":
        attn = PerformerAttention(
            cfg.dim,
            cfg.heads,
            **vars(cfg.favor_options()),
            causal=cfg.causal,
            seed=cfg.seed,
            layer_index=layer,
            rotary=rotary,
            dropout=cfg.dropout,
            batch_first=True,
        )
        # The model counts training steps itself (outside gradient checkpointing).
        attn.auto_tick = False
        return _Adapter(attn)
    return _Adapter(
        LinformerAttention(
            cfg.dim,
            cfg.heads,
            max_seq_len=cfg.max_seq_len,
            **vars(cfg.linformer_options()),
            shared_projection=shared,
            dropout=cfg.dropout,
            seed=cfg.seed + layer,
            batch_first=True,
        )
    )
