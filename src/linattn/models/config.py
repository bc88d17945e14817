"""Model configuration (a dataclass, saved as JSON beside the weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ATTENTIONS = ("softmax", "favor", "relu", "linformer")
POSITIONS = ("rotary", "learned", "sinusoidal", "none")
POOLINGS = ("mean", "cls")


class JsonConfig:
    """``to_dict`` / ``from_dict`` for config dataclasses; unknown keys are an error."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**data)


@dataclass
class ModelConfig(JsonConfig):
    """Sizes and choices of a :mod:`linattn.models` Transformer.

    ``attention``: ``"softmax"`` (exact, ``scaled_dot_product_attention``), ``"favor"``
    (FAVOR+ softmax kernel), ``"relu"`` (generalized ReLU kernel), ``"linformer"``
    (bidirectional only). ``position``: rotary (applied to q and k; exact and FAVOR
    only), learned or sinusoidal absolute embeddings, or none.
    """

    vocab_size: int
    dim: int = 128
    depth: int = 2
    heads: int = 4
    ff_mult: int = 4
    max_seq_len: int = 1024
    attention: str = "favor"
    causal: bool = False
    num_features: int | None = None
    redraw_interval: int | None = None
    proj_dim: int = 128
    linformer_sharing: str = "headwise"
    linformer_projection: str = "linear"
    position: str = "rotary"
    dropout: float = 0.0
    num_classes: int | None = None
    pooling: str = "mean"
    tie_embeddings: bool = True
    checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "depth", "heads", "ff_mult", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        for name, choices in (("attention", ATTENTIONS), ("position", POSITIONS),
                              ("pooling", POOLINGS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; "
                                 f"got {getattr(self, name)!r}")
        if self.attention == "linformer" and self.causal:
            raise ValueError(
                "attention='linformer' cannot be causal: Linformer's projection along the "
                "sequence mixes future keys into every position; use 'favor' or 'softmax'"
            )
        if self.attention == "linformer" and self.position == "rotary":
            raise ValueError(
                "rotary positions are not defined for Linformer (keys are compressed along "
                "the sequence); use position='learned' or 'sinusoidal'"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("causal", "tie_embeddings", "checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool (True/False), got "
                                f"{getattr(self, name)!r}")
        # None means the default; 0 must not silently mean it too.
        for name in ("num_features", "redraw_interval", "proj_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive int (or None for the default), "
                                 f"got {value!r}")
        if self.num_classes is not None and (
                isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
                or self.num_classes < 2):
            raise ValueError(f"num_classes must be None (language model) or an int >= 2, got "
                             f"{self.num_classes!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
