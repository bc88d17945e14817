"""Modules: own parameters, buffers and state; call the functional ops."""

from .exact import ExactAttention
from .linformer import LinformerAttention, LinformerOptions, LinformerProjection
from .performer import FavorOptions, PerformerAttention, default_num_features, redraw_seed

__all__ = [
    "ExactAttention",
    "FavorOptions",
    "LinformerAttention",
    "LinformerOptions",
    "LinformerProjection",
    "PerformerAttention",
    "default_num_features",
    "redraw_seed",
]
