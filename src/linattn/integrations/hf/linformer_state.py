"""Linformer state of a converted (bidirectional) Hugging Face attention layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..._dtype import compute_dtype
from ...nn.linformer import (
    LinformerOptions,
    LinformerProjection,
    ProjKind,
    Sharing,
    UsesLinformerProjection,
)


class LinformerLayerState(UsesLinformerProjection, nn.Module):
    """Linformer state of one converted (bidirectional) attention layer.

    Args:
        num_heads, head_dim: the model's query heads and per-head dimension.
        max_seq_len: ``n``, the columns of ``E``/``F`` (the model's maximum length).
        proj_dim, sharing, proj_kind: :class:`linattn.LinformerOptions` (its defaults).
        seed: as :class:`linattn.LinformerProjection`.
        shared: with ``sharing="layerwise"``, the model-wide projection (from the first
            layer), held by reference and registered once, on the first layer.

    ``forward(q, k, v, *, key_padding_mask, causal, scale)`` (``cache_layer`` and
    ``unrepeated`` are the FAVOR+ state's; a cache is refused): ``q: (B, H, Lq, d)``,
    ``k, v: (B, H, Lk, d)`` with ``Lk <= max_seq_len``; returns ``(B, H, Lq, d)``,
    through :meth:`linattn.LinformerProjection.attend` (:func:`linattn.linformer_attention`).
    """

    method = "linformer"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_seq_len: int,
        *,
        proj_dim: int = LinformerOptions.proj_dim,
        sharing: Sharing = LinformerOptions.sharing,
        proj_kind: ProjKind = LinformerOptions.proj_kind,
        seed: int = 0,
        shared: LinformerProjection | None = None,
        device=None,
        dtype=torch.float32,
    ) -> None:
        super().__init__()
        self._use_projection(
            shared,
            lambda: LinformerProjection(
                max_seq_len,
                proj_dim,
                num_heads,
                head_dim,
                proj_kind=proj_kind,
                sharing=sharing,
                seed=seed,
                device=device,
                dtype=dtype,
            ),
        )

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        causal: bool,
        scale: float | None,
        cache_layer=None,
        unrepeated=None,
        positions=None,
    ) -> Tensor:
        # (positions: unused; the attention function hands every layer state the ids.)
        if causal or cache_layer is not None:
            raise ValueError(
                "Linformer cannot run a causal (decoder) attention: its projection along "
                "the sequence mixes future keys into every compressed position"
            )
        proj = self.proj
        lk = k.shape[-2]
        if lk > proj.max_seq_len:
            raise ValueError(
                f"key length {lk} exceeds the converted model's max_seq_len="
                f"{proj.max_seq_len} (the columns of Linformer's E and F)"
            )
        dtype = q.dtype
        q, k, v = (t.to(proj_dtype(proj, dtype)) for t in (q, k, v))
        return proj.attend(q, k, v, key_padding_mask=key_padding_mask, scale=scale).to(dtype)

    def options(self) -> dict:
        return {**vars(self.proj.options()), "max_seq_len": self.proj.max_seq_len}


def proj_dtype(proj: LinformerProjection, like: torch.dtype) -> torch.dtype:
    """The dtype Linformer computes in: its matrices' (the model's precision, float32
    under half precision); for the parameter-free pooling kinds, ``like`` (float32 if
    ``like`` is half)."""
    for t in (proj.e, proj.f):
        if t is not None:
            return t.dtype
    return compute_dtype(like)
