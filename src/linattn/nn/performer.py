"""PerformerAttention: FAVOR+ as a drop-in for ``nn.MultiheadAttention``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_positive_int, shape_str
from ..features import KERNELS, draw_projection
from ..functional import FavorState, favor_attention, favor_recurrent
from ..positional import apply_rotary, rotary_angles


def default_num_features(head_dim: int) -> int:
    """The paper's ``d log d``, rounded up to a multiple of 16 (at least 16)."""
    return max(16, math.ceil(head_dim * math.log(max(head_dim, 2)) / 16) * 16)


def redraw_seed(base_seed: int, layer: int, draw: int) -> int:
    """Deterministic 63-bit seed from (base seed, layer, draw count): the same on every
    rank of a distributed job, with no communication and nothing taken from the data."""
    x = (base_seed & 0xFFFFFFFF) * 0x9E3779B1 + layer * 0x85EBCA77 + draw * 0xC2B2AE3D
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 32
    return x & 0x7FFFFFFFFFFFFFFF


class PerformerAttention(nn.Module):
    """FAVOR+ multi-head attention, a drop-in for ``nn.MultiheadAttention``.

    Args:
        embed_dim, num_heads: as ``nn.MultiheadAttention``.
        num_features: random features ``m`` per head (default: ``d log d`` rounded up to a
            multiple of 16, the paper's choice).
        kernel: a :data:`linattn.KERNELS` name (``"softmax"``, ``"relu"``, ...).
        causal: attend to earlier positions only (self-attention).
        redraw_interval: draw a fresh projection every this many training forward
            passes (never in ``eval()``); None keeps it fixed.
        orthogonal, scaling: of :func:`linattn.draw_projection`.
        seed, layer_index: the projection after ``t`` draws comes from a generator
            seeded with ``(seed, layer_index, t)``. That makes redraws identical on every
            rank and reproducible.
        rotary: apply rotary position embeddings to q and k (before the feature map).
        dropout: applied to the attention output. There is no attention matrix to drop
            from, so this is where MHA's dropout goes.
        bias, kdim, vdim, batch_first: as ``nn.MultiheadAttention``.
        chunk_size: causal chunk length (speed only).

    Forward: ``(query, key=None, value=None, key_padding_mask=None, need_weights=False,
    attn_mask=None, is_causal=False)`` returns ``(output, None)``. Shapes
    (``batch_first=True``): query ``(B, Lq, E)``, key/value ``(B, Lk, kdim/vdim)``,
    ``key_padding_mask (B, Lk)`` bool, True = padding.

    The projection is a persistent buffer (``state_dict`` reproduces outputs exactly),
    and so are the draw counter and ``(seed, layer_index)``, so a reloaded module goes on
    with the same redraws.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_features: int | None = None,
        kernel: str = "softmax",
        causal: bool = False,
        redraw_interval: int | None = None,
        orthogonal: bool = True,
        scaling: str = "chi",
        seed: int = 0,
        layer_index: int = 0,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        chunk_size: int = 64,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        check_choice("kernel", kernel, tuple(KERNELS))
        if causal and not KERNELS[kernel].causal_ok:
            raise ValueError(f"kernel={kernel!r} is bidirectional only; it cannot be causal")
        if redraw_interval is not None:
            check_positive_int("redraw_interval", redraw_interval)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        if rotary and self.head_dim % 2:
            raise ValueError(f"rotary=True needs an even head_dim, got {self.head_dim}")
        self.num_features = num_features or default_num_features(self.head_dim)
        check_positive_int("num_features", self.num_features)
        self.kernel, self.causal, self.redraw_interval = kernel, causal, redraw_interval
        self.orthogonal, self.scaling = orthogonal, scaling
        self.rotary, self.rotary_base = rotary, rotary_base
        self.dropout, self.batch_first, self.chunk_size = dropout, batch_first, chunk_size
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.frozen = False
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        # Saved with the weights, so a reloaded module continues the same redraw sequence.
        self.register_buffer("redraw_key", torch.tensor([seed, layer_index], device=device))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer(
            "projection", self._draw(0, device=device, dtype=dtype), persistent=True
        )

    # ------------------------------------------------------------ projection
    def _draw(self, draw: int, *, device=None, dtype=None) -> Tensor:
        seed, layer = (int(t) for t in self.redraw_key)
        g = torch.Generator().manual_seed(redraw_seed(seed, layer, draw))
        w = draw_projection(self.num_features, self.head_dim, orthogonal=self.orthogonal,
                            scaling=self.scaling, generator=g, dtype=torch.float64)
        return w.to(device=device, dtype=dtype or torch.get_default_dtype())

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Draw the next projection (deterministic: ``(seed, layer_index, draws + 1)``)."""
        self.draws += 1
        w = self._draw(int(self.draws), device=self.projection.device,
                       dtype=self.projection.dtype)
        self.projection.copy_(w)

    def freeze_projection(self, frozen: bool = True) -> None:
        """Stop (or resume) automatic redraws."""
        self.frozen = frozen

    @torch.no_grad()
    def tick(self) -> None:
        """Count one training forward pass; redraw when the interval is reached. Models
        call this themselves (outside gradient checkpointing) and set ``auto_tick``."""
        if self.redraw_interval is None or self.frozen or not self.training:
            return
        self.calls += 1
        if int(self.calls) % self.redraw_interval == 0:
            self.redraw_projection()

    auto_tick = True

    # ------------------------------------------------------------ forward
    def _heads(self, x: Tensor) -> Tensor:
        # [B, L, E] -> [B, H, L, d]
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _rotate(self, x: Tensor, offset: int) -> Tensor:
        if not self.rotary:
            return x
        pos = torch.arange(offset, offset + x.shape[-2], device=x.device)
        cos, sin = rotary_angles(pos, self.head_dim, self.rotary_base)
        return apply_rotary(x, cos, sin)

    def _check(self, query, key, value):
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim),
                               ("value", value, self.vdim)):
            if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != width:
                got = shape_str(t) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name} must have shape (batch, seq, {width}) "
                                 f"(batch_first={self.batch_first}), got {got}")

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        if need_weights:
            raise ValueError(
                "need_weights=True is not available: FAVOR+ never forms the (Lq, Lk) "
                "attention matrix, which is what makes it linear (pass need_weights=False)"
            )
        if attn_mask is not None:
            raise ValueError(
                "attn_mask is not supported by FAVOR+ (an arbitrary mask needs the full "
                "matrix); use causal=True or key_padding_mask"
            )
        if self.auto_tick:
            self.tick()
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        self._check(query, key, value)
        causal = self.causal or is_causal
        q = self._rotate(self._heads(self.q_proj(query)), 0)
        k = self._rotate(self._heads(self.k_proj(key)), 0)
        v = self._heads(self.v_proj(value))
        out = favor_attention(q, k, v, self.projection, kernel=self.kernel, causal=causal,
                              key_padding_mask=key_padding_mask, chunk_size=self.chunk_size)
        out = self._finish(out)
        return (out.transpose(0, 1) if not self.batch_first else out), None

    def _finish(self, out: Tensor) -> Tensor:
        out = F.dropout(out, self.dropout, self.training)
        b, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, length, self.embed_dim))

    def step(
        self, x: Tensor, state: FavorState | None, offset: int
    ) -> tuple[Tensor, FavorState]:
        """Causal self-attention for new tokens ``x: (B, n, E)`` at positions
        ``offset..offset+n-1``, after ``state`` (None at the start). O(1) in the context
        length. Returns ``(output (B, n, E), new_state)``."""
        q = self._rotate(self._heads(self.q_proj(x)), offset)
        k = self._rotate(self._heads(self.k_proj(x)), offset)
        v = self._heads(self.v_proj(x))
        out, state = favor_recurrent(q, k, v, self.projection, state=state, kernel=self.kernel)
        return self._finish(out), state

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"num_features={self.num_features}, kernel={self.kernel!r}, "
                f"causal={self.causal}, redraw_interval={self.redraw_interval}")
