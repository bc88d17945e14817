"""The attention and mask functions registered with ``transformers`` under ``"linattn"``.

``transformers`` models call ``attention_interface(module, query, key, value,
attention_mask, scaling=..., dropout=..., **kwargs)`` with ``query: (B, H, Lq, d)`` and
``key, value: (B, H_kv, Lk, d)`` (projected, rotary already applied) and expect
``(output (B, Lq, H, d), weights or None)``. The mask function decides what arrives as
``attention_mask``: for linear attention only which keys are padding can be used, so it
passes the 2-D padding mask through instead of building an ``(Lq, Lk)`` one. Without a
registered mask function, ``transformers`` would hand the attention ``None`` and
padding would silently leak into the outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
)

NAME = "linattn"


def linattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """Mask function for ``AttentionMaskInterface``: returns the ``(B, kv_length)`` bool
    padding mask (True = real token) as given, or None when nothing is padded.

    Causality is not encoded here: the attention function takes it from the module
    (``module.is_causal``), so it holds even when no mask is passed at all. Patterns
    that linear attention cannot express (sliding windows, packed sequences, custom
    overlays) raise a ``ValueError`` rather than being dropped silently.
    """
    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        name = getattr(mask_function, "__name__", type(mask_function).__name__)
        raise ValueError(
            f"linattn supports plain causal or bidirectional attention with key padding; "
            f"this model asked for the mask pattern {name!r} (sliding window, packed "
            "sequences or a custom overlay), which linear attention cannot express"
        )
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"linattn takes a 2-D padding mask (batch, kv_length); got shape "
            f"{tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(torch.bool)
    mask = mask[:, kv_offset : kv_offset + kv_length] if mask.shape[1] > kv_length else mask
    return None if bool(mask.all()) else mask


def _key_padding_mask(attention_mask: Tensor | None, batch: int, lk: int) -> Tensor | None:
    """Turn what the model passed as ``attention_mask`` into ``(B, Lk)`` True = padding."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dim() == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        # A broadcastable (B, 1, 1, Lk) key mask (as some models prepare themselves).
        m = m[:, 0, 0]
        keep = m if m.dtype == torch.bool else m == 0
    elif m.dim() == 2:
        keep = m if m.dtype == torch.bool else m > 0
    else:
        raise ValueError(
            "linattn needs a key padding mask of shape (batch, kv_length); got attention_mask "
            f"of shape {tuple(m.shape)}: a full (query x key) mask cannot be applied without "
            "the attention matrix that linear attention avoids"
        )
    if keep.shape[0] != batch or keep.shape[1] < lk:
        raise ValueError(
            f"attention_mask of shape {tuple(keep.shape)} does not cover batch {batch} and "
            f"{lk} keys"
        )
    # During recurrent decoding the mask spans the whole context; the keys are the last Lk.
    return ~keep[:, keep.shape[1] - lk :]


def exact_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float | None,
) -> Tensor:
    """Softmax attention as the original model computes it: ``q: (B, H, Lq, d)``,
    ``k, v: (B, H, Lk, d)``, ``key_padding_mask: (B, Lk)`` True = padding; causal queries
    are the last ``Lq`` of the ``Lk`` positions. Returns ``(B, H, Lq, d)``; a query that
    sees no key (a padded one) gets 0."""
    lq, lk = q.shape[-2], k.shape[-2]
    keep = None
    if key_padding_mask is not None:
        keep = ~key_padding_mask[:, None, None, :]  # [B, 1, 1, Lk]
    if causal:
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
        keep = tri if keep is None else keep & tri
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    if keep is not None:
        out = torch.where(keep.any(-1, keepdim=True), out, 0)
    return out


def linattn_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention function for ``AttentionInterface``: linear attention with the state
    ``module.linattn`` attached by :func:`~.convert.convert`.

    Shapes: ``query (B, H, Lq, d)``, ``key/value (B, H_kv, Lk, d)`` with ``H`` a multiple
    of ``H_kv`` (grouped-query attention: each key/value head serves ``H / H_kv`` query
    heads). Returns ``(out (B, Lq, H, d), None)``; there are no attention weights.
    """
    state = getattr(module, "linattn", None)
    if state is None:
        raise ValueError(
            f"{type(module).__name__} has no linear-attention state: convert the model with "
            "linattn.integrations.hf.convert(model, ...) instead of only selecting "
            f"attn_implementation={NAME!r}"
        )
    cache_layer = getattr(state, "pending_cache", None)
    state.pending_cache = None
    heads, kv_heads = query.shape[1], key.shape[1]
    unrepeated = None
    if heads != kv_heads:
        unrepeated = (key, value)
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    mask = _key_padding_mask(attention_mask, query.shape[0], key.shape[-2])
    causal = bool(getattr(module, "is_causal", False))
    recorder = getattr(state, "transfer", None)
    if recorder is not None:
        # Attention transfer (see .transfer): the layer returns the exact attention, so
        # that later layers see the original model's inputs, and the recorder compares
        # the linear attention on the same (detached) q, k, v with it.
        with torch.no_grad():
            exact = exact_attention(
                query, key, value, key_padding_mask=mask, causal=causal, scale=scaling
            )
        approx = state(
            query.detach(),
            key.detach(),
            value.detach(),
            key_padding_mask=mask,
            causal=causal,
            scale=scaling,
            cache_layer=cache_layer,
            unrepeated=unrepeated,
            positions=kwargs.get("position_ids"),
        )
        recorder.record(module, approx, exact, mask)
        out = exact.to(query.dtype)
    else:
        out = state(
            query,
            key,
            value,
            key_padding_mask=mask,
            causal=causal,
            scale=scaling,
            cache_layer=cache_layer,
            unrepeated=unrepeated,
            positions=kwargs.get("position_ids"),
        )
    if dropout and module.training:
        # No attention matrix to drop from: as PerformerAttention, drop attention outputs.
        out = F.dropout(out, dropout, training=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"linattn"`` with ``AttentionInterface`` and ``AttentionMaskInterface``
    (idempotent)."""
    AttentionInterface.register(NAME, linattn_attention)
    AttentionMaskInterface.register(NAME, linattn_mask)
