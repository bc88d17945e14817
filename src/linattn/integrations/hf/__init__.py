"""Hugging Face ``transformers`` integration: convert pretrained models to linear attention.

``convert(model, method="favor" | "linformer", **options)`` registers the attention and
mask functions with ``transformers.AttentionInterface`` / ``AttentionMaskInterface``
under ``"linattn"``, attaches per-layer state to each attention module and selects it.
See :func:`convert`, :func:`save_converted`, :func:`load_converted`,
:class:`FavorCache`, :func:`set_slots` (exact key-value slots for a converted decoder),
:func:`set_far_decay`, :func:`set_compiled_decoding` (decoding steps through
``torch.compile``),
:func:`attention_parts` / :func:`set_attention_parts` (ablations: window-only, linear-only,
no slots), :mod:`.distill` and :mod:`.transfer`. The packaged pretrained models
and the experiments of ``linattn convert`` are application code, in
:mod:`linattn.experiments`.
"""

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "linattn.integrations.hf needs transformers: pip install 'linattn[hf]'"
    ) from exc

from .ablation import attention_parts, set_attention_parts
from .attention import NAME, linattn_attention, linattn_mask, register
from .cache import FavorCache, FavorCacheLayer
from .convert import (
    convert,
    converted_layers,
    linear_attention_states,
    load_converted,
    redraw_projections,
    save_converted,
    set_compiled_decoding,
    set_far_decay,
    set_slots,
)

__all__ = [
    "NAME",
    "FavorCache",
    "FavorCacheLayer",
    "attention_parts",
    "convert",
    "converted_layers",
    "linattn_attention",
    "linattn_mask",
    "linear_attention_states",
    "load_converted",
    "redraw_projections",
    "register",
    "save_converted",
    "set_attention_parts",
    "set_compiled_decoding",
    "set_far_decay",
    "set_slots",
]
