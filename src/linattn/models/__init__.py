"""Transformer models with attention chosen by name: ``"exact"``, ``"favor"`` (with a
FAVOR+ ``kernel`` and an optional ``window``), ``"linformer"``."""

from .attention import build_attention
from .config import ModelConfig
from .transformer import (
    Block,
    CausalLM,
    Encoder,
    SequenceClassifier,
    load_model,
    sample_next,
)

__all__ = [
    "Block",
    "CausalLM",
    "Encoder",
    "ModelConfig",
    "SequenceClassifier",
    "build_attention",
    "load_model",
    "sample_next",
]
