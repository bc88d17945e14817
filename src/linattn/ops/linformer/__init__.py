"""Linformer: keys and values compressed along the sequence axis to a fixed length."""

from .naive import linformer_naive
from .projected import (
    compact_padding,
    conv_compress,
    linear_compress,
    pool_compress,
    pool_matrix,
    projected_attention,
)

__all__ = [
    "compact_padding",
    "conv_compress",
    "linear_compress",
    "linformer_naive",
    "pool_compress",
    "pool_matrix",
    "projected_attention",
]
