"""Linformer modules: the sequence-axis projections and a drop-in attention layer."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_choice, check_key_padding_mask, check_positive_int
from ..functional import linformer_attention
from ..ops.linformer import (
    compact_padding,
    conv_compress,
    linear_compress,
    pool_compress,
    pool_matrix,
)
from ._mha import MHAShaped

#: How the compressions are shared: per head, by the heads, keys with values, by layers.
Sharing = Literal["none", "headwise", "kv", "layerwise"]
SHARING: tuple[Sharing, ...] = get_args(Sharing)
#: What compresses the sequence: a learned or fixed matrix, pooling, a convolution.
ProjKind = Literal["linear", "random", "mean", "max", "conv"]
PROJ_KINDS: tuple[ProjKind, ...] = get_args(ProjKind)


@dataclass(frozen=True)
class LinformerOptions:
    """The Linformer settings and their defaults, written once: :class:`LinformerAttention`,
    :class:`LinformerProjection`, :class:`linattn.models.ModelConfig`,
    :class:`linattn.train.TrainConfig`, ``convert(model, "linformer")`` and the command
    line take their defaults from here; ``LinformerAttention(..., **vars(options))``
    builds a module from them.

    Attributes:
        proj_dim: the compressed length (rows of ``E`` and ``F``; the paper's ``k``).
        sharing: a :data:`SHARING` mode (see :class:`LinformerProjection`).
        proj_kind: a :data:`PROJ_KINDS` name: what compresses the sequence.
    """

    proj_dim: int = 256
    sharing: Sharing = "none"
    proj_kind: ProjKind = "linear"


class LinformerProjection(nn.Module):
    """The compressions ``E`` (keys) and ``F`` (values) of one layer, or of a whole model.

    Args:
        max_seq_len: ``n``, the longest sequence the projection accepts.
        proj_dim: the compressed length.
        num_heads, head_dim: of the attention it serves.
        proj_kind: ``"linear"`` (learned, initialized ``N(0, 1/proj_dim)``, the
            Johnson-Lindenstrauss scale), ``"random"`` (fixed ``N(0, 1/proj_dim)`` from
            ``seed``, a persistent buffer), ``"mean"``/``"max"`` (pooling over the sequence
            into ``proj_dim`` windows, no parameters), ``"conv"`` (learned depthwise
            convolution with kernel and stride ``ceil(n / proj_dim)``).
        sharing: ``"none"`` (one ``E`` and one ``F`` per head), ``"headwise"`` (one ``E``,
            one ``F`` for all heads), ``"kv"`` (``E = F``, shared by heads),
            ``"layerwise"`` (as ``"kv"``; the one module is shared by every layer of a
            model: create it once and pass it to each layer).

    A 12-layer, 12-head model holds 288 / 24 / 12 / 1 ``(proj_dim, n)`` matrices in the four
    modes (the Linformer paper's count).
    """

    def __init__(
        self,
        max_seq_len: int,
        proj_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        proj_kind: ProjKind = LinformerOptions.proj_kind,
        sharing: Sharing = LinformerOptions.sharing,
        seed: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.max_seq_len = check_positive_int("max_seq_len", max_seq_len)
        self.proj_dim = check_positive_int("proj_dim", proj_dim)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.proj_kind = check_choice("proj_kind", proj_kind, PROJ_KINDS)
        self.sharing = check_choice("sharing", sharing, SHARING)
        if self.proj_dim >= self.max_seq_len:
            warnings.warn(
                f"Linformer proj_dim={proj_dim} >= max_seq_len={max_seq_len}: the keys are "
                f"not compressed (it costs more than exact attention); pass a smaller "
                f"proj_dim",
                stacklevel=3,
            )
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        per_head = sharing == "none"
        separate_v = sharing in ("none", "headwise")
        if proj_kind in ("linear", "random"):
            shape = (num_heads, proj_dim, max_seq_len) if per_head else (proj_dim, max_seq_len)
            g = torch.Generator().manual_seed(seed)
            mats = [
                torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(proj_dim)
                for _ in range(2 if separate_v else 1)
            ]
            mats = [m.to(**factory) for m in mats]
            for name, mat in zip(("e", "f"), mats):
                if proj_kind == "linear":
                    self.register_parameter(name, nn.Parameter(mat))
                else:
                    self.register_buffer(name, mat, persistent=True)
        elif proj_kind == "conv":
            self.stride = math.ceil(max_seq_len / proj_dim)
            chans = num_heads * head_dim if per_head else head_dim
            for name in ("e", "f")[: 2 if separate_v else 1]:
                w = torch.empty(chans, 1, self.stride, **factory)
                # Start as a mean over each window (a sensible, trainable pooling).
                nn.init.constant_(w, 1.0 / self.stride)
                self.register_parameter(name, nn.Parameter(w))
        # Absent matrices (pooling has none; shared E = F has no F) read as None.
        for name in ("e", "f"):
            if not hasattr(self, name):
                setattr(self, name, None)

    @property
    def value_projection(self) -> Tensor | None:
        return self.e if self.f is None else self.f

    @property
    def head_shared_linear(self) -> bool:
        """The compression is one linear map of the sequence for every head, so it can be
        applied before the key/value input projections."""
        return self.proj_kind in ("linear", "random", "mean") and self.sharing != "none"

    def matrices(self, length: int, lengths: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(E, F)`` restricted to ``length`` columns for the head-shared linear kinds:
        ``(proj_dim, L)``, or ``(B, proj_dim, L)`` for mean pooling with per-sequence lengths
        (built in ``like``'s dtype and device)."""
        if self.proj_kind == "mean":
            m = self._pool_matrices(length, lengths, like)
            return m, m
        return self.e[..., :length], self.value_projection[..., :length]

    def _pool_matrices(self, length: int, lengths: Tensor | None, like: Tensor) -> Tensor:
        def build(n: int) -> Tensor:
            return pool_matrix(n, self.proj_dim, length, dtype=like.dtype, device=like.device)

        if lengths is None:
            return build(length)
        mats = {n: build(n) for n in torch.unique(lengths).tolist()}
        return torch.stack([mats[n] for n in lengths.tolist()])

    def forward(self, k: Tensor, v: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Compress compacted ``k: (B, H, L, d)``, ``v: (B, H, L, dv)`` to
        ``proj_dim`` positions (``lengths: (B,)`` real lengths or None)."""
        if self.proj_kind in ("linear", "random"):
            return linear_compress(k, self.e), linear_compress(v, self.value_projection)
        if self.proj_kind in ("mean", "max"):
            return (
                pool_compress(k, self.proj_dim, self.proj_kind, lengths),
                pool_compress(v, self.proj_dim, self.proj_kind, lengths),
            )
        return self._conv(k, self.e), self._conv(v, self.value_projection)

    def compress(
        self, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Drop padded keys and values (the j-th real key meets column j), then compress
        ``k: (B, H, L, d)``, ``v: (B, H, L, dv)`` to ``proj_dim`` positions."""
        k, lengths = compact_padding(k, key_padding_mask)
        v, _ = compact_padding(v, key_padding_mask)
        return self(k, v, lengths)

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        scale: float | None = None,
        dropout_p: float = 0.0,
    ) -> Tensor:
        """Linformer attention of ``q: (B, H, Lq, d)`` over ``k: (B, H, Lk, d)``,
        ``v: (B, H, Lk, dv)`` compressed by this projection, through
        :func:`linattn.linformer_attention` (the matrices ``E``, ``F`` for the linear kinds;
        the keys and values compressed here for pooling and convolution). Returns
        ``(B, H, Lq, dv)``."""
        if self.proj_kind in ("linear", "random"):
            return linformer_attention(
                q,
                k,
                v,
                self.e,
                self.value_projection,
                key_padding_mask=key_padding_mask,
                scale=scale,
                dropout_p=dropout_p,
            )
        kc, vc = self.compress(k, v, key_padding_mask)
        return linformer_attention(q, kc, vc, scale=scale, dropout_p=dropout_p, compressed=True)

    def _conv(self, x: Tensor, w: Tensor) -> Tensor:
        if self.sharing != "none":
            w = w.repeat(self.num_heads, 1, 1)
        return conv_compress(x, w, self.proj_dim)

    def options(self) -> LinformerOptions:
        """``proj_dim``, ``sharing`` and ``proj_kind`` of this projection."""
        return LinformerOptions(
            proj_dim=self.proj_dim, sharing=self.sharing, proj_kind=self.proj_kind
        )

    def extra_repr(self) -> str:
        return (
            f"max_seq_len={self.max_seq_len}, proj_dim={self.proj_dim}, proj_kind="
            f"{self.proj_kind!r}, sharing={self.sharing!r}"
        )


class UsesLinformerProjection:
    """Mixin for modules that compute with a :class:`LinformerProjection`: their own,
    registered as ``projection``, or a model-wide one (``sharing="layerwise"``) held by
    reference and not registered, so the model that owns it saves it once and DDP sees
    each of its parameters once. ``proj`` is the one in use."""

    def _use_projection(
        self, shared: LinformerProjection | None, build: Callable[[], LinformerProjection]
    ) -> None:
        if shared is not None:
            # Not a submodule: object.__setattr__ bypasses nn.Module's registration.
            object.__setattr__(self, "_shared", shared)
            self.projection = None
        else:
            self.projection = build()

    @property
    def proj(self) -> LinformerProjection:
        return self.projection if self.projection is not None else self._shared


class LinformerAttention(UsesLinformerProjection, MHAShaped):
    """Linformer self- or cross-attention, shaped like ``nn.MultiheadAttention``.

    Args:
        embed_dim, num_heads: as ``nn.MultiheadAttention`` (``embed_dim`` divisible by
            ``num_heads``).
        max_seq_len: longest key/value sequence (``n``); shorter inputs use the first
            columns of the projections.
        proj_dim: the compressed length (a different one per layer is fine, except under
            ``"layerwise"`` sharing).
        sharing, proj_kind: see :class:`LinformerProjection`. The defaults of
            ``proj_dim``, ``sharing`` and ``proj_kind`` are :class:`LinformerOptions`'.
        shared_projection: the model-wide :class:`LinformerProjection` for
            ``sharing="layerwise"``. It is held by reference, not registered, so the
            model that owns it saves it and DDP sees each parameter once.
        dropout, bias, kdim, vdim, batch_first: as ``nn.MultiheadAttention``
            (``batch_first=False`` by default: inputs ``(L, B, E)``).
        compress_first: where ``E`` is one linear map for all heads, compress the
            sequence before the key/value input projections (cost ``proj_dim d^2`` instead of
            ``n d^2``). This is exact: the bias contributes ``rowsum(E) b^T``, which is
            added explicitly. Without that term it would differ.
        causal: must be False. Linformer cannot be causal, because every compressed
            position mixes all keys, future ones included.

    Forward: ``(query, key=None, value=None, key_padding_mask=None, need_weights=False,
    attn_mask=None, is_causal=False)``; returns ``(output, None)``.
    Shapes (``batch_first=True``): query ``(B, Lq, E)``, key/value ``(B, Lk, kdim/vdim)``,
    ``key_padding_mask (B, Lk)`` bool with True = padding; with the default
    ``batch_first=False``, query ``(Lq, B, E)`` and key/value ``(Lk, B, kdim/vdim)``.
    """

    method = "Linformer"

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        max_seq_len: int,
        proj_dim: int = LinformerOptions.proj_dim,
        sharing: Sharing = LinformerOptions.sharing,
        proj_kind: ProjKind = LinformerOptions.proj_kind,
        shared_projection: LinformerProjection | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        compress_first: bool = True,
        causal: bool = False,
        seed: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if causal:
            raise ValueError(
                "LinformerAttention cannot be causal: its projection along the sequence "
                "mixes every key, future ones included, into each compressed position. "
                "Use PerformerAttention(causal=True) or exact attention for causal models."
            )
        check_choice("sharing", sharing, SHARING)
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
        self.compress_first, self.sharing = compress_first, sharing
        self.max_seq_len = check_positive_int("max_seq_len", max_seq_len)
        if sharing == "layerwise":
            if shared_projection is None:
                raise ValueError(
                    "sharing='layerwise' needs shared_projection: create one "
                    "LinformerProjection(..., sharing='layerwise') for the model and pass it "
                    "to every layer"
                )
            if shared_projection.sharing != "layerwise":
                raise ValueError(
                    "shared_projection must have sharing='layerwise', got "
                    f"{shared_projection.sharing!r}"
                )
            if (shared_projection.num_heads, shared_projection.head_dim) != (
                num_heads,
                self.head_dim,
            ):
                raise ValueError("shared_projection was built for another head layout")
        elif shared_projection is not None:
            raise ValueError("shared_projection is only for sharing='layerwise'")
        self._use_projection(
            shared_projection,
            lambda: LinformerProjection(
                max_seq_len,
                proj_dim,
                num_heads,
                self.head_dim,
                proj_kind=proj_kind,
                sharing=sharing,
                seed=seed,
                **factory,
            ),
        )

    def options(self) -> LinformerOptions:
        """This module's Linformer settings (``LinformerAttention(E, H, max_seq_len=n,
        **vars(options))`` builds a module with the same ones)."""
        return self.proj.options()

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
        """``nn.MultiheadAttention``'s call; ``cu_seqlens`` (int32 ``(N + 1,)``): the
        inputs hold ``N`` sequences packed back to back in a batch of one (``(1, T, E)``
        with ``batch_first``, else ``(T, 1, E)``), each compressed and attended alone (as
        :func:`linattn.linformer_attention`'s ``cu_seqlens``; a loop over the
        sequences, every projection kind)."""
        if attn_mask is not None or is_causal:
            raise ValueError(
                "Linformer supports no attn_mask and no causal masking: its compressed "
                "keys mix all positions; use key_padding_mask for padding"
            )
        query, key, value = self._inputs(query, key, value, need_weights)
        if cu_seqlens is None:
            return self._layout(self._attend(query, key, value, key_padding_mask)), None
        offsets, _ = self._packed(cu_seqlens, query, key, key_padding_mask)
        outs = [
            self._attend(query[:, s:e], key[:, s:e], value[:, s:e], None)
            for s, e in itertools.pairwise(offsets)
            if e > s
        ]
        if not outs:
            out = query.new_zeros(1, 0, self.embed_dim)
        else:
            out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self._layout(out), None

    def _attend(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None
    ) -> Tensor:
        """The attention of batch-first ``query: (B, Lq, E)`` over ``key``, ``value``:
        ``(B, Lq, E)``."""
        lk = key.shape[1]
        if lk > self.max_seq_len:
            raise ValueError(
                f"key length {lk} exceeds max_seq_len={self.max_seq_len} of this "
                "LinformerAttention (the projections have that many columns)"
            )
        mask = check_key_padding_mask(key_padding_mask, key.unsqueeze(1))
        q = self._heads(self.q_proj(query))
        proj = self.proj
        dropout_p = self.dropout if self.training else 0.0
        if self.compress_first and proj.head_shared_linear:
            kc, vc = self._compress_then_project(key, value, mask, proj)
            out = linformer_attention(q, kc, vc, dropout_p=dropout_p, compressed=True)
        else:
            out = proj.attend(
                q,
                self._heads(self.k_proj(key)),
                self._heads(self.v_proj(value)),
                key_padding_mask=mask,
                dropout_p=dropout_p,
            )
        return self._merge(out)

    def _compress_then_project(self, key, value, mask, proj):
        # E (X W^T + 1 b^T) = (E X) W^T + (E 1) b^T: compress the raw inputs, then project.
        kx, lengths = compact_padding(key, mask)
        vx, _ = compact_padding(value, mask)
        length = key.shape[1]
        e, f = proj.matrices(length, lengths, key)
        live = torch.ones(key.shape[0], length, dtype=key.dtype, device=key.device)
        if lengths is not None:
            live = (torch.arange(length, device=key.device)[None] < lengths[:, None]).to(key.dtype)
        out = []
        for mat, x, lin in ((e, kx, self.k_proj), (f, vx, self.v_proj)):
            xc = F.linear(mat @ x, lin.weight)
            if lin.bias is not None:
                # [B, proj_dim, 1]: rowsum of E over each sequence's real columns.
                xc = xc + (mat @ live.unsqueeze(-1)) * lin.bias
            out.append(self._heads(xc))
        return out[0], out[1]
