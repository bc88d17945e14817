"""Per-layer linear-attention state attached to a converted Hugging Face attention module.

Each converted attention module gets a ``linattn`` child holding what the method needs
(FAVOR+: the projection and its redraw counter, as persistent buffers; Linformer: E and F
as parameters sized to the model's maximum length). The registered attention function
(:mod:`.attention`) hands it the model's already-projected, already-rotated ``q, k, v``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..._checks import check_choice, check_positive_int
from ...features import KERNELS
from ...functional import _compute_dtype, favor_attention, favor_recurrent
from ...nn.linformer import LinformerProjection
from ...nn.performer import RandomFeatures, default_num_features
from ...ops.linformer import projected_attention


class FavorLayerState(RandomFeatures, nn.Module):
    """FAVOR+ state of one converted attention layer.

    Args:
        head_dim: the model's per-head dimension ``d``.
        num_features: random features ``m`` (default ``d log d``, rounded up to 16).
        kernel: a :data:`linattn.KERNELS` name; causal models need a kernel with a causal
            form (``"softmax"``, ``"softmax_hyp"``, ``"relu"``, ...).
        orthogonal, scaling, seed, layer_index, redraw_interval: as
            :class:`linattn.PerformerAttention`.
        chunk_size: causal chunk length (speed only).
        learn_projection: make the projection a trainable parameter (initialized with the
            random draw) so that distillation can adapt the features to the model's
            attention; the estimator is then no longer unbiased for softmax, but closer
            to the pretrained model after distillation.

    ``forward(q, k, v, *, key_padding_mask, causal, scale, cache_layer=None)`` takes
    ``q: (B, H, Lq, d)``, ``k, v: (B, H, Lk, d)`` and returns ``(B, H, Lq, d)``. With a
    ``cache_layer`` (a :class:`~.cache.FavorCacheLayer`), the tokens continue its
    recurrent state instead of being attended from scratch.
    """

    method = "favor"

    def __init__(
        self,
        head_dim: int,
        *,
        num_features: int | None = None,
        kernel: str = "softmax",
        orthogonal: bool = True,
        scaling: str = "chi",
        seed: int = 0,
        layer_index: int = 0,
        redraw_interval: int | None = None,
        chunk_size: int = 64,
        learn_projection: bool = False,
        device=None,
    ) -> None:
        super().__init__()
        if learn_projection and redraw_interval is not None:
            raise ValueError("learn_projection=True trains the projection; it cannot also be "
                             "redrawn (redraw_interval must be None)")
        self.kernel = check_choice("kernel", kernel, tuple(KERNELS))
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        # float32 whatever the model's dtype: half-precision inputs compute in float32.
        self._init_random_features(
            default_num_features(head_dim) if num_features is None else num_features,
            head_dim, orthogonal=orthogonal,
            scaling=scaling, seed=seed, layer_index=layer_index,
            redraw_interval=redraw_interval, device=device, dtype=torch.float32,
        )
        self.learn_projection = learn_projection
        if learn_projection:
            # Start from the orthogonal random draw; distillation then adapts it.
            w = self._buffers.pop("projection")
            self.projection = nn.Parameter(w)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None,
        causal: bool, scale: float | None, cache_layer=None,
    ) -> Tensor:
        w = self.projection
        if cache_layer is not None:
            out, cache_layer.state = favor_recurrent(
                q, k, v, w, state=cache_layer.state, kernel=self.kernel,
                key_padding_mask=key_padding_mask, scale=scale,
            )
            return out
        lq, lk = q.shape[-2], k.shape[-2]
        if causal and lq != lk:
            # A key/value cache the model kept itself (not ours): the queries are the last
            # Lq positions. Zero queries in front give the same causal prefix sums.
            pad = q.new_zeros(*q.shape[:-2], lk - lq, q.shape[-1])
            out = favor_attention(torch.cat([pad, q], dim=-2), k, v, w, kernel=self.kernel,
                                  causal=True, key_padding_mask=key_padding_mask,
                                  scale=scale, chunk_size=self.chunk_size)
            return out[..., lk - lq:, :]
        return favor_attention(q, k, v, w, kernel=self.kernel, causal=causal,
                               key_padding_mask=key_padding_mask, scale=scale,
                               chunk_size=self.chunk_size)

    def options(self) -> dict:
        return {"num_features": self.num_features, "kernel": self.kernel,
                "orthogonal": self.orthogonal, "scaling": self.scaling,
                "redraw_interval": self.redraw_interval, "chunk_size": self.chunk_size,
                "learn_projection": self.learn_projection}

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, num_features={self.num_features}, "
                f"kernel={self.kernel!r}")


class LinformerLayerState(nn.Module):
    """Linformer state of one converted (bidirectional) attention layer.

    Args:
        num_heads, head_dim: the model's query heads and per-head dimension.
        max_seq_len: ``n``, the columns of ``E``/``F`` (the model's maximum length).
        proj_dim: ``kdim``, the compressed length.
        projection, sharing, seed: as :class:`linattn.LinformerProjection`
            (``sharing="layerwise"``: pass the model-wide projection as ``shared``; it is
            held by reference and registered once, on the first layer).

    ``forward(q, k, v, *, key_padding_mask, causal, scale)``: ``q: (B, H, Lq, d)``,
    ``k, v: (B, H, Lk, d)`` with ``Lk <= max_seq_len``; returns ``(B, H, Lq, d)``.
    """

    method = "linformer"

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        max_seq_len: int,
        *,
        proj_dim: int = 128,
        projection: str = "linear",
        sharing: str = "headwise",
        seed: int = 0,
        shared: LinformerProjection | None = None,
        device=None,
        dtype=torch.float32,
    ) -> None:
        super().__init__()
        if shared is not None:
            object.__setattr__(self, "_shared", shared)
            self.projection = None
        else:
            self.projection = LinformerProjection(
                max_seq_len, proj_dim, num_heads, head_dim, kind=projection, sharing=sharing,
                seed=seed, device=device, dtype=dtype,
            )

    @property
    def proj(self) -> LinformerProjection:
        return self.projection if self.projection is not None else self._shared

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None,
        causal: bool, scale: float | None, cache_layer=None,
    ) -> Tensor:
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
        kc, vc = proj.compress(k, v, key_padding_mask)
        return projected_attention(q, kc, vc, scale).to(dtype)

    def options(self) -> dict:
        p = self.proj
        return {"proj_dim": p.proj_dim, "projection": p.kind, "sharing": p.sharing,
                "max_seq_len": p.max_seq_len}


def proj_dtype(proj: LinformerProjection, like: torch.dtype) -> torch.dtype:
    """The dtype Linformer computes in: its matrices' (the model's precision, float32
    under half precision); for the parameter-free pooling kinds, ``like`` (float32 if
    ``like`` is half)."""
    for t in (proj.e, proj.f):
        if t is not None:
            return t.dtype
    return _compute_dtype(like)


def converted_layers(model: nn.Module) -> Iterator[nn.Module]:
    """Attention modules of ``model`` that carry a linear-attention state."""
    for module in model.modules():
        if isinstance(getattr(module, "linattn", None), (FavorLayerState, LinformerLayerState)):
            yield module
