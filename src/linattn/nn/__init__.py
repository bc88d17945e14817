"""Modules: own parameters, buffers and state; call the functional ops."""

from .linformer import LinformerAttention, LinformerProjection

__all__ = ["LinformerAttention", "LinformerProjection"]
