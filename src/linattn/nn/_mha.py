"""What every ``nn.MultiheadAttention``-shaped module here shares: the four projections,
the call pattern (key/value defaults, ``batch_first``, ``need_weights``) and head
splitting."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_cu_seqlens, check_positive_int, shape_str
from ..functional import packed_positions
from ..positional import apply_rotary, rotary_angles


class MHAShaped(nn.Module):
    """Base of the attention modules; subclasses compute the heads' attention."""

    #: what the module is, for error messages ("FAVOR+", "Linformer")
    method = ""

    def _init_projections(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim,
        vdim,
        bias: bool,
        dropout: float,
        batch_first: bool,
        factory: dict,
    ) -> None:
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        # None means embed_dim; 0 must not silently mean it too.
        self.kdim = embed_dim if kdim is None else check_positive_int("kdim", kdim)
        self.vdim = embed_dim if vdim is None else check_positive_int("vdim", vdim)
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def _inputs(self, query, key, value, need_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Defaults (self-attention), ``batch_first`` layout and shape checks."""
        if need_weights:
            raise ValueError(
                f"need_weights=True is not available: {self.method} never forms the "
                "(Lq, Lk) attention matrix, which is what makes it linear (pass "
                "need_weights=False)"
            )
        key = query if key is None else key
        value = key if value is None else value
        layout = "batch, seq" if self.batch_first else "seq, batch"
        for name, t, width in (
            ("query", query, self.embed_dim),
            ("key", key, self.kdim),
            ("value", value, self.vdim),
        ):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
                got = shape_str(t) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(
                    f"{name} must have shape ({layout}, {width}) "
                    f"(batch_first={self.batch_first}), got {got}"
                )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if value.shape[:2] != key.shape[:2] or query.shape[0] != key.shape[0]:
            raise ValueError(
                f"query, key and value must share the batch and key/value the "
                f"length; got query {shape_str(query)}, key {shape_str(key)}, "
                f"value {shape_str(value)}"
            )
        return query, key, value

    def _init_rotary(self, rotary: bool, rotary_base: float) -> None:
        if rotary and self.head_dim % 2:
            raise ValueError(f"rotary=True needs an even head_dim, got {self.head_dim}")
        self.rotary, self.rotary_base = rotary, rotary_base

    def _rotate(self, x: Tensor, offset: int, positions: Tensor | None = None) -> Tensor:
        """Rotary position embedding of ``x: (B, H, L, d)`` at positions
        ``offset..offset+L-1``, or ``positions: (L,)`` (identity without ``rotary``)."""
        if not self.rotary:
            return x
        pos = positions
        if pos is None:
            pos = torch.arange(offset, offset + x.shape[-2], device=x.device)
        cos, sin = rotary_angles(pos, self.head_dim, self.rotary_base)
        return apply_rotary(x, cos, sin)

    def _qkv(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        offset: int = 0,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The heads ``(B, H, L, d)`` of the projected inputs ``(B, L, E)``, queries and
        keys rotated for positions from ``offset`` or at ``positions: (L,)`` (with
        ``rotary``)."""
        q = self._rotate(self._heads(self.q_proj(query)), offset, positions)
        k = self._rotate(self._heads(self.k_proj(key)), offset, positions)
        return q, k, self._heads(self.v_proj(value))

    def _packed(
        self, cu_seqlens: object, query: Tensor, key: Tensor, key_padding_mask: object
    ) -> tuple[list[int], Tensor]:
        """Check packed inputs (``query``, ``key``: ``(1, T, E)`` after :meth:`_inputs`)
        against ``cu_seqlens``; returns the offsets and each token's position inside its
        sequence, ``(T,)`` (rotary positions restart at 0 for every sequence)."""
        if key_padding_mask is not None:
            raise ValueError(
                "cu_seqlens and key_padding_mask cannot be combined: packed sequences hold "
                "no padding"
            )
        if query.shape[0] != 1 or key.shape[1] != query.shape[1]:
            raise ValueError(
                "with cu_seqlens, query and key must hold one packed batch of the same "
                f"length T, (1, T, E) (batch_first) or (T, 1, E); got query "
                f"{shape_str(query)}, key {shape_str(key)} (batch first)"
            )
        offsets = check_cu_seqlens(cu_seqlens, query.shape[1], query.device)
        return offsets, packed_positions(cu_seqlens, query.shape[1])

    def _heads(self, x: Tensor) -> Tensor:
        # [B, L, E] -> [B, H, L, d]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, out: Tensor) -> Tensor:
        # [B, H, L, d] -> out_proj([B, L, E])
        b, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, length, self.embed_dim))

    def _layout(self, out: Tensor) -> Tensor:
        return out if self.batch_first else out.transpose(0, 1)
