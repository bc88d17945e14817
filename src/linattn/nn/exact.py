"""ExactAttention: exact softmax attention (``scaled_dot_product_attention``) shaped like
``nn.MultiheadAttention`` and like the linear modules, so checkpoints move between them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_key_padding_mask, shape_str
from ._mha import MHAShaped

#: A key/value cache for decoding: ``(keys (B, H, L, d), values (B, H, L, d))``.
KVCache = tuple[Tensor, Tensor]


class ExactAttention(MHAShaped):
    """Exact multi-head softmax attention through ``scaled_dot_product_attention``: the
    baseline the linear kinds are compared with.

    Its parameters have the names and shapes of :class:`linattn.PerformerAttention`'s
    (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), so a ``state_dict`` moves between
    the two (FAVOR+ adds only its projection buffers).

    Args:
        embed_dim, num_heads: as ``nn.MultiheadAttention``.
        causal: attend to earlier positions only (self-attention, ``Lq == Lk``).
        rotary, rotary_base: rotary position embeddings on q and k (even ``head_dim``).
        dropout: on the attention weights (training only), as ``nn.MultiheadAttention``.
        bias, kdim, vdim, batch_first: as ``nn.MultiheadAttention`` (``batch_first=False``
            by default: inputs ``(L, B, E)``; pass True for ``(B, L, E)``).

    Forward: ``(query, key=None, value=None, key_padding_mask=None, need_weights=False,
    attn_mask=None, is_causal=False)`` returns ``(output, None)``. Shapes
    (``batch_first=True``): query ``(B, Lq, E)``, key/value ``(B, Lk, kdim/vdim)``,
    ``key_padding_mask (B, Lk)`` bool, True = padding. A query with no visible key (all
    its keys padded) gets 0, as in the linear modules.

    Equivalent to ``softmax(q k^T / sqrt(d) + mask) v`` per head, with ``-inf`` at the
    padded (and, when causal, future) keys.
    """

    method = "exact attention"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_projections(
            embed_dim,
            num_heads,
            kdim=kdim,
            vdim=vdim,
            bias=bias,
            dropout=dropout,
            batch_first=batch_first,
            factory=factory,
        )
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.causal = causal
        self._init_rotary(rotary, rotary_base)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        """``nn.MultiheadAttention``'s call; ``cu_seqlens`` (int32 ``(N + 1,)``): ``N``
        sequences packed back to back in a batch of one, each attending only to itself
        (a block-diagonal mask: O(T^2), the exact reference of the linear modules'
        packing; rotary positions restart at 0 for each sequence)."""
        if need_weights:
            raise ValueError(
                "need_weights=True is not available: ExactAttention runs "
                "scaled_dot_product_attention, which does not return the "
                "weights (pass need_weights=False, or use nn.MultiheadAttention)"
            )
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported (as in the linear modules); use "
                "causal=True / is_causal=True or key_padding_mask"
            )
        query, key, value = self._inputs(query, key, value, False)
        causal = self.causal or is_causal
        lq, lk = query.shape[1], key.shape[1]
        if causal and lq != lk:
            raise ValueError(
                f"causal attention needs Lq == Lk (self-attention); got query "
                f"{shape_str(query)}, key {shape_str(key)}"
            )
        dropout_p = self.dropout if self.training else 0.0
        if cu_seqlens is not None:
            offsets, positions = self._packed(cu_seqlens, query, key, key_padding_mask)
            q, k, v = self._qkv(query, key, value, positions=positions)
            lengths = torch.tensor(offsets, device=q.device).diff()
            seq = torch.arange(len(offsets) - 1, device=q.device).repeat_interleave(
                lengths, output_size=lq
            )
            # [T, T]: True = may attend: the same sequence (and not later, causal).
            allowed = seq[:, None] == seq[None, :]
            if causal:
                allowed = allowed.tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
            return self._layout(self._merge(out)), None
        mask = check_key_padding_mask(key_padding_mask, key.unsqueeze(1))
        q, k, v = self._qkv(query, key, value)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
        else:
            # [B, 1, 1 or Lq, Lk]: True = may attend (SDPA's convention).
            allowed = ~mask[:, None, None, :]
            if causal:
                allowed = allowed & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
            # A query that sees no key: 0 (SDPA's kernels give NaN or 0 there).
            out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
        return self._layout(self._merge(out)), None

    def step(self, x: Tensor, cache: KVCache | None, offset: int) -> tuple[Tensor, KVCache]:
        """Causal self-attention for new tokens ``x: (B, n, E)`` at positions
        ``offset..offset+n-1``, after the keys and values in ``cache`` (None at the start).
        Returns ``(output (B, n, E), new_cache)``; the cache grows by ``n`` positions."""
        q, k, v = self._qkv(x, x, x, offset)
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
        return self._merge(out), (k, v)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"causal={self.causal}, rotary={self.rotary}"
        )
