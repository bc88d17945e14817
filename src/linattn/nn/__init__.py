"""Modules: own parameters, buffers and state; call the functional ops."""

from .linformer import LinformerAttention, LinformerProjection
from .performer import PerformerAttention, default_num_features, redraw_seed

__all__ = [
    "LinformerAttention",
    "LinformerProjection",
    "PerformerAttention",
    "default_num_features",
    "redraw_seed",
]
